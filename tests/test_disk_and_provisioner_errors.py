"""Error paths of the environment: a full disk, and a kernel CRIU cannot handle
because another provisioner started it."""

from __future__ import annotations

import subprocess

import pytest

from .client import api, restore, snapshot, wait_for_snapshot

pytestmark = pytest.mark.criu


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 MiB file system under the store: it fills up for real."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def jp_server_config(request, tmp_path):
    config = {"ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}}, "CheckpointApp": {}}
    if "small_disk" in request.fixturenames:
        config["CheckpointApp"]["store_root"] = str(request.getfixturevalue("small_disk") / "ckpt")
    else:
        config["CheckpointApp"]["store_root"] = str(tmp_path / "store")
        config["CheckpointApp"]["use_provisioner_by_default"] = False
    return config


async def test_full_disk_fails_the_snapshot_and_keeps_everything_else(jp_fetch, start_kernel, small_disk):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 'small'")
    saved = await snapshot(jp_fetch, kernel_id)  # fits
    await sock.execute("import numpy as np; big = np.random.default_rng(0).random(20_000_000)")  # 160 MB
    status, started = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 202
    failed = await wait_for_snapshot(jp_fetch, started["id"])
    assert failed["status"] == "failed"
    assert "no space left" in failed["error"].lower(), failed["error"]
    # The kernel runs on, the disk is usable again, the earlier snapshot is intact.
    assert await sock.value("round(float(big[:10].sum()), 3) > 0") == "True"
    assert not any((small_disk / "ckpt" / "state" / "staging").iterdir())
    await sock.execute("del big; x = 'changed'")
    await restore(jp_fetch, saved["id"])
    assert await sock.value("x") == "'small'"


async def test_kernel_from_another_provisioner_is_refused_with_what_to_do(jp_fetch, start_kernel, monkeypatch):
    from jupyter_client.provisioning import KernelProvisionerFactory

    # The factory is a process-wide singleton that servers of earlier tests set;
    # a server started with use_provisioner_by_default=False leaves it as is.
    monkeypatch.setattr(KernelProvisionerFactory.instance(), "default_provisioner_name", "local-provisioner")
    kernel_id, sock = await start_kernel()
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 409
    assert "LocalProvisioner" in body["message"] and "ckpt-provisioner" in body["message"]
    assert await sock.value("1 + 1") == "2"


class TestSharedDevShm:
    @pytest.fixture
    def jp_server_config(self, tmp_path):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {"store_root": str(tmp_path / "store")},
            "CheckpointableProvisioner": {"private_shm": False},
        }

    async def test_private_shm_false_shares_the_hosts(self, jp_fetch, start_kernel, tmp_path):
        import os
        import uuid

        name = f"ckpt-test-{uuid.uuid4().hex}"
        with open(f"/dev/shm/{name}", "w") as f:
            f.write("host")
        try:
            kernel_id, sock = await start_kernel()
            assert await sock.value(f"open('/dev/shm/{name}').read()") == "'host'"
            host_device = os.stat("/dev/shm").st_dev
            assert await sock.value("__import__('os').stat('/dev/shm').st_dev") == str(host_device)
        finally:
            os.unlink(f"/dev/shm/{name}")
