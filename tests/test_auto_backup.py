"""Auto-backup ticking on real kernels, busy and idle, with retention."""

from __future__ import annotations

import asyncio

import pytest

from .client import api

pytestmark = pytest.mark.criu
SCHEMA = "https://events.jupyter.org/jupyter_ckpt/snapshot/v1"


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {
            "store_root": str(store_root),
            "auto_backup_interval": 1.0,
            "auto_backup_tick": 0.2,
            "auto_backup_keep": 2,
        },
    }


async def auto_snapshots(jp_fetch, kernel_id):
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    return [s for s in listed if s["trigger"] == "auto"]


async def test_busy_kernel_is_backed_up_and_retention_applies(jp_fetch, events, start_kernel):
    kernel_id, sock = await start_kernel()
    run = await sock.send_execute("import time\nfor i in range(80):\n    time.sleep(0.1)\nprint('done')")
    await asyncio.sleep(7)
    autos = await auto_snapshots(jp_fetch, kernel_id)
    complete = [s for s in autos if s["status"] == "complete"]
    assert 1 <= len(complete) <= 2  # keep = 2
    assert len(events.of("pruned")) >= 1  # more were taken, and pruned
    assert all(s["kernel_id"] == kernel_id for s in autos)
    await sock.finish(run, timeout=30)
    assert "done" in run.stdout


async def test_idle_kernel_is_not_snapshotted_again(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await asyncio.sleep(2.5)
    first = await auto_snapshots(jp_fetch, kernel_id)
    assert len(first) == 1
    await asyncio.sleep(2.5)
    assert len(await auto_snapshots(jp_fetch, kernel_id)) == 1  # idle since: skipped
    await sock.execute("x = 1")  # a change: backed up again
    await asyncio.sleep(2.5)
    assert len(await auto_snapshots(jp_fetch, kernel_id)) == 2


async def test_schedule_endpoints(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "schedule")
    assert status == 200 and schedule == {"enabled": True, "interval_seconds": 1.0, "keep": 2}
    status, schedule = await api(
        jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body={"enabled": False}
    )
    assert status == 200 and schedule["enabled"] is False
    await asyncio.sleep(1)  # one may have started before it was disabled: let it land
    before = await auto_snapshots(jp_fetch, kernel_id)
    for bad in ({"interval_seconds": 0}, {"keep": "x"}, {"enabled": "yes"}, {"colour": 1}):
        status, body = await api(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body=bad)
        assert status == 400, bad
    status, _ = await api(jp_fetch, "GET", "api", "ckpt", "kernels", "00000000-0000-0000-0000-000000000000", "schedule")
    assert status == 404
    await asyncio.sleep(2)
    assert await auto_snapshots(jp_fetch, kernel_id) == before  # disabled: no new ones


async def test_a_disabled_schedule_takes_nothing_even_from_a_busy_kernel(jp_fetch, events, start_kernel):
    """Busy kernels are never skipped as unchanged: only `enabled` stops their backups."""
    kernel_id, sock = await start_kernel()
    put = ("PUT", "api", "ckpt", "kernels", kernel_id, "schedule")
    status, schedule = await api(jp_fetch, *put, body={"enabled": False})
    assert status == 200 and schedule["enabled"] is False
    await events.wait_for(lambda evs: any(e["action"] == "schedule_changed" for e in evs))
    # Any snapshot begun before the change has ended before the busy cell below starts.
    for s in await auto_snapshots(jp_fetch, kernel_id):
        await events.wait_for(
            lambda evs, s=s: any(
                e.get("snapshot_id") == s["id"] and e["action"] in ("completed", "failed") for e in evs
            )
        )
    before = {s["id"] for s in await auto_snapshots(jp_fetch, kernel_id)}
    # Three seconds busy: at a 1 s interval, an enabled schedule takes two or three.
    await sock.execute("import time; time.sleep(3)", timeout=30)
    assert {s["id"] for s in await auto_snapshots(jp_fetch, kernel_id)} == before
    # Enabled again, the same busy cell is backed up.
    await api(jp_fetch, *put, body={"enabled": True})
    run = await sock.send_execute("import time; time.sleep(4)")
    await events.wait_for(
        lambda evs: any(
            e["action"] == "completed" and e.get("kernel_id") == kernel_id and e.get("snapshot_id") not in before
            for e in evs
        ),
        timeout=30,
    )
    await sock.finish(run)
