"""A lazy restore whose memory comes straight from the store's chunks
(store_page_server): real CRIU dumps a process, the store keeps it, and
`criu lazy-pages` takes the process's memory from the serving process, every
chunk checked; a damaged chunk ends the serving with its name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from jupyter_ckpt import store_page_server
from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.errors import RestoreFailed
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore

from .test_page_layout import wait_for

pytestmark = pytest.mark.criu

MIB = 48

# Random memory (stored as is, so one flipped byte in a pack is one damaged
# chunk), its digest written when asked: the whole of it read back.
PROCESS = f"""
import hashlib, mmap, os, sys, time
from pathlib import Path
here = Path(sys.argv[1])
block = mmap.mmap(-1, {MIB} << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # lazily restorable
for i in range({MIB}):
    block[i << 20 : (i + 1) << 20] = os.urandom(1 << 20)
(here / "digest").write_text(hashlib.sha256(block).hexdigest())
(here / "ready").touch()
asked = 0
while True:
    if (here / f"ask-{{asked}}").exists():
        # Renamed into place: the test reads it as soon as it is there.
        (here / "digest.part").write_text(hashlib.sha256(block).hexdigest())
        (here / "digest.part").rename(here / f"digest-{{asked}}")
        asked += 1
    time.sleep(0.01)
"""


def read_text(path):
    with open(path) as f:
        return f.read()


def wait_until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.01)


@pytest.fixture
def stored(tmp_path, request):
    """A snapshot of PROCESS in a store (the process is gone), and what its
    memory's digest was."""
    store = SnapshotStore(tmp_path / "store")
    request.addfinalizer(store.close)
    proc = subprocess.Popen(
        [sys.executable, "-c", PROCESS, str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(tmp_path / "ready")
        record = SnapshotRecord(id=new_snapshot_id(), kernel_id=str(uuid.uuid4()), trigger="manual", status="dumping")
        CriuEngine().dump(proc.pid, store.create(record))
        store.commit(record)
    finally:
        proc.kill()
        proc.wait()
    _, files = store.read_manifest(record.id)
    return store, files, (tmp_path / "digest").read_text()


def restore_from_store(store, files, tmp_path, before_restore=lambda serving: None):
    images, work = tmp_path / "images", tmp_path / "work"
    images.mkdir()
    work.mkdir()
    lazy_bytes = store_page_server.prepare(store.chunks, files, images, work)
    serving = store_page_server.ServingMemory(work)
    before_restore(serving)
    result = None
    try:
        result = CriuEngine().restore(images, work_dir=work, lazy=True, page_server=serving.page_server)
    finally:
        serving.restored(result.pid if result else None)
    return result, serving, lazy_bytes, work


def flip(store, packs, row):
    """One bit of a chunk stored as is (random bytes do not compress)."""
    with open(store.chunks.root + f"/packs/{packs[row['pack']]}.pack", "r+b") as f:
        f.seek(int(row["offset"]) + int(row["start"]) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))


def stop_and_hand_back(result, serving):
    """What the restore does with a tree that waits on a failed page: kill it,
    then let the serving end; criu lazy-pages then fails."""
    os.kill(result.pid, 9)
    os.waitpid(result.pid, 0)
    serving.handled()
    with pytest.raises(RestoreFailed):
        result.lazy_pages.wait()


def test_a_lazy_restore_takes_its_memory_from_the_stores_chunks(stored, tmp_path):
    store, files, digest = stored
    result, serving, lazy_bytes, _ = restore_from_store(store, files, tmp_path)
    try:
        # The memory was left to the serving process: the pages file has holes.
        pages = max((tmp_path / "images").glob("pages-*.img"), key=lambda p: p.stat().st_size)
        assert lazy_bytes >= MIB << 20
        assert os.stat(pages).st_blocks * 512 <= pages.stat().st_size - (MIB << 20)
        (tmp_path / "ask-0").touch()
        wait_for(tmp_path / "digest-0")
        assert (tmp_path / "digest-0").read_text() == digest
        assert serving.succeeded()
        result.lazy_pages.wait()  # all of it came back
    finally:
        os.kill(result.pid, 9)
        os.waitpid(result.pid, 0)


def test_a_damaged_chunk_ends_the_serving_and_names_the_chunk(stored, tmp_path):
    store, files, _ = stored
    pages = max((f for f in files if f.name.startswith("pages-")), key=lambda f: f.size)
    packs, rows = store.chunks.locate_all(pages)
    n = len(pages.chunks) // 2  # in the random block
    flip(store, packs, rows[n])
    result, serving, _, _ = restore_from_store(store, files, tmp_path)
    try:
        (tmp_path / "ask-0").touch()  # reads all of its memory
        assert not serving.succeeded()
        assert f"{pages.name}: chunk {n} is corrupt" in serving.reason()
        # The process waits for that page (in the kernel's userfaultfd), stopped:
        # it never runs on without it.
        wait_until(lambda: read_text(f"/proc/{result.pid}/wchan") == "handle_userfault")
        assert not (tmp_path / "digest-0").exists()
    finally:
        stop_and_hand_back(result, serving)
    assert serving.process.returncode == 1


def test_the_serving_process_stops_the_tree_when_the_server_goes_away(stored, tmp_path):
    """Should the server end while a process waits for a damaged page, the
    serving process stops that process rather than let CRIU go on without it."""
    store, files, _ = stored
    pages = max((f for f in files if f.name.startswith("pages-")), key=lambda f: f.size)
    packs, rows = store.chunks.locate_all(pages)
    flip(store, packs, rows[len(pages.chunks) // 2])
    result, serving, _, _ = restore_from_store(store, files, tmp_path)
    (tmp_path / "ask-0").touch()
    assert not serving.succeeded()
    wait_until(lambda: read_text(f"/proc/{result.pid}/wchan") == "handle_userfault")
    os.close(serving._tree_w)  # as when the server's process ends
    serving._tree_w = -1
    _, status = os.waitpid(result.pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    assert serving.process.wait(timeout=10) == 1
    assert not (tmp_path / "digest-0").exists()


def test_the_waiting_process_stays_stopped_when_the_serving_process_dies(stored, tmp_path):
    """Killed (out of memory, say) while the memory comes back, the serving
    process leaves the connection open behind it (the restore holds its end
    too): the process waiting for a page stays stopped, where CRIU, its
    connection closed, would let it run on over zeros."""
    store, files, _ = stored
    # Stopped before the restore, it serves nothing; then it dies.
    result, serving, _, _ = restore_from_store(
        store, files, tmp_path, lambda serving: os.kill(serving.process.pid, signal.SIGSTOP)
    )
    try:
        serving.process.kill()
        (tmp_path / "ask-0").touch()
        assert not serving.succeeded()
        wait_until(lambda: read_text(f"/proc/{result.pid}/wchan") == "handle_userfault")
        assert result.lazy_pages.process.poll() is None  # criu lazy-pages still waits too
        assert not (tmp_path / "digest-0").exists()
        assert "status -9" in serving.reason()
    finally:
        stop_and_hand_back(result, serving)
