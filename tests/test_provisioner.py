"""The provisioner: kernels run isolated, and interrupt, restart and shutdown
work as with the stock provisioner, before and after a restore."""

from __future__ import annotations

import asyncio
import os

import pytest

from jupyter_ckpt.provisioner import CheckpointableProvisioner

from .client import api, restore, snapshot

pytestmark = pytest.mark.criu


def provisioner(jp_serverapp, kernel_id) -> CheckpointableProvisioner:
    return jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner


def process_state(pid: int) -> str | None:
    """'R', 'S', 'Z' (zombie) ... or None once the pid is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def restored_kernel(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 1")
    await restore(jp_fetch, (await snapshot(jp_fetch, kernel_id))["id"])
    return kernel_id, sock


@pytest.mark.parametrize("restored", [False, True], ids=["launched", "restored"])
async def test_kernel_runs_in_its_own_pid_namespace(jp_fetch, jp_serverapp, start_kernel, restored):
    kernel_id, sock = await (restored_kernel(jp_fetch, start_kernel) if restored else start_kernel())
    prov = provisioner(jp_serverapp, kernel_id)
    assert isinstance(prov, CheckpointableProvisioner) and prov.checkpointable
    assert os.readlink(f"/proc/{prov.tree.init_pid}/exe").endswith("tini")
    # The kernel is a child of the namespace's init (pid 1), and its /proc is the namespace's.
    assert await sock.value("import os; os.getppid()") == "1"
    assert await sock.value("open('/proc/self/stat').read().split()[0] == str(os.getpid())") == "True"
    # Its /dev/shm is a tmpfs of its own, not the host's.
    host_shm = os.stat("/dev/shm").st_dev
    assert await sock.value(f"os.path.ismount('/dev/shm') and os.stat('/dev/shm').st_dev != {host_shm}") == "True"
    assert await sock.value("import os; 'JPY_PARENT_PID' in os.environ") == "False"


@pytest.mark.parametrize("restored", [False, True], ids=["launched", "restored"])
async def test_interrupt(jp_fetch, start_kernel, restored):
    kernel_id, sock = await (restored_kernel(jp_fetch, start_kernel) if restored else start_kernel())
    run = await sock.send_execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    await sock.wait_until(lambda: "sleeping" in run.stdout)
    status, _ = await api(jp_fetch, "POST", "api", "kernels", kernel_id, "interrupt")
    assert status == 204
    await sock.finish(run, timeout=20)
    assert run.status == "error" and run.error.startswith("KeyboardInterrupt")
    assert await sock.value("'still alive'") == "'still alive'"


@pytest.mark.parametrize("restored", [False, True], ids=["launched", "restored"])
async def test_restart(jp_fetch, jp_serverapp, start_kernel, restored):
    kernel_id, sock = await (restored_kernel(jp_fetch, start_kernel) if restored else start_kernel())
    await sock.execute("y = 5")
    old_init = provisioner(jp_serverapp, kernel_id).tree.init_pid
    status, _ = await api(jp_fetch, "POST", "api", "kernels", kernel_id, "restart")
    assert status == 200
    await sock.wait_ready()
    run = await sock.finish(await sock.send_execute("y"), timeout=60)
    assert run.error and run.error.startswith("NameError")
    assert process_state(old_init) is None  # the old tree is gone and reaped
    new_init = provisioner(jp_serverapp, kernel_id).tree.init_pid
    assert new_init != old_init
    # The restarted kernel can be snapshotted and restored too.
    await sock.execute("y = 6")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("y = 7")
    await restore(jp_fetch, snap["id"])
    assert await sock.value("y") == "6"


@pytest.mark.parametrize("restored", [False, True], ids=["launched", "restored"])
async def test_shutdown_leaves_no_process(jp_fetch, jp_serverapp, start_kernel, restored):
    kernel_id, sock = await (restored_kernel(jp_fetch, start_kernel) if restored else start_kernel())
    init_pid = provisioner(jp_serverapp, kernel_id).tree.init_pid
    status, _ = await api(jp_fetch, "DELETE", "api", "kernels", kernel_id)
    assert status == 204
    for _ in range(100):
        if process_state(init_pid) is None:
            break
        await asyncio.sleep(0.1)
    assert process_state(init_pid) is None  # neither running nor a zombie


async def test_kernel_output_reaches_server_output_after_restore(jp_fetch, start_kernel, capfd):
    kernel_id, sock = await start_kernel()
    await sock.execute("import os; os.write(1, b'marker-before\\n'); os.write(2, b'err-before\\n')")
    await restore(jp_fetch, (await snapshot(jp_fetch, kernel_id))["id"])
    await sock.execute("os.write(1, b'marker-after\\n'); os.write(2, b'err-after\\n')")
    await asyncio.sleep(0.2)  # the copy thread
    out, err = capfd.readouterr()
    assert "marker-before" in out and "marker-after" in out
    assert "err-before" in err and "err-after" in err


async def test_a_kernelspec_that_names_another_provisioner_keeps_it(jp_fetch, stock_kernelspec, start_kernel):
    """use_provisioner_by_default applies to kernelspecs that name none: one
    naming the stock provisioner gets it (no monkeypatching: the spec says so)."""
    kernel_id, sock = await start_kernel(stock_kernelspec)
    status, info = await api(jp_fetch, "GET", "api", "ckpt", "kernels", kernel_id)
    assert status == 200 and info["checkpointable"] is False
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 409 and "LocalProvisioner" in body["message"]
    # A spec naming none gets ckpt-provisioner.
    default_id, _ = await start_kernel()
    assert (await api(jp_fetch, "GET", "api", "ckpt", "kernels", default_id))[1]["checkpointable"] is True
    assert await sock.value("1 + 1") == "2"
