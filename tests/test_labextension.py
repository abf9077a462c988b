"""The JupyterLab extension is part of the Python package: built by
hatch-jupyter-builder into the wheel, enabled without a separate install step."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_jupyterlab_lists_the_extension_enabled():
    out = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], capture_output=True, text=True)
    listing = out.stdout + out.stderr
    # The extension's own line ("jupyter-ckpt v0.1.0 enabled OK"), not a path
    # that happens to hold the name (a checkout in a folder named jupyter-ckpt).
    line = next((entry for entry in listing.splitlines() if entry.split()[:1] == ["jupyter-ckpt"]), "")
    assert "enabled" in line and "OK" in line, listing


def test_the_wheel_carries_the_built_extension(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("jupyter_ckpt-*.whl"))
    prefix = "jupyter_ckpt-0.1.0.data/data/share/jupyter/labextensions/jupyter-ckpt/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert prefix + "package.json" in names
        assert any(n.startswith(prefix + "static/remoteEntry.") for n in names)
        schema = json.loads(zf.read(prefix + "schemas/jupyter-ckpt/plugin.json"))
    assert {item["name"] for item in schema["jupyter.lab.toolbars"]["Notebook"]} == {"ckpt-snapshot", "ckpt-lineage"}
    assert schema["jupyter.lab.shortcuts"][0]["command"] == "jupyter-ckpt:snapshot"
