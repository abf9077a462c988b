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


def busy_until(stop_file) -> str:
    """A cell that stays busy until the test creates ``stop_file``."""
    return f"import os, time\nwhile not os.path.exists({str(stop_file)!r}):\n    time.sleep(0.05)\nprint('done')"


def ids(events, action: str, kernel_id: str) -> list[str]:
    return [e["snapshot_id"] for e in events.of(action) if e.get("kernel_id") == kernel_id]


async def all_ended(events, kernel_id: str) -> None:
    """Until every snapshot of the kernel that started has completed or failed."""
    await events.wait_for(
        lambda evs: (
            set(ids(events, "started", kernel_id))
            <= set(ids(events, "completed", kernel_id)) | set(ids(events, "failed", kernel_id))
        ),
        timeout=60,
    )


async def until(condition, timeout: float = 60):
    """Until the async ``condition()`` is true (returned); TimeoutError past ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := await condition()):
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.1)
    return result


async def test_busy_kernel_is_backed_up_and_retention_applies(jp_fetch, events, start_kernel, tmp_path):
    kernel_id, sock = await start_kernel()
    run = await sock.send_execute(busy_until(tmp_path / "stop"))
    # Four taken while busy (keep = 2): at least two pruned.
    await events.wait_for(lambda evs: len(ids(events, "completed", kernel_id)) >= 4, timeout=60)
    await api(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body={"enabled": False})
    (tmp_path / "stop").touch()
    await sock.finish(run, timeout=30)
    assert "done" in run.stdout
    await all_ended(events, kernel_id)

    async def retained():
        autos = [s for s in await auto_snapshots(jp_fetch, kernel_id) if s["status"] == "complete"]
        return autos if len(autos) <= 2 else None

    kept = await until(retained)
    completed = ids(events, "completed", kernel_id)
    # The newest two are kept, every older one was pruned (ids sort by time).
    assert sorted(s["id"] for s in kept) == sorted(completed)[-2:]
    assert set(ids(events, "pruned", kernel_id)) == set(sorted(completed)[:-2])


async def test_idle_kernel_is_not_snapshotted_again(jp_fetch, events, start_kernel, tmp_path):
    idle_id, idle = await start_kernel()
    # A busy kernel as the clock: auto snapshots run one at a time, each at
    # least an interval after its kernel's previous one, and the loop looks at
    # every kernel on each tick.
    clock_id, clock = await start_kernel()
    run = await clock.send_execute(busy_until(tmp_path / "stop"))
    try:
        await events.wait_for(lambda evs: ids(events, "completed", idle_id), timeout=60)
        ticks = len(ids(events, "started", clock_id))
        # Three more of the clock kernel: the idle one was due at least twice meanwhile.
        await events.wait_for(lambda evs: len(ids(events, "started", clock_id)) >= ticks + 3, timeout=60)
        assert len(ids(events, "started", idle_id)) == 1  # idle since its snapshot: skipped
        assert len(await auto_snapshots(jp_fetch, idle_id)) == 1
        await idle.execute("x = 1")  # a change: backed up again
        await events.wait_for(lambda evs: len(ids(events, "completed", idle_id)) == 2, timeout=60)
    finally:
        (tmp_path / "stop").touch()
    await clock.finish(run, timeout=30)


async def test_schedule_endpoints(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "schedule")
    assert status == 200 and schedule == {"enabled": True, "interval_seconds": 1.0, "keep": 2}
    status, schedule = await api(
        jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body={"enabled": False, "keep": 7}
    )
    assert status == 200 and schedule == {"enabled": False, "interval_seconds": 1.0, "keep": 7}
    for bad in ({"interval_seconds": 0}, {"keep": "x"}, {"enabled": "yes"}, {"colour": 1}):
        status, body = await api(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body=bad)
        assert status == 400, bad
    status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id, "schedule")
    assert schedule == {"enabled": False, "interval_seconds": 1.0, "keep": 7}  # refused changes changed nothing
    status, _ = await api(jp_fetch, "GET", "api", "ckpt", "kernels", "00000000-0000-0000-0000-000000000000", "schedule")
    assert status == 404


async def test_a_disabled_schedule_takes_nothing_even_from_a_busy_kernel(jp_fetch, events, start_kernel, tmp_path):
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
    # Enabled again, with keep = 1 (the server's is 2): the busy cell is backed
    # up, and only its newest automatic snapshot is kept.
    await api(jp_fetch, *put, body={"enabled": True, "keep": 1})
    run = await sock.send_execute(busy_until(tmp_path / "stop"))
    await events.wait_for(lambda evs: len(set(ids(events, "completed", kernel_id)) - before) >= 3, timeout=60)
    await api(jp_fetch, *put, body={"enabled": False})
    (tmp_path / "stop").touch()
    await sock.finish(run)
    await all_ended(events, kernel_id)

    async def retained():
        autos = [s for s in await auto_snapshots(jp_fetch, kernel_id) if s["status"] == "complete"]
        return autos if len(autos) <= 1 else None

    kept = await until(retained)
    assert [s["id"] for s in kept] == sorted(ids(events, "completed", kernel_id))[-1:]


class TestServerWideSettings:
    """auto_backup = False and auto_backup_concurrency, on a server of their own."""

    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {
                "store_root": str(store_root),
                "auto_backup": False,
                "auto_backup_interval": 1.0,
                "auto_backup_tick": 0.2,
                "auto_backup_concurrency": 1,
            },
        }

    async def test_off_by_default_on_where_enabled_and_one_at_a_time(self, jp_fetch, events, start_kernel, tmp_path):
        kernels = [await start_kernel() for _ in range(3)]
        status, schedule = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernels[0][0], "schedule")
        assert schedule["enabled"] is False  # auto_backup = False
        runs = [await sock.send_execute(busy_until(tmp_path / "stop")) for _, sock in kernels]
        try:
            # The first two enabled by hand; the third keeps the server's default.
            for kernel_id, _ in kernels[:2]:
                await api(jp_fetch, "PUT", "api", "ckpt", "kernels", kernel_id, "schedule", body={"enabled": True})
            await events.wait_for(
                lambda evs: all(len(ids(events, "completed", k)) >= 3 for k, _ in kernels[:2]), timeout=90
            )
        finally:
            (tmp_path / "stop").touch()
        for (_, sock), run in zip(kernels, runs, strict=True):
            await sock.finish(run)
        assert ids(events, "started", kernels[2][0]) == []
        assert await auto_snapshots(jp_fetch, kernels[2][0]) == []
        # auto_backup_concurrency = 1: each one ended before the next began.
        running = set()
        for e in events.events:
            if e["action"] == "started":
                assert not running, f"{e['snapshot_id']} started while {running} ran"
                running.add(e["snapshot_id"])
            elif e["action"] in ("completed", "failed"):
                running.discard(e["snapshot_id"])
