"""A server killed with SIGKILL in the middle of a snapshot leaves the store
consistent: nothing half-written is listed as restorable, and gc reclaims what
the interrupted snapshot had stored."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from jupyter_ckpt.store import SnapshotStore

from .servers import Server, call, descendants

pytestmark = [pytest.mark.criu, pytest.mark.slow]


@pytest.fixture
def server(tmp_path):
    running = Server(tmp_path)
    yield running.proc, running.port, tmp_path / "store"
    running.kill()


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
