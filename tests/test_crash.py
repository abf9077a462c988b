"""A server killed with SIGKILL in the middle of a snapshot leaves the store
consistent: nothing half-written is listed as restorable, and gc reclaims what
the interrupted snapshot had stored."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from jupyter_ckpt.store import SnapshotStore

from .conftest import needs_root

pytestmark = needs_root
TOKEN = "crash-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60, host: str = "127.0.0.1") -> dict:
    req = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=json.dumps(body or {}).encode() if method != "GET" else None,
        method=method,
        headers={"Authorization": f"token {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def descendants(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    out += [child, *descendants(child)]
        except OSError:
            pass
    return out


@pytest.fixture
def server(tmp_path):
    port, store = free_port(), tmp_path / "store"
    (tmp_path / "root").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path / 'root'}",
         "--ServerApp.jpserver_extensions=jupyter_ckpt=True", f"--CheckpointApp.store_root={store}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), HOME=str(tmp_path)),
    )
    for _ in range(200):
        try:
            call(port, "GET", "/api/ckpt/status", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield proc, port, store
    for pid in [*descendants(proc.pid), proc.pid] if proc.poll() is None else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.parametrize("kill_while", ["dumping", "storing"])
def test_sigkill_mid_snapshot_leaves_store_consistent(server, kill_while):
    proc, port, store = server
    kernel = call(port, "POST", "/api/kernels", {"name": "python3"})
    code = "import numpy as np; a = np.random.default_rng(0).random(50_000_000)"  # 400 MB
    # Run the code through a client of its own, then snapshot from another thread.
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient()
    client.load_connection_file(str(store.parent / "runtime" / f"kernel-{kernel['id']}.json"))
    client.start_channels()
    client.wait_for_ready(timeout=60)
    assert client.execute_interactive(code, timeout=120)["content"]["status"] == "ok"
    client.stop_channels()
    kernel_tree = descendants(proc.pid)

    import threading

    def take_snapshot() -> None:
        try:
            call(port, "POST", f"/api/ckpt/kernels/{kernel['id']}/snapshots", timeout=120)
        except OSError:
            pass  # the server is killed under it

    threading.Thread(target=take_snapshot, daemon=True).start()
    records = store / "state" / "records"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [json.loads(p.read_text()) for p in records.glob("*.json")] if records.exists() else []
        # "storing": wait until some chunks are in the store, so the kill leaves
        # stored packs that no manifest refers to.
        packs = list((store / "packs").glob("*.pack")) if kill_while == "storing" else [True]
        if any(r["status"] == kill_while for r in found) and packs:
            break
        time.sleep(0.005)
    else:
        pytest.fail(f"the snapshot never reached {kill_while}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in kernel_tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    reopened = SnapshotStore(store)
    assert reopened.recover() != []  # what the next server start does
    listed = reopened.list()
    assert listed and all(not r.restorable for r in listed)
    assert all(r.status == "failed" and "server stopped" in r.error for r in listed)
    assert not any((store / "state" / "staging").iterdir())
    deleted, freed = reopened.gc()
    if kill_while == "storing":
        assert deleted > 0 and freed > 10 * 2**20
    assert not list((store / "packs").glob("*.pack"))  # nothing stored survives unreferenced
    reopened.close()
