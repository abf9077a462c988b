"""Faults during an operation: criu killed, a full disk, a store on another
filesystem. The kernel keeps running, what was saved stays, nothing is left
behind (processes, network locks, mapped or open files)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest

from .client import api, restore, snapshot, wait_for_snapshot
from .servers import cmdline, descendants, running

pytestmark = pytest.mark.criu


def criu_tables() -> list[str]:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if "CRIU-" in line]


async def test_criu_killed_while_the_kernel_is_frozen(jp_fetch, start_kernel, jp_serverapp):
    """SIGKILL of criu mid-dump: the snapshot fails with a reason, CRIU's
    nftables lock is removed, and the kernel answers on its old connections."""
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(0).random(128_000_000); x = 'alive'")
    others = set(criu_tables())  # another program's dump, not ours
    km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    first_init = km.provisioner.tree.init_pid
    status, snap = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 202
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        # Our criu ("criu: dump --rpc -t PID" while it dumps), once it has
        # locked the network: the tree is frozen then.
        dumpers = [pid for pid in descendants(os.getpid()) if " ".join(cmdline(pid)).startswith("criu: dump")]
        if dumpers and set(criu_tables()) - others:
            break
        assert loop.time() < deadline, "criu never locked the network"
        await asyncio.sleep(0.005)
    for pid in dumpers:
        os.kill(pid, signal.SIGKILL)
    done = await wait_for_snapshot(jp_fetch, snap["id"])
    assert done["status"] == "failed" and "criu stopped during the dump" in done["error"], done
    assert set(criu_tables()) == others

    # The same websocket, the same kernel: it runs on. Unless the kill caught
    # CRIU's parasite code inside it (it cannot clean up after a criu that is
    # gone): then the kernel dies, and the server restarts it (README, Limits).
    def init_pid() -> int:
        return jp_serverapp.kernel_manager.get_kernel(kernel_id).provisioner.tree.init_pid

    deadline = loop.time() + 30
    while init_pid() == first_init and not running(first_init):
        assert loop.time() < deadline, "the kernel died and was not restarted"
        await asyncio.sleep(0.1)
    if init_pid() != first_init:
        print("the kernel died with criu (its parasite was inside it); the server restarted it")
        await sock.wait_ready()
        run = await sock.finish(await sock.send_execute("x"), timeout=20)
        assert run.status == "error" and "NameError" in run.error
    else:
        assert await sock.value("x", timeout=20) == "'alive'"
    again = await snapshot(jp_fetch, kernel_id)  # and it can be snapshotted again
    assert again["status"] == "complete"


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem of its own (a full disk, another device), unmounted after."""
    mounted = []

    def mount(name: str, size: str):
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def used_bytes(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class TestFullDisk:
    @pytest.fixture
    def jp_server_config(self, tmp_path, tmpfs):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {
                "store_root": str(tmp_path / "store"),
                # Room for the dump of the kernel below, not for storing it too.
                "store_state_dir": str(tmpfs("state", "260m")),
            },
        }

    async def test_a_disk_that_fills_while_storing_is_freed_and_the_next_snapshot_works(
        self, jp_fetch, jp_serverapp, start_kernel, tmp_path
    ):
        state = tmp_path / "state"
        kernel_id, sock = await start_kernel()
        kept = await snapshot(jp_fetch, kernel_id, label="small, before")
        await sock.execute("import numpy as np; a = np.random.default_rng(1).random(19_000_000); x = 'alive'")
        idle = used_bytes(state)
        status, snap = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
        done = await wait_for_snapshot(jp_fetch, snap["id"])
        assert done["status"] == "failed" and "No space left" in done["error"], done
        # The staged images are gone from the disk, and from the server's memory
        # maps and open files: their space is free again.
        assert used_bytes(state) < idle + (8 << 20), (used_bytes(state), idle)
        held = []
        for link in os.listdir("/proc/self/fd"):
            target = os.readlink(f"/proc/self/fd/{link}") if os.path.islink(f"/proc/self/fd/{link}") else ""
            held.append(target)
        with open("/proc/self/maps") as f:
            held += [line.split(maxsplit=5)[-1] for line in f if str(state) in line]
        assert not [h for h in held if str(state) in h and "(deleted)" in h], held
        assert await sock.value("x") == "'alive'"
        await sock.execute("del a")
        again = await snapshot(jp_fetch, kernel_id)  # room again: it works without a restart
        await restore(jp_fetch, kept["id"])  # and what was saved before is intact
        assert await sock.value("'x' in dir()") == "False"
        assert again["status"] == "complete"


class TestStoreOnAnotherFilesystem:
    @pytest.fixture
    def jp_server_config(self, tmp_path, tmpfs):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {
                "store_root": str(tmpfs("store", "512m") / "ckpt"),
                "store_state_dir": str(tmp_path / "state"),
            },
        }

    async def test_snapshot_and_restore_with_the_store_on_another_device(self, jp_fetch, start_kernel, tmp_path):
        assert os.stat(tmp_path / "store").st_dev != os.stat(tmp_path / "state").st_dev
        kernel_id, sock = await start_kernel()
        await sock.execute("x = 'first'")
        snap = await snapshot(jp_fetch, kernel_id)
        assert list((tmp_path / "store" / "ckpt" / "packs").glob("*.pack"))
        await sock.execute("x = 'second'")
        await restore(jp_fetch, snap["id"])
        assert await sock.value("x") == "'first'"
