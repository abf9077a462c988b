"""CheckpointApp.lazy_restore = False: a restore brings all of the kernel's
memory back before it runs again (real server, kernel and CRIU)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from .client import api, restore, snapshot
from .test_store_integrity import flip_byte, restore_a_damaged_snapshot

pytestmark = pytest.mark.criu


@pytest.fixture
def jp_server_config(store_root):
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
        "CheckpointApp": {"store_root": str(store_root), "lazy_restore": False},
    }


async def test_a_restore_that_is_not_lazy(jp_fetch, start_kernel):
    status, server = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert server["features"]["lazy_restore"] is False
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(5).random(2_000_000); x = 'then'")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("a[:] = 0; x = 'now'")
    out = await restore(jp_fetch, snap["id"])
    assert out["lazy"] is False
    expected = round(float(np.random.default_rng(5).random(2_000_000).sum()))
    assert await sock.value("x, round(float(a.sum()))") == f"('then', {expected})"


async def test_a_damaged_pack_is_refused_before_the_kernel_is_touched(jp_fetch, start_kernel, store_root):
    """Not lazy, the images are all written out and checked before the kernel
    is touched: one flipped byte is refused (the lazy case is in
    test_store_integrity)."""
    status, body, sock, _ = await restore_a_damaged_snapshot(jp_fetch, start_kernel, store_root, flip_byte)
    assert status == 409
    assert re.search(r"pages-\d+\.img: chunk \d+ is corrupt", body["message"]), body
    assert await sock.value("x") == "2"  # never touched
