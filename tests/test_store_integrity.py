"""Restore refuses a snapshot the store cannot verify, and leaves the running
kernel as it is; a refused snapshot does not stop others from restoring. The
local copy of the latest images is used only where it matches the manifest."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from .client import api, restore, snapshot

pytestmark = pytest.mark.criu


def largest_pack(store_root):
    return max((store_root / "packs").glob("*.pack"), key=lambda p: p.stat().st_size)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def delete(path):
    path.unlink()


def kept_images(store_root, snap):
    return store_root / "state" / "images" / snap["kernel_id"] / snap["id"]


async def restore_a_damaged_snapshot(jp_fetch, start_kernel, store_root, damage, after="x = 2"):
    """A kernel snapshotted with x = 1 and 16 MB of random numbers, then
    ``after`` run, ``damage`` done to the largest pack (the array's pages) and
    the kept images removed (else the restore would not need the packs): the
    restore's status and body, the kernel's socket and the snapshot."""
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; x = 1; a = np.random.default_rng(0).random(2_000_000)")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute(after)
    damage(largest_pack(store_root))
    shutil.rmtree(kept_images(store_root, snap))
    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    return status, body, sock, snap


@pytest.mark.parametrize("damage", [truncate, delete], ids=["truncated", "deleted"])
async def test_damaged_pack_is_refused_and_kernel_untouched(jp_fetch, start_kernel, store_root, damage):
    status, body, sock, _ = await restore_a_damaged_snapshot(jp_fetch, start_kernel, store_root, damage)
    assert status == 409
    assert "corrupt" in body["message"] or "cannot be read" in body["message"] or "missing" in body["message"]
    assert await sock.value("x") == "2"  # never touched


async def test_a_damaged_chunk_met_while_the_memory_comes_back_puts_the_kernel_back(
    jp_fetch, start_kernel, store_root, events
):
    """The memory of a snapshot with no kept images comes from the store as
    the kernel runs (store_page_server), each chunk checked before CRIU gets
    it: one that fails puts the kernel back as it was before the restore."""
    status, outcome, sock, snap = await restore_a_damaged_snapshot(
        jp_fetch, start_kernel, store_root, flip_byte, after="x = 2; b = np.random.default_rng(1).random(1000)"
    )
    assert status == 200 and outcome["lazy"], outcome  # the kernel ran before its memory was all back
    failed = await events.wait_for_action("restore_failed", snapshot_id=snap["id"], timeout=60)
    assert "is corrupt" in failed["message"] and "put back as it was before the restore" in failed["message"]
    assert await sock.value("x") == "2"
    expected = float(np.random.default_rng(1).random(1000).sum())  # computed here
    assert await sock.value("float(b.sum())") == repr(expected)


async def test_edited_manifest_is_refused(jp_fetch, start_kernel, store_root):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 1")
    snap = await snapshot(jp_fetch, kernel_id, label="original")
    await sock.execute("x = 2")
    path = store_root / "manifests" / f"{snap['id']}.manifest"
    path.write_bytes(path.read_bytes().replace(b'"label": "original"', b'"label": "0riginal"'))

    status, body = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={"mode": "replace"}
    )
    assert status == 409
    assert "signature" in body["message"]
    assert await sock.value("x") == "2"
    status, listed = await api(jp_fetch, "GET", "api", "ckpt", "snapshots", snap["id"])
    assert listed["status"] == "failed" and "signature" in listed["error"]


async def test_second_snapshot_of_unchanged_kernel_stores_little(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(0).random(4_000_000)")  # 32 MB
    first = await snapshot(jp_fetch, kernel_id)
    second = await snapshot(jp_fetch, kernel_id)
    assert second["parent_id"] == first["id"]
    assert second["stored_bytes"] <= 0.03 * first["stored_bytes"], (first["stored_bytes"], second["stored_bytes"])
    # Both restore: the second shares nearly all of its chunks with the first.
    await sock.execute("a[:] = 0")
    await restore(jp_fetch, first["id"])
    expected = round(float(np.random.default_rng(0).random(4_000_000).sum()))  # computed here, not by the kernel
    assert await sock.value("round(float(a.sum()))") == str(expected)


async def test_kept_images_that_differ_from_the_manifest_are_not_used(jp_fetch, start_kernel, store_root):
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; x = 1; a = np.random.default_rng(0).random(2_000_000)")
    snap = await snapshot(jp_fetch, kernel_id)
    kept = kept_images(store_root, snap)
    pages = max(kept.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    flip_byte(pages)  # same size, one bit off: only the digest tells
    await sock.execute("x = 2; a[:] = 0")

    await restore(jp_fetch, snap["id"])  # from the store's chunks instead
    assert await sock.value("x") == "1"
    assert await sock.value("float(a.sum()) == float(np.random.default_rng(0).random(2_000_000).sum())") == "True"
    assert not kept.exists()  # the bad copy is dropped


async def test_restore_uses_the_kept_images(jp_fetch, start_kernel, store_root):
    """With its kept images intact, a snapshot restores even with the packs gone."""
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 1")
    snap = await snapshot(jp_fetch, kernel_id)
    # CRIU's log (for a dump, its info level: CriuEngine.dump) is kept with the images.
    log = store_root / "state" / "images" / kernel_id / snap["id"] / "dump.log"
    assert len(log.read_text().splitlines()) > 1000
    await sock.execute("x = 2")
    for pack in (store_root / "packs").glob("*.pack"):
        pack.rename(pack.with_suffix(".away"))
    try:
        await restore(jp_fetch, snap["id"])
        assert await sock.value("x") == "1"
    finally:
        for pack in (store_root / "packs").glob("*.away"):
            pack.rename(pack.with_suffix(".pack"))


class TestNoKeptImages:
    """CheckpointApp.image_cache_bytes = 0: no images kept; restores read the store."""

    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {"store_root": str(store_root), "image_cache_bytes": 0},
        }

    async def test_nothing_is_kept_and_a_restore_needs_the_packs(self, jp_fetch, start_kernel, store_root):
        kernel_id, sock = await start_kernel()
        await sock.execute("x = 1")
        snap = await snapshot(jp_fetch, kernel_id)
        await sock.execute("x = 2")
        state = store_root / "state"
        assert not [p for p in state.rglob("*.img")], "images were kept with image_cache_bytes = 0"
        packs = list((store_root / "packs").glob("*.pack"))
        for pack in packs:
            pack.rename(pack.with_suffix(".away"))
        try:
            status, body = await api(jp_fetch, "POST", "api", "ckpt", "snapshots", snap["id"], "restore", body={})
            assert status == 409 and "cannot be read from pack" in body["message"], body  # nothing else to restore from
            assert await sock.value("x") == "2"
        finally:
            for pack in (store_root / "packs").glob("*.away"):
                pack.rename(pack.with_suffix(".pack"))
        await restore(jp_fetch, snap["id"])
        assert await sock.value("x") == "1"


class TestQuietCriu:
    """CheckpointApp.criu_log_level: what CRIU writes to its logs."""

    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {"store_root": str(store_root), "criu_log_level": 1},
        }

    async def test_level_1_logs_errors_only(self, jp_fetch, start_kernel, store_root):
        kernel_id, sock = await start_kernel()
        snap = await snapshot(jp_fetch, kernel_id)
        log = store_root / "state" / "images" / kernel_id / snap["id"] / "dump.log"
        assert len(log.read_text().splitlines()) < 50  # the default level writes thousands of lines
