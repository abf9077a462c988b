"""Snapshot and restore of live kernels through a real server, real CRIU."""

from __future__ import annotations

import pytest

from .conftest import api, needs_root, restore, snapshot

pytestmark = needs_root


async def test_round_trip_keeps_kernel_id_and_connected_client(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 41")
    snap = await snapshot(jp_fetch, kernel_id, label="before change")
    assert snap["kernel_id"] == kernel_id
    assert snap["label"] == "before change"
    assert snap["memory_bytes"] > 1_000_000
    assert 0 < snap["freeze_seconds"] <= snap["total_seconds"]
    assert snap["execution_count"] == 2

    await sock.execute("x = 99")
    out = await restore(jp_fetch, snap["id"])
    assert out["kernel_id"] == kernel_id

    # The websocket opened before the restore is the one that gets the answer.
    assert await sock.value("x") == "41"
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert [k["id"] for k in kernels] == [kernel_id]
