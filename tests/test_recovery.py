"""Recovery across real server restarts: the kernel is gone, its snapshots are
not; a restore starts it again for its notebook, or the next server resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from jupyter_client import BlockingKernelClient

from .conftest import needs_root
from .test_crash import TOKEN, call, descendants, free_port

pytestmark = needs_root


class Server:
    """A real `jupyter server` process with its own root, runtime dir and store.

    With ``netns``, it runs in that network namespace (standing for another
    host) and listens on ``host`` there."""

    def __init__(self, tmp_path, *extra: str, netns: str | None = None, host: str = "127.0.0.1", local_store: bool = True):
        self.port = free_port() if netns is None else 8888
        self.host = host
        self.runtime = tmp_path / "runtime"
        (tmp_path / "root").mkdir(exist_ok=True)
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", f"--port={self.port}",
             f"--ip={host}",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path / 'root'}",
             "--ServerApp.jpserver_extensions=jupyter_ckpt=True",
             *([f"--CheckpointApp.store_root={tmp_path / 'store'}"] if local_store else []), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(self.runtime), HOME=str(tmp_path)),
        )
        for _ in range(300):
            try:
                self.call("GET", "/api/ckpt/status", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def call(self, method, path, body=None, timeout=60):
        return call(self.port, method, path, body, timeout, host=self.host)

    def client(self, kernel_id: str) -> BlockingKernelClient:
        client = BlockingKernelClient()
        client.load_connection_file(str(self.runtime / f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        return client

    def kill(self) -> None:
        """As a crash or a reboot would: the server and its kernels, at once."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def value(client: BlockingKernelClient, expr: str) -> str:
    out = {}
    reply = client.execute_interactive(
        expr, timeout=60,
        output_hook=lambda m: out.update(m["content"].get("data", {})) if m["msg_type"] == "execute_result" else None,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return out.get("text/plain")


def first_run(tmp_path) -> tuple[str, str]:
    a = Server(tmp_path)
    session = a.call("POST", "/api/sessions", {"path": "work/analysis.ipynb", "name": "analysis.ipynb",
                                               "type": "notebook", "kernel": {"name": "python3"}})
    kernel_id = session["kernel"]["id"]
    client = a.client(kernel_id)
    value(client, "import threading; x = 'from the first run'; t = threading.Thread(target=lambda: None)")
    client.stop_channels()
    snap = a.call("POST", f"/api/ckpt/kernels/{kernel_id}/snapshots", {"label": "before the crash"})
    while snap["status"] not in ("complete", "failed"):
        time.sleep(0.05)
        snap = a.call("GET", f"/api/ckpt/snapshots/{snap['id']}")
    assert snap["status"] == "complete"
    a.kill()
    return kernel_id, snap["id"]


@pytest.mark.timeout(240)
def test_restore_after_restart_starts_the_kernel_again_for_its_notebook(tmp_path):
    kernel_id, snapshot_id = first_run(tmp_path)
    b = Server(tmp_path)
    try:
        listed = b.call("GET", "/api/ckpt/snapshots")
        assert [s["id"] for s in listed] == [snapshot_id]
        assert listed[0]["path"] == "work/analysis.ipynb"
        assert b.call("GET", "/api/kernels") == []
        outcome = b.call("POST", f"/api/ckpt/snapshots/{snapshot_id}/restore", {"mode": "replace"})
        assert outcome["kernel_id"] == kernel_id
        sessions = b.call("GET", "/api/sessions")
        assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("work/analysis.ipynb", kernel_id)]
        client = b.client(kernel_id)
        assert value(client, "x") == "'from the first run'"
        # The recovered kernel can snapshot itself: its credential survived the restart.
        assert "Snapshot" in value(client, "str(__import__('jupyter_ckpt').checkpoint('after recovery'))")
        client.stop_channels()
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_resume_kernels_at_start(tmp_path):
    kernel_id, snapshot_id = first_run(tmp_path)
    b = Server(tmp_path, "--CheckpointApp.resume_kernels=True")
    try:
        for _ in range(300):
            if b.call("GET", "/api/sessions"):
                break
            time.sleep(0.1)
        sessions = b.call("GET", "/api/sessions")
        assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("work/analysis.ipynb", kernel_id)]
        client = b.client(kernel_id)
        assert value(client, "x") == "'from the first run'"
        client.stop_channels()
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_a_fork_comes_back_as_a_fork_after_a_restart(tmp_path):
    """A snapshot of a fork whose server went away: restoring it brings the
    fork back under its own id, in a network namespace of its own again."""
    from jupyter_ckpt import forknet

    a = Server(tmp_path)
    try:
        kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
        client = a.client(kernel_id)
        value(client, "x = 'original'")
        client.stop_channels()
        snap = take(a, kernel_id)
        fork_id = a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"})["kernel_id"]
        forked = a.client(fork_id)
        value(forked, "x = 'the fork'")
        forked.stop_channels()
        fork_snap = take(a, fork_id)
    finally:
        a.kill()
    forknet.remove_stale(in_use=set())  # as the next server does at start

    b = Server(tmp_path)
    try:
        outcome = b.call("POST", f"/api/ckpt/snapshots/{fork_snap['id']}/restore", {"mode": "replace"})
        assert outcome["kernel_id"] == fork_id and outcome["mode"] == "new"
        client = b.client(fork_id)
        assert value(client, "x") == "'the fork'"
        assert client.transport == "tcp" and client.ip.startswith("10.213.")
        client.stop_channels()
    finally:
        b.kill()
        forknet.remove_stale(in_use=set())


def take(server: Server, kernel_id: str) -> dict:
    snap = server.call("POST", f"/api/ckpt/kernels/{kernel_id}/snapshots", {})
    while snap["status"] not in ("complete", "failed"):
        time.sleep(0.05)
        snap = server.call("GET", f"/api/ckpt/snapshots/{snap['id']}")
    assert snap["status"] == "complete", snap
    return snap
