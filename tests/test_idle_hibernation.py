"""CheckpointApp.hibernate_idle_after: a kernel idle that long hibernates on
its own, and the next cell wakes it (real server, kernel and CRIU)."""

from __future__ import annotations

import pytest

from .client import api

pytestmark = pytest.mark.criu


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root), "hibernate_idle_after": 1.0, "auto_backup_tick": 0.5},
    }


async def test_an_idle_kernel_hibernates_and_the_next_cell_wakes_it(jp_fetch, start_kernel, events):
    kernel_id, sock = await start_kernel()
    await sock.execute("kept = 'while it slept'")
    await events.wait_for(lambda evs: any(e["action"] == "hibernated" for e in evs), timeout=60)
    status, info = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id)
    assert info["hibernated"] is True
    status, snap = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", info["hibernated_snapshot"])
    assert snap["trigger"] == "hibernate"
    assert await sock.value("kept") == "'while it slept'"
    # Busy kernels are never hibernated: a cell running past the idle time keeps its processes.
    hibernations = len(events.of("hibernated"))
    run = await sock.finish(await sock.send_execute("import time; time.sleep(3); 'done'"))
    assert run.result == "'done'" and len(events.of("hibernated")) == hibernations  # (idle for < 1 s since)
