"""CheckpointApp.store_quota_bytes: once the store holds its quota, a snapshot
(and an upload) is refused with a clear error (507), the kernel keeps running,
and deleting snapshots makes room again."""

from __future__ import annotations

import pytest

from .client import api, snapshot

pytestmark = pytest.mark.criu

QUOTA = 1  # byte: the first snapshot fills it


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root), "store_quota_bytes": QUOTA},
    }


async def test_a_full_store_refuses_snapshots_until_room_is_made(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    first = await snapshot(jp_fetch, kernel_id, "fills the quota")
    assert first["stored_bytes"] >= QUOTA

    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={})
    assert status == 507, body
    assert "the snapshot store is full" in body["message"]
    assert f"{first['stored_bytes'] / 2**20:.1f} MiB" in body["message"]
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "bundles", body={})
    assert status == 507, body
    assert await sock.value("40 + 2") == "42"  # the kernel runs on

    status, _ = await api(jp_fetch, "DELETE", "api", "ckpt", "snapshots", first["id"])
    assert status == 204
    await snapshot(jp_fetch, kernel_id, "room again")
