"""Kishu (https://github.com/illinoisdata/kishu) on the same workloads.

Kishu instruments a notebook's kernel (``init_kishu``), commits the variables a
cell changed after every cell (pickling them, re-running cells for what it
cannot pickle), and checks a commit out by loading them back. It needs a notebook
session on a Jupyter server: a real ``jupyter server`` is started here, and the
kernel is driven through its connection file as a notebook would drive it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN = "kishu-bench"
EMPTY = {
    "cells": [],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def available() -> str | None:
    """Kishu's version, or None if it is not installed."""
    try:
        from importlib.metadata import version

        return version("kishu")
    except Exception:
        return None


class Server:
    def __init__(self, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        self.root, self.runtime = work / "root", work / "runtime"
        self.root.mkdir(exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--allow-root",
                "--no-browser",
                f"--port={self.port}",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={self.root}",
                # Kishu is measured on its own: no auto-backup beside it.
                "--CheckpointApp.auto_backup=False",
                f"--CheckpointApp.store_root={work / 'store'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(self.runtime)),
        )
        for _ in range(300):
            try:
                self.call("GET", "/api/status")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("jupyter server did not start")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read() or b"null")

    def notebook(self, name: str) -> tuple[Any, Path]:
        """A notebook with a kernel, and a client to that kernel."""
        path = self.root / name
        path.write_text(json.dumps(EMPTY))
        session = self.call(
            "POST", "/api/sessions", {"path": name, "name": name, "type": "notebook", "kernel": {"name": "python3"}}
        )
        return self._connect(session["kernel"]["id"]), path

    def _connect(self, kernel_id: str) -> Any:
        from jupyter_client import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_file(str(self.runtime / f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        client.bench_kernel_id = kernel_id
        return client

    def restart(self, client: Any) -> Any:
        """Restart the client's kernel through the server; a client to the new one."""
        client.stop_channels()
        self.call("POST", f"/api/kernels/{client.bench_kernel_id}/restart", {})
        return self._connect(client.bench_kernel_id)

    def stop(self) -> None:
        # Its kernels first: they run in sessions of their own and would
        # outlive a server that did not stop them (seen: a run left seven).
        try:
            for kernel in self.call("GET", "/api/kernels"):
                self.call("DELETE", f"/api/kernels/{kernel['id']}")
        except OSError:
            pass
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def result_hook(out: dict[str, str]) -> Callable[[dict], None]:
    """An IOPub hook keeping a cell's value (text) and its error, if any, in ``out``."""

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "execute_result":
            out["value"] = msg["content"]["data"].get("text/plain", "")
        elif msg["msg_type"] == "error":
            out["error"] = f"{msg['content']['ename']}: {msg['content']['evalue']}"

    return hook


def run(client: Any, code: str, timeout: float = 1200) -> str | None:
    out: dict[str, str] = {}
    reply = client.execute_interactive(code, timeout=timeout, output_hook=result_hook(out))
    if reply["content"]["status"] != "ok":
        raise RuntimeError(out.get("error") or str(reply["content"]))
    return out.get("value")


INIT = "from kishu import init_kishu as _ik; _ik({path!r})"
# The commit made after the previous cell, and how long Kishu took to checkpoint it.
LAST_COMMIT = (
    "(lambda c: (c.commit_id, c.checkpoint_runtime_s))"
    "(_kishu._kishu_commit.get_commit(_kishu._kishu_branch.get_head().commit_id))"
)


def measure(work: Path, workload: tuple[str, str, float]) -> dict:
    version = available()
    if version is None:
        return {"error": "Kishu is not installed (make bench installs it: pip install kishu)"}
    code, check, _ = workload
    server = Server(work)
    try:
        client, path = server.notebook("workload.ipynb")
        run(client, INIT.format(path=str(path)))
        run(client, code)  # Kishu commits after this cell: what it pickles is the workload
        commit_id, commit_s = eval(run(client, LAST_COMMIT))
        expected = run(client, check)
        run(client, "data = None")
        t = time.perf_counter()
        run(client, f"_kishu.checkout({commit_id!r})")
        checkout_s = time.perf_counter() - t
        ok = run(client, check) == expected
        client.stop_channels()
        return {"version": version, "commit_s": commit_s, "checkout_s": checkout_s, "state_ok": ok}
    except Exception as e:  # report why, as the issue asks
        return {"version": version, "error": f"Kishu failed on this workload: {str(e)[:300]}"}
    finally:
        server.stop()


def coverage(work: Path, kinds: list[tuple[str, str, str]]) -> dict[str, str]:
    """Per kind: build it in a Kishu-instrumented notebook (Kishu commits after
    the cell), restart the kernel (as dill's state goes to a fresh kernel), attach
    Kishu again, check the commit out, then check the state. Kishu restores what
    it pickled and re-runs the cells that built what it could not pickle."""
    if available() is None:
        return {name: "Kishu not installed" for name, _, _ in kinds}
    server = Server(work)
    out = {}
    try:
        for n, (name, setup, check) in enumerate(kinds):
            try:
                client, path = server.notebook(f"kind-{n}.ipynb")
            except Exception as e:
                out[name] = f"no kernel: {e}"
                continue
            try:
                run(client, INIT.format(path=str(path)))
                run(client, setup, timeout=60)
                commit_id = eval(run(client, LAST_COMMIT))[0]
                client = server.restart(client)
                run(client, INIT.format(path=str(path)))
                run(client, f"_kishu.checkout({commit_id!r})", timeout=120)
                value = run(client, check, timeout=30)
                out[name] = "ok" if value == "True" else f"wrong: {value}"
            except Exception as e:
                out[name] = f"fails: {str(e)[:120]}"
            finally:
                client.stop_channels()
    finally:
        server.stop()
    return out
