"""The store compares a kernel's new memory images with its kept ones page by
page at the same addresses (page_layout), on real CRIU dumps of a process
whose memory map changed in between."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import blake3
import numpy as np
import pytest

from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.page_layout import page_addresses, same_addresses
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore

pytestmark = pytest.mark.criu

# 64 MiB of random pages; when "grow" appears, 8 MiB more are mapped (below
# the first block: mmap hands out addresses downwards) and one page changes.
PROCESS = """
import os, sys, time
from pathlib import Path
here = Path(sys.argv[1])
data = bytearray(os.urandom(64 << 20))
(here / "ready").touch()
while not (here / "grow").exists():
    time.sleep(0.01)
more = bytearray(os.urandom(8 << 20))
data[5 << 20] ^= 1
(here / "grown").touch()
time.sleep(600)
"""


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_page_addresses_and_their_counterparts():
    new = np.array([4096 * i for i in (7, 1, 2, 9)], np.uint64)
    old = np.array([4096 * i for i in (2, 1, 3, 7)], np.uint64)
    assert same_addresses(new, old).tolist() == [3, 1, 0, -1]
    assert same_addresses(new, np.zeros(0, np.uint64)).tolist() == [-1] * 4


def test_a_snapshot_after_the_memory_map_changed_hashes_only_the_changed_pages(tmp_path):
    store = SnapshotStore(tmp_path / "store")
    stats = []  # each commit's PutStats (the real put_files, its result noted)
    put_files = store.chunks.put_files

    def noting_put_files(*args):
        files, put = put_files(*args)
        stats.append(put)
        return files, put

    store.chunks.put_files = noting_put_files
    kernel_id = str(uuid.uuid4())
    proc = subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(tmp_path)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(tmp_path / "ready")
        engine = CriuEngine()
        records = []
        for step in ("first", "second"):
            if step == "second":
                (tmp_path / "grow").touch()
                wait_for(tmp_path / "grown")
            record = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="manual", status="dumping")
            images = store.create(record)
            engine.dump(proc.pid, images)
            layout = page_addresses(images)
            assert layout and all(len(at) * 4096 == (images / name).stat().st_size for name, (_, at) in layout.items())
            records.append(store.commit(record))
    finally:
        proc.kill()
        proc.wait()
    first, second = stats
    # The 8 MiB mapped in between sit before the 64 MiB in the pages image:
    # compared place by place, nearly every page after them would differ.
    assert second.chunks > 18000
    assert second.hashed_chunks < 0.2 * second.chunks, second
    assert first.hashed_chunks == first.chunks
    # And the manifest names each page by its own hash, computed here.
    out = tmp_path / "out"
    out.mkdir()
    _, files = store.read_manifest(records[1].id)
    for stored in files:
        if stored.name.startswith("pages-"):
            data = (store.kept_images.latest(kernel_id)[1] / stored.name).read_bytes()
            assert stored.chunks == [blake3.blake3(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
    store.close()
