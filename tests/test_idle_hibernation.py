"""CheckpointApp.hibernate_idle_after: a kernel idle that long hibernates on
its own, and the next cell wakes it (real server, kernel and CRIU)."""

from __future__ import annotations

import asyncio

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


class TestTheCuller:
    """jupyter_server's own culler with idle hibernation on: it hibernates the
    kernels it would shut down, leaves busy ones running even with cull_busy,
    and culls as before a kernel that cannot be snapshotted."""

    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "MappingKernelManager": {
                "cull_idle_timeout": 2,
                "cull_interval": 1,
                "cull_busy": True,
                "cull_connected": True,
            },
            # On, so that the culler hibernates; too long to hibernate anything by itself here.
            "CheckpointApp": {"store_root": str(store_root), "hibernate_idle_after": 3600},
        }

    async def test_idle_hibernated_busy_left_running_unsnapshottable_culled(
        self, jp_fetch, stock_kernelspec, start_kernel, events, tmp_path
    ):
        idle_id, idle = await start_kernel()
        busy_id, busy = await start_kernel()
        stuck_id, stuck = await start_kernel(stock_kernelspec)  # cannot be snapshotted
        run = await busy.send_execute(
            f"import os, time\nwhile not os.path.exists({str(tmp_path / 'stop')!r}):\n    time.sleep(0.05)\nprint('done')"
        )
        try:
            await events.wait_for(
                lambda evs: any(e["action"] == "hibernated" and e.get("kernel_id") == idle_id for e in evs), timeout=60
            )

            async def culled():
                status, kernels = await api(jp_fetch, "GET", "api", "kernels")
                return stuck_id not in {k["id"] for k in kernels}

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not await culled():
                seen = [
                    (e["action"], e.get("kernel_id") == stuck_id, e.get("message", "")[:150]) for e in events.events
                ]
                assert loop.time() < deadline, f"the kernel that cannot be snapshotted was never culled: {seen}"
                await asyncio.sleep(0.2)
            # The busy kernel has been silent past cull_idle_timeout for two culler rounds.
            quiet_until = loop.time() + 2 + 2 * 1
            while loop.time() < quiet_until:
                await asyncio.sleep(0.2)
            status, info = await api(jp_fetch, "GET", "api", "ckpt", "kernels", busy_id)
            assert status == 200 and info["hibernated"] is False and info["busy"] is False
        finally:
            (tmp_path / "stop").touch()
        await busy.finish(run)
        assert "done" in run.stdout
        assert not [e for e in events.events if e.get("kernel_id") == busy_id and e["action"] == "hibernated"]

    async def test_the_culler_leaves_a_kernel_an_operation_holds(self, jp_serverapp, jp_fetch, start_kernel):
        """A snapshot, restore or wake holds the kernel: this round of the
        culler neither hibernates nor culls it (the next round looks again).
        The culler's own round is driven here by hand, with jupyter_server's
        culling as a stand-in that records what it is asked."""
        manager = jp_serverapp.web_app.settings["ckpt_manager"]
        asked = []

        async def stock_culling(kernel_id):
            asked.append(kernel_id)

        cull = manager.hibernation.culler(stock_culling)
        kernel_id, sock = await start_kernel()
        jp_serverapp.kernel_manager.get_kernel(kernel_id).last_activity -= __import__("datetime").timedelta(hours=1)
        async with manager.claims.hold(kernel_id):
            await cull(kernel_id)
        assert (
            asked == [] and (await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id))[1]["hibernated"] is False
        )
        await cull(kernel_id)  # released: idle for an hour, it is hibernated now
        assert (await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id))[1]["hibernated"] is True
        assert asked == []
