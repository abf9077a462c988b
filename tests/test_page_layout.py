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

from .test_store import note_put_stats

pytestmark = pytest.mark.criu

# 64 MiB of random pages; when "grow" appears, 8 MiB more are mapped (below
# the first block: mmap hands out addresses downwards), and 4 MiB of shared
# memory (a pages image of its own, which renumbers the others), and one
# page changes.
PROCESS = """
import mmap, os, sys, time
from pathlib import Path
here = Path(sys.argv[1])

def random_memory(mib, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS):
    block = mmap.mmap(-1, mib << 20, flags=flags)  # mapped directly: no freed copy leaves a hole beside it
    for i in range(mib):
        block[i << 20 : (i + 1) << 20] = os.urandom(1 << 20)
    return block

data = random_memory(64)
(here / "ready").touch()
while not (here / "grow").exists():
    time.sleep(0.01)
more = random_memory(8)
shared = random_memory(4, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)  # its pages image comes first in the dump
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


def test_a_snapshot_after_the_memory_map_changed_hashes_only_the_changed_pages(tmp_path, request):
    store = SnapshotStore(tmp_path / "store")
    request.addfinalizer(store.close)
    stats = note_put_stats(store)
    kernel_id = str(uuid.uuid4())
    proc = subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(tmp_path)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(tmp_path / "ready")
        engine = CriuEngine()
        records, layouts = [], []
        for step in ("first", "second"):
            if step == "second":
                (tmp_path / "grow").touch()
                wait_for(tmp_path / "grown")
            record = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="manual", status="dumping")
            images = store.create(record)
            engine.dump(proc.pid, images)
            layouts.append(page_addresses(images))
            records.append(store.commit(record))
    finally:
        proc.kill()
        proc.wait()
    first, second = stats
    # The 8 MiB went below the 64 MiB, so in the process's pages image (in
    # address order) most pages moved, and the image has another name: compared
    # by name and place, nearly every page would differ.
    (old_name, (pagemap, before)) = max(layouts[0].items(), key=lambda item: len(item[1][1]))
    ((new_name, after),) = [(n, at) for n, (pagemap_now, at) in layouts[1].items() if pagemap_now == pagemap]
    assert new_name != old_name
    counterparts = same_addresses(after, before)
    assert (counterparts != np.arange(len(after))).mean() > 0.5
    assert second.chunks > 20000
    # Hashed: the 8 MiB and 4 MiB mapped since, the page changed, and the
    # interpreter's own pages its work since touched (a few hundred).
    assert second.hashed_chunks <= 2048 + 1024 + 1 + 1000, second
    assert first.hashed_chunks == first.chunks
    # And the manifest names each page by its own hash, computed here.
    out = tmp_path / "out"
    out.mkdir()
    _, files = store.read_manifest(records[1].id)
    for stored in files:
        if stored.name.startswith("pages-"):
            data = (store.kept_images.latest(kernel_id)[1] / stored.name).read_bytes()
            assert stored.chunks == [blake3.blake3(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]
