"""`jupyter ckpt` commands, run as real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from jupyter_ckpt.store import SnapshotStore

from .client import snapshot
from .test_store import commit


def ckpt(store_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_ckpt.cli", "--store", str(store_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def filled(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    t = 1_800_000_000.0
    records = [commit(store, trigger="auto", seed=i, when=t + i) for i in range(3)]
    records.append(commit(store, trigger="manual", seed=9, when=t + 9))
    store.close()
    return tmp_path / "store", records


def test_list_and_show(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "list")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "CREATED", "TRIGGER", "STATUS"]
    assert [line.split()[0] for line in lines[1:]] == [r.id for r in reversed(records)]
    as_json = json.loads(ckpt(store_dir, "--json", "list", "--kernel", "k1").stdout)
    assert len(as_json) == 4 and "stdio_keys" not in as_json[0]
    shown = json.loads(ckpt(store_dir, "--json", "show", records[0].id).stdout)
    assert shown["id"] == records[0].id and shown["status"] == "complete"
    missing = ckpt(store_dir, "show", "01M8G6NHZS1PKW09RTTN07H2K4")
    assert missing.returncode == 3 and "no snapshot" in missing.stderr


def test_prune_delete_gc(filled):
    store_dir, records = filled
    out = ckpt(store_dir, "--json", "prune", "--kernel", "k1", "--keep", "1")
    assert json.loads(out.stdout)["deleted"] == [records[1].id, records[0].id]
    assert ckpt(store_dir, "prune").returncode == 2
    assert ckpt(store_dir, "delete", records[3].id).returncode == 0
    freed = json.loads(ckpt(store_dir, "--json", "gc").stdout)
    assert freed["objects_deleted"] >= 1 and freed["bytes_freed"] > 0
    assert [r["id"] for r in json.loads(ckpt(store_dir, "--json", "list").stdout)] == [records[2].id]


def test_export_import(filled, tmp_path):
    store_dir, records = filled
    bundle = tmp_path / "one.jckpt"
    out = ckpt(store_dir, "export", records[0].id, "-o", str(bundle))
    assert out.returncode == 0 and bundle.stat().st_size > 0
    other = tmp_path / "other"
    refused = ckpt(other, "import", str(bundle))
    assert refused.returncode == 1 and "another store's key" in refused.stderr
    assert ckpt(other, "import", str(bundle), "--trust").returncode == 0
    assert [r["id"] for r in json.loads(ckpt(other, "--json", "list").stdout)] == [records[0].id]


@pytest.mark.criu
def test_check():
    out = ckpt("/tmp", "check")
    assert out.returncode == 0 and "OK" in out.stdout
    bad = ckpt("/tmp", "check", "--criu", "/nonexistent/criu")
    assert bad.returncode == 4 and "not installed" in bad.stdout


@pytest.mark.criu
async def test_restore_through_a_running_server(jp_fetch, jp_serverapp, start_kernel, jp_http_port, jp_base_url):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'saved'")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("x = 'changed'")
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}"
    token = jp_serverapp.identity_provider.token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        snap["id"],
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"restored from {snap['id']}" in out.decode()
    assert await sock.value("x") == "'saved'"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jupyter_ckpt.cli",
        "restore",
        "01M8G6NHZS1PKW09RTTN07H2K4",
        "--url",
        url,
        "--token",
        token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 3 and b"404" in err


def test_options_work_on_either_side_of_the_command(filled):
    store_dir, records = filled
    for args in (["list", "--json"], ["--json", "list"]):
        out = ckpt(store_dir, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert sorted(s["id"] for s in json.loads(out.stdout)) == sorted(r.id for r in records)
    out = subprocess.run(
        [sys.executable, "-m", "jupyter_ckpt.cli", "show", records[0].id, "--store", str(store_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == records[0].id, out.stderr


def test_the_jupyter_ckpt_command(filled):
    """`jupyter ckpt` finds the `jupyter-ckpt` entry point as Jupyter's subcommand."""
    import os

    store_dir, records = filled
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    out = subprocess.run(
        [jupyter, "ckpt", "--store", str(store_dir), "list", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == len(records)


def test_an_export_is_private_from_its_first_byte(filled, tmp_path):
    """The bundle holds all of a kernel's memory: created 0600, never with the umask."""
    store_dir, records = filled
    target = tmp_path / "out.jckpt"
    target.write_bytes(b"old")
    os_umask = __import__("os").umask(0)
    try:
        out = ckpt(store_dir, "export", records[0].id, "-o", str(target))
    finally:
        __import__("os").umask(os_umask)
    assert out.returncode == 0, out.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    # Seen while it is being written, by a process with umask 0: already private.
    import time

    big_store = SnapshotStore(tmp_path / "big")
    big = commit(big_store, seed=5, size=96 << 20)
    big_store.close()
    fresh = tmp_path / "fresh.jckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_ckpt.cli",
            "--store",
            str(tmp_path / "big"),
            "export",
            big.id,
            "-o",
            str(fresh),
        ],
        preexec_fn=lambda: __import__("os").umask(0),
    )
    deadline = time.monotonic() + 60
    while not fresh.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the export never created its file"
        time.sleep(0.001)
    assert fresh.stat().st_mode & 0o777 == 0o600
    assert proc.wait(timeout=120) == 0 and fresh.stat().st_size > 90 << 20
    missing = ckpt(store_dir, "export", "01M8G6NHZS1PKW09RTTN07H2K4", "-o", str(tmp_path / "none.jckpt"))
    assert missing.returncode == 3 and not (tmp_path / "none.jckpt").exists()
