"""Snapshots that save only the pages written since the previous one
(dirty_tracking.py, patches/criu/0004): CRIU's own images made whole again,
restored for real, and the same through the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jupyter_ckpt.dirty_tracking import DirtyTracking, ParentMismatch, flatten
from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.page_layout import PAGE, PE_LAZY, PE_PARENT, PE_PRESENT

from .client import api, restore, snapshot
from .test_store import note_put_stats

# A process holding 64 MiB of numpy data and a forked child holding 8 MiB of
# its own; it obeys commands written to a file and answers in another (no
# pipe or socket to the test, so CRIU dumps and restores it on its own).
TARGET = r"""
import hashlib, os, sys, time
import numpy as np

ask = sys.argv[1]
data = np.ones((64 << 20) // 8)
extra = []
grown = bytearray(b"a" * 1_300_000)  # an mmap'd block of glibc's: realloc moves it with mremap()

def answer(text):
    with open(ask + ".tmp", "w") as f:
        f.write(text)
    os.rename(ask + ".tmp", ask + ".answer")

def digest():
    h = hashlib.sha256(data.tobytes())
    for e in [*extra, grown]:
        h.update(memoryview(e))
    return h.hexdigest()

child = os.fork()
if child == 0:  # the worker: its own memory, its own tracking
    ask += ".child"
    data = np.full((8 << 20) // 8, 3.0)
while True:
    time.sleep(0.02)
    if not os.path.exists(ask):
        continue
    with open(ask) as f:
        command = f.read()
    os.unlink(ask)
    if command == "digest":
        answer(digest())
        continue
    if command == "end worker":
        os.kill(child, 9)
        os.waitpid(child, 0)
        answer("done")
        continue
    if command == "churn":  # mappings made, freed, grown, moved
        extra = [np.full(50_000 * (i + 1), i, dtype=np.int64) for i in range(5)]
        del extra[2]
        extra[0] = np.resize(extra[0], 400_000)
        for i in range(4):  # its pages of before move unwritten (see the Limits of the README)
            grown.extend(bytes([98 + i]) * 1_000_000)
    else:
        # That many pages written, every third one: as many runs of pages
        # (CRIU writes a buffer's runs into the pages image at once: 0006).
        # Each page differently, so that pages out of order would show.
        data.reshape(-1, 512)[: 3 * int(command) : 3, 0] += 1 + np.arange(int(command))
    answer("done")
"""

criu = pytest.mark.criu


class Target:
    def __init__(self, folder: Path):
        self.ask = folder / "ask"
        script = folder / "target.py"
        script.write_text(TARGET)
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(self.ask)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=folder,
        )
        self.pid = self.process.pid
        self.command("0")
        self.command("0", child=True)

    def command(self, text: str, child: bool = False, timeout: float = 30) -> str:
        ask = Path(f"{self.ask}.child") if child else self.ask
        answer = Path(f"{ask}.answer")
        ask.write_text(text)
        deadline = time.monotonic() + timeout
        while not answer.exists():
            assert time.monotonic() < deadline, f"no answer to {text!r}"
            time.sleep(0.01)
        reply = answer.read_text()
        answer.unlink()
        return reply

    def kill(self) -> None:
        """Both processes, and until their pids are free for the restore."""
        child = int(Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()[0])
        os.killpg(self.pid, 9)
        self.process.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists():  # reaped by whoever adopted it
            assert time.monotonic() < deadline, f"the worker {child} stays"
            time.sleep(0.01)


@pytest.fixture
def target(tmp_path):
    t = Target(tmp_path)
    yield t
    try:
        os.killpg(t.pid, 9)
    except ProcessLookupError:
        pass
    t.process.wait()


def dump(engine: CriuEngine, target: Target, folder: Path, tracking: DirtyTracking, parent: Path | None = None):
    folder.mkdir()
    return engine.dump(target.pid, folder, tracking=tracking, parent=parent)


@criu
def test_a_dump_after_the_first_saves_only_what_was_written_and_restores_whole(target, tmp_path):
    engine = CriuEngine()
    if engine.health().dirty_tracking == "none":
        pytest.fail("no dirty tracking: patches/criu/0004 needs Linux 6.7 with userfaultfd write-protect")
    tracking = DirtyTracking()
    first = dump(engine, target, tmp_path / "1", tracking)
    assert first.memory_bytes > 72 << 20 and first.parent_bytes == 0
    if engine.health().dirty_tracking == "userfaultfd":
        assert len(tracking.fds) == 2  # the process and its worker, each its own userfaultfd
    kept = dict(tracking.fds)

    unchanged = dump(engine, target, tmp_path / "2", tracking, parent=tmp_path / "1")
    assert unchanged.memory_bytes < 8 << 20, "only the interpreters' own pages changed"
    assert unchanged.parent_bytes > 70 << 20
    assert tracking.fds == kept  # passed back, not made again
    flatten(tmp_path / "2", tmp_path / "1")

    target.command("1000")  # 1000 of the 16384 pages, 1000 runs
    target.command("100", child=True)
    target.command("churn")
    changed = dump(engine, target, tmp_path / "3", tracking, parent=tmp_path / "2")
    assert 1100 * PAGE <= changed.memory_bytes < 1100 * PAGE + (20 << 20)  # + 8 MiB churned, interpreters
    copied = flatten(tmp_path / "3", tmp_path / "2")
    assert sum(int(marks.sum()) for marks in copied.values()) * PAGE == changed.parent_bytes
    assert not (tmp_path / "3" / "parent").exists()
    for pagemap in (tmp_path / "3").glob("pagemap-*.img"):
        assert not any(flags & PE_PARENT for _, _, flags in runs(pagemap))

    expected = target.command("digest"), target.command("digest", child=True)
    target.kill()
    restored = subprocess.run(
        [engine.criu_path, "restore", "-D", str(tmp_path / "3"), "-d", "-o", "restore.log", "-v4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert restored.returncode == 0, (tmp_path / "3" / "restore.log").read_text()[-2000:]
    assert (target.command("digest"), target.command("digest", child=True)) == expected


@criu
def test_the_userfaultfd_of_a_process_that_exited_is_closed_at_the_next_dump(target, tmp_path):
    engine = CriuEngine()
    if engine.health().dirty_tracking != "userfaultfd":
        pytest.fail("this machine's Linux has no userfaultfd write-protect (patches/criu/0004)")
    tracking = DirtyTracking()
    dump(engine, target, tmp_path / "1", tracking)
    assert len(tracking.fds) == 2
    target.command("end worker")
    dump(engine, target, tmp_path / "2", tracking, parent=tmp_path / "1")
    assert list(tracking.fds) == [target.pid]  # the worker's closed (DirtyTracking.prune)


@criu
def test_ending_the_tracking_makes_the_next_dump_a_full_one(target, tmp_path):
    engine = CriuEngine()
    tracking = DirtyTracking()
    dump(engine, target, tmp_path / "1", tracking)
    tracking.end()  # as when the kernel's processes are replaced
    assert tracking.fds == {}
    again = dump(engine, target, tmp_path / "2", tracking, parent=tmp_path / "1")
    # All but the vDSO, which nothing writes (CRIU always takes it from the parent).
    assert again.parent_bytes <= 2 * 4 * PAGE and again.memory_bytes > 72 << 20


# -- flatten, on images written here (no CRIU) ----------------------------------------


def write_pagemap(folder: Path, name: str, pages_id: int, runs: list[tuple[int, int, int]], pages: bytes) -> None:
    import pycriu

    folder.mkdir(exist_ok=True)
    entries = [{"pages_id": pages_id}] + [
        {"vaddr": v, "compat_nr_pages": 0, "nr_pages": n, "flags": f} for v, n, f in runs
    ]
    with open(folder / name, "wb") as f:
        pycriu.images.dump({"magic": "PAGEMAP", "entries": entries}, f)
    (folder / f"pages-{pages_id}.img").write_bytes(pages)


def runs(pagemap: Path) -> list[tuple[int, int, int]]:
    import pycriu

    with open(pagemap, "rb") as f:
        _, *entries = pycriu.images.load(f)["entries"]
    return [(int(e["vaddr"]), int(e["nr_pages"]), int(e.get("flags", 0))) for e in entries]


def pages(*marks: int) -> bytes:
    return b"".join(bytes([m]) * PAGE for m in marks)


A = 0x7F0000000000


def test_flatten_takes_each_hole_from_the_parent_runs_that_hold_it(tmp_path):
    lazy = PE_PRESENT | PE_LAZY
    # The parent: pages 0-3 lazy, 4-5 eager, a gap, 8-9 lazy.
    write_pagemap(
        tmp_path / "old",
        "pagemap-1.img",
        1,
        [(A, 4, lazy), (A + 4 * PAGE, 2, PE_PRESENT), (A + 8 * PAGE, 2, lazy)],
        pages(10, 11, 12, 13, 14, 15, 18, 19),
    )
    # The new dump: page 0 written, 1-5 in the parent (across its two runs),
    # 6 new, 8-9 in the parent.
    write_pagemap(
        tmp_path / "new",
        "pagemap-1.img",
        7,
        [(A, 1, lazy), (A + PAGE, 5, PE_PARENT), (A + 6 * PAGE, 1, lazy), (A + 8 * PAGE, 2, PE_PARENT)],
        pages(20, 26),
    )
    (tmp_path / "new" / "parent").symlink_to("../old")
    copied = flatten(tmp_path / "new", tmp_path / "old")
    assert copied["pages-8.img"].tolist() == [False, True, True, True, True, True, False, True, True]
    assert runs(tmp_path / "new" / "pagemap-1.img") == [
        (A, 4, lazy),  # page 0 and the parent's 1-3 meet: one run again
        (A + 4 * PAGE, 2, PE_PRESENT),
        (A + 6 * PAGE, 1, lazy),
        (A + 8 * PAGE, 2, lazy),
    ]
    assert (tmp_path / "new" / "pages-8.img").read_bytes() == pages(20, 11, 12, 13, 14, 15, 26, 18, 19)
    assert not (tmp_path / "new" / "parent").is_symlink()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["pagemap-1.img", "pages-8.img"]


def cut_short_setup(folder: Path) -> Path:
    folder.mkdir()
    write_pagemap(folder / "old", "pagemap-1.img", 1, [(A, 3, PE_PRESENT)], pages(1, 2, 3))
    write_pagemap(folder / "new", "pagemap-1.img", 5, [(A, 1, PE_PARENT), (A + PAGE, 1, PE_PRESENT)], pages(9))
    (folder / "new" / "parent").symlink_to("../old")
    return folder / "new"


class Stop(Exception):
    pass


@pytest.mark.parametrize("step", ["before the pagemap names the whole pages", "before the old pages go"])
def test_a_flatten_cut_short_runs_again_to_the_same_end(tmp_path, monkeypatch, step):
    """A server that stopped while it made a saved state whole makes it whole
    at its next start (recovery), whichever step it stopped at."""
    from jupyter_ckpt import dirty_tracking

    expected = cut_short_setup(tmp_path / "clean")
    flatten(expected, tmp_path / "clean" / "old")
    images = cut_short_setup(tmp_path / "cut")
    real_unlink = Path.unlink

    def unlink_but_the_old_pages(self: Path, *args, **kwargs) -> None:
        if self.name == "pages-5.img":
            raise Stop(step)
        real_unlink(self, *args, **kwargs)

    with monkeypatch.context() as m:
        if step.startswith("before the pagemap"):
            m.setattr(dirty_tracking, "write_pagemap", lambda *a, **k: (_ for _ in ()).throw(Stop(step)))
        else:
            m.setattr(Path, "unlink", unlink_but_the_old_pages)
        with pytest.raises(Stop):
            flatten(images, tmp_path / "cut" / "old")
    flatten(images, tmp_path / "cut" / "old")
    assert runs(images / "pagemap-1.img") == runs(expected / "pagemap-1.img") == [(A, 2, PE_PRESENT)]
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert (images / "pages-6.img").read_bytes() == pages(1, 9)


def test_flatten_refuses_a_parent_that_lacks_a_page(tmp_path):
    write_pagemap(tmp_path / "old", "pagemap-1.img", 1, [(A, 2, PE_PRESENT)], pages(1, 2))
    write_pagemap(tmp_path / "new", "pagemap-1.img", 2, [(A + PAGE, 2, PE_PARENT)], b"")
    with pytest.raises(ParentMismatch, match=f"lack the page at {A + 2 * PAGE:#x}"):
        flatten(tmp_path / "new", tmp_path / "old")
    write_pagemap(tmp_path / "chain", "pagemap-1.img", 1, [(A, 1, PE_PARENT), (A + PAGE, 1, PE_PRESENT)], pages(2))
    with pytest.raises(ParentMismatch, match="incremental themselves"):
        flatten(tmp_path / "new", tmp_path / "chain")
    write_pagemap(tmp_path / "empty", "pagemap-1.img", 1, [], b"")
    with pytest.raises(ParentMismatch, match="hold no pages"):
        flatten(tmp_path / "new", tmp_path / "empty")
    shutil.rmtree(tmp_path / "old")
    with pytest.raises(ParentMismatch, match="no such pagemap"):
        flatten(tmp_path / "new", tmp_path / "old")


def test_flatten_leaves_a_full_dump_as_it_is(tmp_path):
    write_pagemap(tmp_path / "full", "pagemap-1.img", 1, [(A, 2, PE_PRESENT)], pages(1, 2))
    before = (tmp_path / "full" / "pagemap-1.img").read_bytes()
    assert flatten(tmp_path / "full", tmp_path / "nowhere") == {}
    assert (tmp_path / "full" / "pagemap-1.img").read_bytes() == before


# -- through the server ---------------------------------------------------------------

# -- an incremental dump stored before it is made whole (no CRIU) ----------------------


@pytest.fixture
def store(tmp_path):
    from jupyter_ckpt.store import SnapshotStore

    s = SnapshotStore(tmp_path / "store")
    yield s
    s.close()


def stored_incrementally(store, kernel_id: str = "6e1b2f0e-0b7a-4c57-9a39-0f7c1f9d2a11"):
    """A kernel's full snapshot (pages 1-6 at A), kept; then a dump of the
    pages written since (pages 2 and 5 changed, one page mapped below A),
    committed with its plan. Returns the store's records and the whole pages
    file's expected bytes."""
    from jupyter_ckpt.dirty_tracking import IncrementalDump, plan_whole
    from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id

    first = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="auto", status="dumping")
    write_pagemap(store.create(first), "pagemap-1.img", 1, [(A, 6, PE_PRESENT)], pages(1, 2, 3, 4, 5, 6))
    store.commit(first)
    second = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="auto", status="dumping")
    images = store.create(second)
    dumped = [(A - PAGE, 1, PE_PRESENT), (A, 1, PE_PARENT), (A + PAGE, 1, PE_PRESENT), (A + 2 * PAGE, 2, PE_PARENT)]
    dumped += [(A + 4 * PAGE, 1, PE_PRESENT), (A + 5 * PAGE, 1, PE_PARENT)]
    write_pagemap(images, "pagemap-1.img", 2, dumped, pages(9, 12, 15))
    parent = store.link_kept(kernel_id, first.id)
    assert parent is not None
    done = store.commit(second, incremental=IncrementalDump(first.id, parent, plan_whole(images, parent)))
    return first, done, parent, pages(9, 1, 12, 3, 4, 15, 6)


def test_an_incremental_dump_is_stored_from_its_plan_before_its_whole_pages_are_written(store):
    """Durable before the copy: the manifest names the whole file's chunks,
    the unchanged pages' taken from the kept snapshot's manifest unread;
    keep_whole then writes the file, adds its digest and keeps it."""
    import blake3

    put_stats = note_put_stats(store)
    first, done, parent, whole = stored_incrementally(store)
    staging = store.staging_dir(done.id)
    assert not (staging / "pages-3.img").exists()  # complete, not yet written
    assert store.waiting_to_keep(done.id)
    _, files = store.read_manifest(done.id)
    stored = {f.name: f for f in files}
    assert "pages-2.img" not in stored  # the dump's own pages are not a file of the snapshot
    assert stored["pages-3.img"].size == len(whole) and not stored["pages-3.img"].digest
    assert stored["pages-3.img"].chunks == [
        blake3.blake3(whole[i : i + PAGE]).digest() for i in range(0, 7 * PAGE, PAGE)
    ]
    assert put_stats[-1].hashed_chunks == 3 + 1  # the three written pages, the whole pagemap
    assert runs(staging / "pagemap-1.img") == [(A - PAGE, 7, PE_PRESENT)]

    assert store.keep_whole(done)
    assert not store.waiting_to_keep(done.id)
    # A restore that read the manifest before its digest was added uses the
    # chunks, and leaves the kept copy as it is.
    assert not store.kept_images.link(done, files, store.new_scratch_dir())
    _, files = store.read_manifest(done.id)
    assert {f.name: f.digest for f in files}["pages-3.img"] == blake3.blake3(whole).hexdigest()
    kept = store.kept_images.latest(done.kernel_id)
    assert kept is not None and kept[0] == done.id
    assert (kept[1] / "pages-3.img").read_bytes() == whole
    assert sorted(p.name for p in kept[1].iterdir()) == ["pagemap-1.img", "pages-3.img"]
    assert store.kept_images.link(done, files, store.new_scratch_dir())  # as kept: no hashing needed


@pytest.mark.parametrize("changed", ["the dump's own pages", "the parent's pages"])
def test_an_incremental_snapshot_whose_pieces_changed_before_they_were_copied_is_not_kept(store, changed):
    """The pages it is made of changed after their hashes went into the
    manifest: the whole file is not written from them, the manifest gains no
    digest, nothing is kept; the snapshot restores from the store's chunks
    all the same."""
    _, done, parent, whole = stored_incrementally(store)
    piece = store.staging_dir(done.id) / "pages-2.img" if changed == "the dump's own pages" else parent / "pages-1.img"
    with open(piece, "r+b") as f:
        f.write(b"x")
    assert not store.keep_whole(done)
    assert store.kept_images.latest(done.kernel_id)[0] != done.id
    assert not store.staging_dir(done.id).exists()
    _, files = store.read_manifest(done.id)
    assert not {f.name: f.digest for f in files}["pages-3.img"]
    dest = store.new_scratch_dir()
    store.materialize(done.id, dest)
    assert (dest / "pages-3.img").read_bytes() == whole


def test_an_incremental_snapshot_is_kept_when_the_one_it_builds_on_went_meanwhile(store):
    """Auto-backup's retention may delete the previous snapshot (and its kept
    images) as soon as the new one is complete: the copy takes the parent's
    pages from the links the dump was given."""
    first, done, _, whole = stored_incrementally(store)
    store.delete(first.id)
    assert store.keep_whole(done)
    kept = store.kept_images.latest(done.kernel_id)
    assert kept is not None and kept[0] == done.id
    assert (kept[1] / "pages-3.img").read_bytes() == whole


def test_a_snapshot_relabelled_or_deleted_before_its_images_are_kept(store):
    """keep_whole rewrites the manifest with the label it has by then, and
    never brings back one deleted meanwhile."""
    _, done, _, _ = stored_incrementally(store)
    store.relabel(done.id, "renamed")
    assert store.keep_whole(done)
    record, _ = store.read_manifest(done.id)
    assert record.label == "renamed"

    _, deleted, _, _ = stored_incrementally(store, kernel_id="0c5a3a6e-51b5-4c43-8a57-2d3cb1a7f0d2")
    store.delete(deleted.id)
    assert not store.keep_whole(deleted)
    assert not store.exists(deleted.id)


GROW = "import numpy as np\ndata = np.ones((256 << 20) // 8)\n"


@criu
async def test_a_kernels_second_snapshot_copies_what_changed_and_restores(jp_fetch, start_kernel):
    _, status = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert status["dirty_tracking"] in ("userfaultfd", "soft-dirty")
    kernel_id, sock = await start_kernel()
    await sock.execute(GROW)
    first = await snapshot(jp_fetch, kernel_id)
    assert first["changed_bytes"] is None and first["memory_bytes"] > 256 << 20
    await sock.execute("data[: 2048 * 512 : 512] += 1")  # 2048 pages written
    second = await snapshot(jp_fetch, kernel_id)
    assert second["changed_bytes"] < 32 << 20, second
    assert abs(second["memory_bytes"] - first["memory_bytes"]) < 16 << 20
    assert second["freeze_seconds"] < first["freeze_seconds"]

    await sock.execute("data[:] = 0")
    await restore(jp_fetch, second["id"])
    assert await sock.value("float(data.sum())") == str(float((256 << 20) // 8 + 2048))
    # A restored kernel is a new set of processes: nothing to count from.
    after = await snapshot(jp_fetch, kernel_id)
    assert after["changed_bytes"] is None
    await restore(jp_fetch, first["id"])
    assert await sock.value("float(data.sum())") == str(float((256 << 20) // 8))


@criu
async def test_a_restore_that_fails_puts_back_the_state_saved_as_what_changed(
    jp_fetch, start_kernel, store_root, events
):
    """The state a restore replaces is saved as the pages written since the
    kernel's latest kept snapshot; when the restore fails after the kernel's
    processes are gone, that state comes back through CRIU's parent link."""
    from .test_store_integrity import flip_byte, largest_pack

    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; x = 1; a = np.random.default_rng(0).random(2_000_000)")
    older = await snapshot(jp_fetch, kernel_id)  # no kept images once a later one is kept
    await sock.execute("x = 3")
    latest = await snapshot(jp_fetch, kernel_id)
    assert latest["changed_bytes"] is not None  # tracking counts from it
    await sock.execute("x = 2; b = np.random.default_rng(1).random(1000); a[::512] += 1")
    flip_byte(largest_pack(store_root))  # the older snapshot's memory, served from the store, is damaged
    status, outcome = await api(
        jp_fetch, "POST", "api", "ckpt", "snapshots", older["id"], "restore", body={"mode": "replace"}
    )
    assert status == 200 and outcome["lazy"], outcome
    failed = await events.wait_for_action("restore_failed", snapshot_id=older["id"], timeout=60)
    assert "put back as it was before the restore" in failed["message"], failed
    assert await sock.value("x") == "2"
    assert await sock.value("float(b.sum())") == repr(float(np.random.default_rng(1).random(1000).sum()))
    expected = np.random.default_rng(0).random(2_000_000)
    expected[::512] += 1
    assert await sock.value("float(a.sum())") == repr(float(expected.sum()))


class TestIncrementalSnapshotsOff:
    """CheckpointApp.incremental_snapshots = False: every snapshot is full."""

    @pytest.fixture
    def jp_server_config(self, store_root):
        return {
            "ServerApp": {"jpserver_extensions": {"jupyter_ckpt": True}},
            "CheckpointApp": {"store_root": str(store_root), "incremental_snapshots": False},
        }

    @criu
    async def test_every_snapshot_is_full(self, jp_fetch, start_kernel):
        _, status = await api(jp_fetch, "GET", "api", "ckpt", "status")
        assert status["dirty_tracking"] == "off"
        kernel_id, sock = await start_kernel()
        await sock.execute("x = 1")
        first = await snapshot(jp_fetch, kernel_id)
        second = await snapshot(jp_fetch, kernel_id)
        assert first["changed_bytes"] is None and second["changed_bytes"] is None
        assert second["memory_bytes"] > 0.9 * first["memory_bytes"]


def test_a_process_holding_a_device_that_writes_memory_unseen_is_found(tmp_path, monkeypatch):
    """untracked_writer looks through the whole tree; /dev/null stands in for a
    GPU's device file here (a kernel holding one cannot be dumped on this machine)."""
    from jupyter_ckpt import dirty_tracking

    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sh', '-c', 'exec sleep 60 </dev/null'])"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        deadline = time.monotonic() + 10
        while (
            not children.read_text().split()
            or os.readlink(f"/proc/{children.read_text().split()[0]}/fd/0") != "/dev/null"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        child = int(children.read_text().split()[0])
        assert dirty_tracking.untracked_writer(parent.pid) is None
        monkeypatch.setattr(dirty_tracking, "_UNTRACKED_WRITERS", ("/dev/null",))
        assert dirty_tracking.untracked_writer(parent.pid) == f"process {child} holds /dev/null"
    finally:
        parent.kill()
        parent.wait()


@criu
def test_a_dump_whose_answers_fail_half_way_lets_the_processes_go_on(target, tmp_path, monkeypatch):
    """An error of ours while CRIU waits for an answer (the tree frozen) must
    end the dump, not leave CRIU and the kernel waiting on each other."""
    from jupyter_ckpt import engine as engine_module

    engine = CriuEngine()
    real_receive, calls = engine_module._receive, []

    def receive_then_fail(sock):
        calls.append(1)
        if len(calls) >= 3:  # from a notification in the middle of the dump on (the retry too)
            raise ValueError("a bug of ours")
        return real_receive(sock)

    monkeypatch.setattr(engine_module, "_receive", receive_then_fail)
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - whatever the bug raised, the dump failed
        dump(engine, target, tmp_path / "1", DirtyTracking())
    assert time.monotonic() - started < 60
    assert target.command("0") == "done"  # it runs
    monkeypatch.setattr(engine_module, "_receive", real_receive)
    tracking = DirtyTracking()
    assert dump(engine, target, tmp_path / "2", tracking).memory_bytes > 72 << 20
