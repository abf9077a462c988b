"""Hibernation against a real server, real kernels and real CRIU: a kernel put
to disk frees its memory and stays listed; a cell, a websocket or a POST wakes
it with its state; interrupt, restart and shutdown of a hibernated kernel; idle
kernels and the server's culler; a server restart in between."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from .client import KernelSocket, api, snapshot
from .servers import TOKEN, Server, descendants, take, value

pytestmark = pytest.mark.criu

MiB = 2**20


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kernel_pids(jp_serverapp, kernel_id: str) -> list[int]:
    init = jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.tree.init_pid
    return [init, *descendants(init)]


async def info(jp_fetch, kernel_id: str) -> dict:
    status, out = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id)
    assert status == 200, out
    return out


async def hibernate(jp_fetch, kernel_id: str) -> dict:
    status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "hibernate")
    assert status == 200, out
    return out


async def open_notebook(jp_fetch, jp_ws_fetch, path: str) -> tuple[str, KernelSocket]:
    body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}}
    status, session = await api(jp_fetch, "POST", "api", "sessions", body=body)
    assert status == 201, session
    kernel_id = session["kernel"]["id"]
    sock = KernelSocket(await jp_ws_fetch("api", "kernels", kernel_id, "channels"))
    await sock.wait_ready()
    return kernel_id, sock


async def test_a_hibernated_kernel_frees_its_memory_and_a_cell_wakes_it(jp_fetch, jp_ws_fetch, jp_serverapp, events):
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "big.ipynb")
    await sock.execute("import numpy as np, threading\na = np.full(512 * 2**20 // 8, 3.0)\nx = 41")
    pids = kernel_pids(jp_serverapp, kernel_id)
    before = await info(jp_fetch, kernel_id)
    assert before["hibernated"] is False and before["memory_bytes"] > 512 * MiB

    out = await hibernate(jp_fetch, kernel_id)
    assert out["memory_freed_bytes"] > 512 * MiB and out["snapshot_id"]
    assert not any(alive(pid) for pid in pids)  # every process of the tree is gone
    after = await info(jp_fetch, kernel_id)
    assert after["hibernated"] is True and after["hibernated_snapshot"] == out["snapshot_id"]
    assert after["memory_bytes"] == 0
    # Still the server's kernel, with its session.
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert [k["id"] for k in kernels] == [kernel_id]
    status, sessions = await api(jp_fetch, "GET", "api", "sessions")
    assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("big.ipynb", kernel_id)]
    status, snap = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", out["snapshot_id"])
    assert snap["trigger"] == "hibernate" and snap["status"] == "complete"
    # A snapshot of a hibernated kernel is refused: its hibernation snapshot holds it.
    status, refused = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 409 and "hibernated" in refused["message"]
    status, refused = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "hibernate")
    assert status == 409 and "hibernated already" in refused["message"]
    # Its snapshot cannot be deleted while the kernel needs it to wake.
    status, refused = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", out["snapshot_id"])
    assert status == 409 and "holds hibernated kernel" in refused["message"]

    # The same websocket: the cell wakes it and runs with the state it had.
    run = await sock.execute("x + 1, float(a[::4096].sum())", timeout=120)
    assert run.result == f"(42, {512 * 2**20 // 8 // 4096 * 3.0})"
    assert [e["action"] for e in events.events if e["action"] in ("hibernated", "waking", "woken")] == [
        "hibernated",
        "waking",
        "woken",
    ]
    woken = await info(jp_fetch, kernel_id)
    assert woken["hibernated"] is False and woken["memory_bytes"] > 0
    status, refused = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake")
    assert status == 409 and "not hibernated" in refused["message"]


async def test_wake_interrupt_restart_and_shutdown_of_a_hibernated_kernel(
    jp_fetch, jp_ws_fetch, jp_serverapp, store_root
):
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "small.ipynb")
    await sock.execute("y = 'kept'")
    listed = store_root / "state" / "hibernated-kernels.json"

    await hibernate(jp_fetch, kernel_id)
    assert kernel_id in json.loads(listed.read_text())
    # Interrupt: nothing runs, nothing to stop; it stays on disk.
    status, _ = await api(jp_fetch, "POST", "api", "kernels", kernel_id, "interrupt")
    assert status == 204 and (await info(jp_fetch, kernel_id))["hibernated"] is True
    # Wake on request.
    status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake")
    assert status == 200 and out["kernel_id"] == kernel_id, out
    assert await sock.value("y") == "'kept'"
    assert kernel_id not in json.loads(listed.read_text())

    # Restart: a fresh kernel, not the hibernated one.
    await hibernate(jp_fetch, kernel_id)
    status, _ = await api(jp_fetch, "POST", "api", "kernels", kernel_id, "restart")
    assert status == 200
    await sock.wait_ready()
    run = await sock.finish(await sock.send_execute("y"))
    assert run.status == "error" and "NameError" in run.error
    assert (await info(jp_fetch, kernel_id))["hibernated"] is False
    assert kernel_id not in json.loads(listed.read_text())

    # Shutdown: removed without being woken.
    await sock.execute("z = 1")
    out = await hibernate(jp_fetch, kernel_id)
    status, _ = await api(jp_fetch, "DELETE", "api", "kernels", kernel_id)
    assert status == 204
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert kernels == []
    assert kernel_id not in json.loads(listed.read_text())
    status, snap = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", out["snapshot_id"])
    assert status == 200 and snap["status"] == "complete"  # the snapshot stays, restorable
    status, refused = await api(jp_fetch, "POST", "api", "ckpt", "kernels", "no-such-kernel", "wake")
    assert status == 404


async def test_a_busy_kernel_is_not_hibernated(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    run = await sock.send_execute("import time; time.sleep(6); 'finished'")
    for _ in range(100):  # until the server has seen it busy
        if (await api(jp_fetch, "GET", "api", "kernels", kernel_id))[1]["execution_state"] == "busy":
            break
        await asyncio.sleep(0.05)
    status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "hibernate")
    assert status == 409 and "running a cell" in out["message"], out
    await sock.finish(run)
    assert run.result == "'finished'"  # it ran on, once
    assert (await info(jp_fetch, kernel_id))["hibernated"] is False


async def test_a_restore_into_a_hibernated_kernel(jp_fetch, jp_ws_fetch):
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "r.ipynb")
    await sock.execute("v = 'first'")
    first = await snapshot(jp_fetch, kernel_id)
    await sock.execute("v = 'second'")
    await hibernate(jp_fetch, kernel_id)
    status, out = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", first["id"], "restore", body={"mode": "replace"}
    )
    assert status == 200, out
    assert await sock.value("v") == "'first'"
    assert (await info(jp_fetch, kernel_id))["hibernated"] is False


async def run_over_websocket(server: Server, kernel_id: str, code: str) -> str | None:
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))
    try:
        return await KernelSocket(ws).value(code, timeout=120)
    finally:
        ws.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hibernated_kernels_survive_a_server_restart_and_idle_ones_hibernate(tmp_path):
    # The server's culler would shut idle kernels down after 3 s; with
    # hibernate_idle_after set, it hibernates them instead (and so does our own
    # idle check, at 3600 s here, so the culler is what acts).
    culling = [
        "--CheckpointApp.hibernate_idle_after=3600",
        "--MappingKernelManager.cull_idle_timeout=3",
        "--MappingKernelManager.cull_interval=1",
    ]
    a = Server(tmp_path, *culling)
    try:
        body = {"path": "long.ipynb", "name": "long.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        kernel_id = a.call("POST", "/api/sessions", body)["kernel"]["id"]
        client = a.client(kernel_id)
        value(client, "import threading; w = 'state of the first run'")
        client.stop_channels()
        # A fork of it, in a network namespace of its own, hibernates too.
        snap = take(a, kernel_id)
        fork_id = a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120)["kernel_id"]
        for _ in range(300):
            if all(a.call("GET", f"/api/ckpt/kernels/{k}")["hibernated"] for k in (kernel_id, fork_id)):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the culler did not hibernate the idle kernels")
        assert sorted(k["id"] for k in a.call("GET", "/api/kernels")) == sorted([kernel_id, fork_id])  # not culled
        a.stop()
        b = Server(tmp_path)
        try:
            # Listed again by the extension's start, which runs once the server serves.
            # (Not polled through /api/kernels: jupyter_server answers it 500
            # while a kernel is being registered.)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if all(b.call("GET", f"/api/ckpt/kernels/{k}")["hibernated"] for k in (kernel_id, fork_id)):
                        break
                except OSError:
                    pass  # not listed yet (404)
                assert time.monotonic() < deadline, "the hibernated kernels were not listed again"
                time.sleep(0.1)
            assert sorted(k["id"] for k in b.call("GET", "/api/kernels")) == sorted([kernel_id, fork_id])
            assert [(s["path"], s["kernel"]["id"]) for s in b.call("GET", "/api/sessions")] == [
                ("long.ipynb", kernel_id)
            ]
            assert b.call("GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"] is True
            # Used (a notebook's websocket sends a cell): it wakes, and the cell sees its state.
            assert asyncio.run(run_over_websocket(b, kernel_id, "w")) == "'state of the first run'"
            assert b.call("GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"] is False
            # The fork wakes with its state, in a fresh fork namespace (the
            # old one went with the first server), not the host's.
            assert b.call("GET", f"/api/ckpt/kernels/{fork_id}")["hibernated"] is True
            assert asyncio.run(run_over_websocket(b, fork_id, "w")) == "'state of the first run'"
            net = asyncio.run(run_over_websocket(b, fork_id, "import os; os.stat('/proc/self/ns/net').st_ino"))
            assert int(net) != os.stat("/proc/self/ns/net").st_ino
            forks = {
                os.stat(f"/run/netns/{n}").st_ino: n for n in os.listdir("/run/netns") if n.startswith("ckpt-fork-")
            }
            assert int(net) in forks, (net, forks)
        finally:
            b.kill()
    finally:
        a.kill()


async def test_each_hibernation_replaces_the_last_and_a_failed_wake_keeps_it_on_disk(
    jp_fetch, jp_ws_fetch, events, start_kernel
):
    """A second hibernation drops the first one's snapshot; a wake that fails
    (a port the kernel listened on is taken) says why
    in `wake_failed` and leaves the kernel on disk, woken once the port is free."""
    import socket

    kernel_id, sock = await start_kernel()
    await sock.execute(
        "import socket; srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(); "
        "port = srv.getsockname()[1]; x = 1"
    )
    port = int(await sock.value("port"))
    first = await hibernate(jp_fetch, kernel_id)
    status, _ = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake")
    assert status == 200
    second = await hibernate(jp_fetch, kernel_id)
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", kernel_id=kernel_id)
    assert [s["id"] for s in listed if s["trigger"] == "hibernate"] == [second["snapshot_id"]]
    assert first["snapshot_id"] not in {s["id"] for s in listed}

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        status, out = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake")
        assert status == 500 and "Address already in use" in out["message"], out
        failed = await events.wait_for_action("wake_failed", kernel_id=kernel_id)
        assert "Address already in use" in failed["message"]
        assert (await info(jp_fetch, kernel_id))["hibernated"] is True
    finally:
        squatter.close()
    status, _ = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake")
    assert status == 200
    sock = KernelSocket(await jp_ws_fetch("api", "kernels", kernel_id, "channels"))
    await sock.wait_ready()
    assert await sock.value("x") == "1"


async def test_a_restart_during_a_wake_wins(jp_fetch, jp_ws_fetch, events):
    kernel_id, sock = await open_notebook(jp_fetch, jp_ws_fetch, "big-wake.ipynb")
    await sock.execute("import numpy as np; a = np.random.default_rng(7).random(48_000_000); y = 'old'")  # 384 MB
    await hibernate(jp_fetch, kernel_id)
    waking = asyncio.ensure_future(api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "wake"))
    await events.wait_for_action("waking", kernel_id=kernel_id)
    status, _ = await api(jp_fetch, "POST", "api", "kernels", kernel_id, "restart")
    assert status == 200
    status, out = await waking
    # The wake gives way (409) when the restart comes before CRIU restores; a
    # restart that comes later replaces the woken kernel. Either way: fresh.
    assert status == 200 or (status == 409 and "the wake gave way" in out["message"]), out
    await sock.wait_ready()
    run = await sock.finish(await sock.send_execute("y"))
    assert run.status == "error" and "NameError" in run.error  # the fresh kernel of the restart
    assert (await info(jp_fetch, kernel_id))["hibernated"] is False
    assert not [e for e in events.of("wake_failed") if e.get("kernel_id") == kernel_id]  # nothing "stays on disk"
