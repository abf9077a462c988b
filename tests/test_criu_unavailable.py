"""CRIU missing: the server still starts, says why, and answers 503."""

from __future__ import annotations

import pytest

from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.errors import CriuUnavailable

from .client import api


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root), "criu_path": "/nonexistent/criu"},
    }


async def test_status_and_snapshot_say_criu_is_missing(jp_fetch, start_kernel):
    status, body = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert status == 200
    assert body["criu"]["available"] is False
    assert "not installed" in body["criu"]["reason"]
    assert body["features"]["snapshot"] is False

    # Kernels still start and run; only snapshots are refused.
    kernel_id, sock = await start_kernel()
    status, body = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots")
    assert status == 503
    assert "/nonexistent/criu" in body["message"]
    assert await sock.value("6 * 7") == "42"


def test_engine_reports_missing_binary_without_a_server():
    engine = CriuEngine("/nonexistent/criu")
    health = engine.health()
    assert not health.available and "not installed" in health.reason
    with pytest.raises(CriuUnavailable, match="not installed"):
        engine.require()
