"""The versioned store without a server: records, retention, gc."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from jupyter_ckpt.errors import QuotaExceeded, SnapshotNotFound, SnapshotNotRestorable
from jupyter_ckpt.records import SnapshotRecord, new_snapshot_id
from jupyter_ckpt.store import SnapshotStore


@pytest.fixture
def store(tmp_path):
    s = SnapshotStore(tmp_path / "store")
    yield s
    s.close()


def commit(store, kernel_id="k1", trigger="auto", seed=0, size=256 * 1024, when=None):
    record = SnapshotRecord(id=new_snapshot_id(when), kernel_id=kernel_id, trigger=trigger, status="dumping")
    images = store.create(record)
    (images / "pages-1.img").write_bytes(np.random.default_rng(seed).bytes(size))
    (images / "inventory.img").write_bytes(b"inventory")
    return store.commit(record)  # the complete record


def test_ids_sort_by_time():
    assert new_snapshot_id(1000.0) < new_snapshot_id(1000.001) < new_snapshot_id(2000.0)


def test_records_round_trip_and_relabel(store, tmp_path):
    r = commit(store)
    assert store.get(r.id).status == "complete" and store.get(r.id).restorable
    r.label = "relabelled"
    store.save(r)  # re-signs the manifest
    assert store.get(r.id).label == "relabelled"
    dest = tmp_path / "out"
    dest.mkdir()
    store.materialize(r.id, dest)
    assert (dest / "inventory.img").read_bytes() == b"inventory"
    store.delete(r.id)
    with pytest.raises(SnapshotNotFound):
        store.get(r.id)
    with pytest.raises(SnapshotNotFound):
        store.get("../../etc/passwd")


def test_key_lives_outside_the_store(store, tmp_path):
    assert store.key_path == tmp_path / "store.key"
    assert os.stat(store.key_path).st_mode & 0o777 == 0o600
    other = SnapshotStore(tmp_path / "store", key_path=tmp_path / "other.key")
    r = commit(store)
    with pytest.raises(SnapshotNotRestorable, match="signature"):
        other.materialize(r.id, tmp_path)
    other.close()


def test_retention_keeps_last_n_auto_and_all_manual(store):
    t = 1_800_000_000.0
    manual = commit(store, trigger="manual", seed=100, when=t)
    autos = [commit(store, seed=i, when=t + 1 + i) for i in range(5)]
    magic = commit(store, trigger="magic", seed=200, when=t + 10)
    other_kernel = commit(store, kernel_id="k2", seed=300, when=t + 11)
    deleted = store.prune(kernel_id="k1", keep_auto=2)
    assert deleted == [a.id for a in reversed(autos[:3])]
    left = {r.id for r in store.list()}
    assert left == {manual.id, autos[3].id, autos[4].id, magic.id, other_kernel.id}


def test_retention_byte_budget_drops_oldest_auto_first(store):
    t = 1_800_000_000.0
    autos = [commit(store, seed=i, when=t + i) for i in range(4)]
    per = autos[0].stored_bytes
    deleted = store.prune(kernel_id="k1", keep_auto=10, byte_budget=int(per * 2.5))
    assert deleted == [autos[0].id, autos[1].id]


def test_gc_never_drops_a_chunk_still_referenced(store, tmp_path):
    shared = commit(store, seed=1)
    same_content = commit(store, seed=1)  # dedups entirely onto the first one's chunks
    assert same_content.stored_bytes < shared.stored_bytes * 0.03
    store.delete(shared.id)
    deleted, freed = store.gc()
    assert freed == 0  # the second snapshot still uses every chunk
    store.materialize(same_content.id, tmp_path)
    store.delete(same_content.id)
    deleted, freed = store.gc()
    assert deleted >= 1 and freed >= 256 * 1024 * 0.9


def test_each_kernels_latest_images_are_kept_within_the_budget(tmp_path):
    kernels = [str(uuid.uuid4()) for _ in range(3)]
    store = SnapshotStore(tmp_path / "s", image_cache_bytes=700 * 1024)
    images = tmp_path / "s" / "state" / "images"
    first = commit(store, kernel_id=kernels[0], seed=1)
    second = commit(store, kernel_id=kernels[0], seed=2)
    assert [p.name for p in (images / kernels[0]).iterdir()] == [second.id]  # the previous copy is replaced
    assert {p.stat().st_mode & 0o777 for p in (images / kernels[0] / second.id).iterdir()} == {0o600}
    commit(store, kernel_id=kernels[1], seed=3)
    last = commit(store, kernel_id=kernels[2], seed=4)  # 3 x 256 KiB > 700 KiB: the oldest copy goes
    assert not (images / kernels[0] / second.id).exists()
    assert len(list(images.glob("*/*"))) == 2
    # Restores without a kept copy, and one with it (linked), give the same bytes.
    for snapshot, seed in ((first, 1), (second, 2), (last, 4)):
        dest = tmp_path / f"out-{snapshot.id}"
        dest.mkdir()
        store.materialize(snapshot.id, dest)
        assert (dest / "pages-1.img").read_bytes() == np.random.default_rng(seed).bytes(256 * 1024)
    assert (tmp_path / f"out-{last.id}" / "pages-1.img").stat().st_nlink == 2
    store.delete(commit(store, kernel_id=kernels[1], seed=5).id)  # deleting a snapshot drops its copy
    assert not list((images / kernels[1]).iterdir())
    store.close()


def test_gc_never_takes_what_a_snapshot_being_stored_will_refer_to(store):
    """gc running over and over while snapshots are stored and deleted (what a
    server's background gc does): every stored snapshot stays whole."""
    import threading

    stop = threading.Event()
    errors: list[BaseException] = []

    def collect() -> None:
        while not stop.is_set():
            try:
                store.gc()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        kept = []
        for i in range(12):
            record = commit(store, seed=i % 3, size=2 << 20)
            kept.append(record.id)
            if len(kept) > 2:
                store.delete(kept.pop(0))
    finally:
        stop.set()
        collector.join()
    assert not errors, errors
    for snapshot_id in kept:
        record, files = store.read_manifest(snapshot_id)
        for stored in files:
            assert sum(len(c) for c in store.read_chunks(stored)) == stored.size


# -- each operation's outcome and reason, on a real store ---------------------------


def staged(store, kernel_id="k1", status="dumping", **fields) -> SnapshotRecord:
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, status=status, **fields)
    (store.create(record) / "core-1.img").write_bytes(b"c" * 100)
    return record


def test_recover_fails_what_was_cut_short_and_clears_the_leftovers(tmp_path):
    store = SnapshotStore(tmp_path / "s")
    done = commit(store, seed=1)
    cut = [staged(store, status=s) for s in ("pending", "dumping", "storing")]
    failed_before = staged(store)
    store.fail(failed_before, "CRIU said no")
    stray = store.state / "staging" / "not-a-snapshot"
    stray.mkdir()
    orphan = store.state / "staging" / new_snapshot_id()  # a snapshot id without a record
    orphan.mkdir()
    (store.state / "cache" / "abc.pack.part").write_bytes(b"p")
    (store.state / "records" / "garbled.json").write_text("{")
    store.close()

    again = SnapshotStore(tmp_path / "s")
    assert sorted(again.recover()) == sorted(r.id for r in cut)
    for r in cut:
        got = again.get(r.id)
        assert (got.status, got.error) == ("failed", "the server stopped before this snapshot was stored")
        assert not again.staging_dir(r.id).exists()
    assert (again.get(failed_before.id).status, again.get(failed_before.id).error) == ("failed", "CRIU said no")
    assert again.get(done.id).status == "complete"
    assert not stray.exists() and not orphan.exists() and not (again.state / "cache" / "abc.pack.part").exists()
    assert again.recover() == []  # nothing left to mend
    again.close()


def test_fail_keeps_the_record_with_its_reason_and_drops_the_images(store):
    record = staged(store)
    store.fail(record, "no space left")
    assert not store.staging_dir(record.id).exists()
    got = store.get(record.id)
    assert (got.status, got.error, got.kernel_id) == ("failed", "no space left", "k1")


def test_relabel_a_complete_and_a_failed_snapshot_and_refuse_an_unknown_one(store):
    done = commit(store)
    assert store.relabel(done.id, "kept").label == "kept" and store.get(done.id).label == "kept"
    assert store.get(done.id).status == "complete"  # re-signed, still restorable
    failed = staged(store)
    store.fail(failed, "why")
    assert store.relabel(failed.id, "tried").label == "tried"
    assert (store.get(failed.id).label, store.get(failed.id).error) == ("tried", "why")
    unknown = new_snapshot_id()
    with pytest.raises(SnapshotNotFound) as e:
        store.relabel(unknown, "x")
    assert str(e.value) == f"no snapshot with id {unknown!r}"


def test_get_reports_an_unreadable_snapshot_as_failed_with_the_reason(store):
    done = commit(store)
    manifest_file = store.state.parent / "manifests" / f"{done.id}.manifest"
    manifest_file.write_bytes(b"garbage")
    got = store.get(done.id)
    assert (got.id, got.kernel_id, got.status) == (done.id, "", "failed")
    assert got.error == f"the manifest of snapshot {done.id} is not a jupyter-ckpt manifest (damaged or truncated)"
    record = staged(store)
    store._record_path(record.id).write_text("{not json")
    got = store.get(record.id)
    assert (got.id, got.kernel_id, got.status) == (record.id, "", "failed")
    assert got.error.startswith(f"the record {record.id}.json cannot be read: ")
    unknown = new_snapshot_id()
    with pytest.raises(SnapshotNotFound) as e:
        store.get(unknown)
    assert str(e.value) == f"no snapshot with id {unknown!r}"
    assert store.ids() == sorted([done.id, record.id], reverse=True)


def test_delete_removes_every_trace_and_refuses_an_unknown_id(store):
    done = commit(store, kernel_id=str(uuid.uuid4()))  # a server's kernel id: its images are kept
    assert list(store.kept_images.dir.glob(f"*/{done.id}"))
    pending = staged(store)
    for snapshot_id in (done.id, pending.id):
        store.delete(snapshot_id)
        with pytest.raises(SnapshotNotFound):
            store.get(snapshot_id)
        assert not store.staging_dir(snapshot_id).exists()
    assert store.ids() == [] and not list(store.kept_images.dir.glob(f"*/{done.id}"))
    unknown = new_snapshot_id()
    with pytest.raises(SnapshotNotFound) as e:
        store.delete(unknown)
    assert str(e.value) == f"no snapshot with id {unknown!r}"
    # Whatever stands at a snapshot's paths (a directory, a link) goes too.
    odd = new_snapshot_id()
    (store.state.parent / "manifests" / f"{odd}.manifest").mkdir()
    (store.state / "records" / f"{odd}.json").symlink_to("/etc/passwd")
    store.delete(odd)
    assert not (store.state.parent / "manifests" / f"{odd}.manifest").exists()
    assert not (store.state / "records" / f"{odd}.json").is_symlink()


def test_the_quota_counts_complete_snapshots_only(tmp_path):
    store = SnapshotStore(tmp_path / "s", quota_bytes=1)
    store.require_room()  # empty: room
    failed = staged(store)
    store.fail(failed, "x")
    store.require_room()  # a failed one holds nothing
    done = commit(store, size=2 << 20)
    assert store.used_bytes() == done.stored_bytes > 0
    with pytest.raises(QuotaExceeded) as e:
        store.require_room()
    used = done.stored_bytes / 2**20
    assert str(e.value) == (
        f"the snapshot store is full: it holds {used:.1f} MiB of its 0.0 MiB quota; delete snapshots you no longer "
        "need (or ask for a larger quota) to take new ones"
    )
    store.quota_bytes = done.stored_bytes + 1
    store.require_room()  # under the quota
    store.quota_bytes = done.stored_bytes
    with pytest.raises(QuotaExceeded):
        store.require_room()  # exactly at it: full
    store.quota_bytes = 0
    store.require_room()  # no quota
    store.close()


def test_scratch_of_a_previous_run_is_cleared_and_this_runs_kept(tmp_path):
    store = SnapshotStore(tmp_path / "s")
    left = store.new_scratch_dir("restore-")
    (left / "f").write_text("x")
    (store.state / "tmp" / "loose-file").write_text("y")
    store.close()
    again = SnapshotStore(tmp_path / "s")
    mine = again.new_scratch_dir()
    assert mine.name.startswith("op-") and left.name.startswith("restore-") and mine.parent == again.state / "tmp"
    assert os.stat(mine).st_mode & 0o777 == 0o700
    again.clear_scratch()
    assert not left.exists() and not (again.state / "tmp" / "loose-file").exists() and mine.is_dir()
    with again.scratch_dir("import-") as d:
        assert d.is_dir() and d.name.startswith("import-")
    assert not d.exists()
    again.close()


def test_dump_logs_a_previous_run_left(store):
    record = staged(store)
    (store.staging_dir(record.id) / "dump.log").write_text("criu said")
    op = store.new_scratch_dir()
    (op / "previous-state").mkdir()
    (op / "previous-state" / "dump.log").write_text("also")
    assert store.dump_logs() == sorted([store.staging_dir(record.id) / "dump.log", op / "previous-state" / "dump.log"])


def test_where_a_store_keeps_its_key_state_and_root(tmp_path):
    import uuid

    with pytest.raises(ValueError) as e:
        SnapshotStore(f"memory://ckpt-{uuid.uuid4().hex}")
    assert str(e.value) == "a store on a remote backend needs a local state_dir"
    remote = SnapshotStore(f"memory://ckpt-{uuid.uuid4().hex}", state_dir=tmp_path / "state")
    assert remote.key_path == tmp_path / "state.key" and remote.backend == "memory"
    assert remote.quota_bytes == 0 and (tmp_path / "state" / "cache").is_dir()
    remote.close()
    local = SnapshotStore(str(tmp_path / "local") + "/")
    assert local.root == str(tmp_path / "local") and local.key_path == tmp_path / "local.key"
    assert local.backend == "local" and local.state == tmp_path / "local" / "state"
    local.close()


def test_gc_keeps_what_sound_snapshots_use_past_a_damaged_one_and_removes_stray_parts(store):
    older = commit(store, seed=1, when=1_800_000_000.0)
    newer = commit(store, seed=2, when=1_800_000_100.0)
    (store.state.parent / "manifests" / f"{newer.id}.manifest").write_bytes(b"damaged")  # listed first
    stray = store.state.parent / "manifests" / f"{older.id}.manifest.part-1234"
    stray.write_bytes(b"x")
    store.gc()
    assert not stray.exists()
    out = store.state.parent / "out"
    out.mkdir()
    store.materialize(older.id, out)
    assert (out / "pages-1.img").read_bytes() == np.random.default_rng(1).bytes(256 * 1024)


def test_commit_clears_the_error_and_times_the_whole_snapshot(store):
    import time

    record = staged(store)
    record.error = "a retry's old reason"
    done = store.commit(record, started=time.monotonic() - 2.5)
    assert done.error is None and done.status == "complete"
    assert 2.5 <= done.total_seconds < 60 and round(done.total_seconds, 4) == done.total_seconds
    assert store.commit(staged(store)).total_seconds is None  # not timed when not asked


def test_an_import_whose_files_differ_from_its_manifest_is_refused(store, tmp_path):
    from jupyter_ckpt.pack_format import StoredFile

    record = SnapshotRecord(id=new_snapshot_id(), kernel_id="k1", status="complete")
    directory = tmp_path / "imported"
    directory.mkdir()
    (directory / "core-1.img").write_bytes(b"what arrived")
    with pytest.raises(SnapshotNotRestorable) as e:
        store.commit_imported(record, directory, [StoredFile("core-1.img", 12, 1 << 20, [b"\0" * 32])])
    assert str(e.value) == "bundle: its files do not match its manifest"
    assert store.ids() == []


def test_a_manifest_that_cannot_be_read(store):
    done = commit(store)
    path = store.state.parent / "manifests" / f"{done.id}.manifest"
    path.unlink()
    path.mkdir()  # a directory in its place
    got = store.get(done.id)
    assert got.status == "failed" and got.error.startswith(f"the manifest of snapshot {done.id} cannot be read: ")
    unknown = new_snapshot_id()
    with pytest.raises(SnapshotNotFound) as e:
        store.manifest_bytes(unknown)
    assert str(e.value) == f"no snapshot with id {unknown!r}"


def note_put_stats(store) -> list:
    """Each later put's PutStats, in order (the real put_files runs; its result is noted)."""
    noted = []
    put_files = store.chunks.put_files

    def noting_put_files(*args):
        files, stats = put_files(*args)
        noted.append(stats)
        return files, stats

    store.chunks.put_files = noting_put_files
    return noted


def test_a_snapshot_is_compared_with_the_kernels_kept_images_and_stored_right(store):
    """The second snapshot of a kernel is compared with the first one's kept
    images; its manifest names exactly its own pages, also when the kept copy
    was changed behind the store's back (then it is not used)."""
    import blake3

    def hashes(data: bytes) -> list[bytes]:
        return [blake3.blake3(data[i : i + 4096]).digest() for i in range(0, len(data), 4096)]

    def snapshot_of(data: bytes) -> SnapshotRecord:
        record = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="auto", status="dumping")
        images = store.create(record)
        (images / "pages-1.img").write_bytes(data)
        (images / "inventory.img").write_bytes(b"inventory")
        return store.commit(record)

    put_stats = note_put_stats(store)

    kernel_id = str(uuid.uuid4())
    first = np.random.default_rng(1).bytes(64 * 4096)
    snapshot_of(first)
    changed = bytearray(first)
    changed[10 * 4096] ^= 1
    second = snapshot_of(bytes(changed))
    _, files = store.read_manifest(second.id)
    assert next(f for f in files if f.name == "pages-1.img").chunks == hashes(bytes(changed))
    assert [s.hashed_chunks for s in put_stats] == [64 + 1, 1 + 1]  # the changed page, the small inventory
    # The kept copy of the second, changed in place: a third snapshot equal to
    # the *kept* bytes must not borrow its hashes from the second's manifest.
    (_, kept) = store.kept_images.latest(kernel_id)
    tampered = bytearray(changed)
    tampered[20 * 4096] ^= 1
    (kept / "pages-1.img").write_bytes(bytes(tampered))
    third = snapshot_of(bytes(tampered))
    _, files = store.read_manifest(third.id)
    assert next(f for f in files if f.name == "pages-1.img").chunks == hashes(bytes(tampered))
    assert put_stats[-1].hashed_chunks == 64 + 1  # the kept copy was not used


def test_kept_images_are_trusted_without_hashing_only_as_they_were_kept(tmp_path):
    from jupyter_ckpt.image_cache import ImageCache

    cache = ImageCache(tmp_path / "images", 1 << 30)
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id=str(uuid.uuid4()), trigger="manual", status="complete")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "pages-1.img").write_bytes(b"p" * 8192)
    (staging / "core-1.img").write_bytes(b"core")
    cache.keep(record, staging)
    _, folder = cache.latest(record.kernel_id)
    pages, core = folder / "pages-1.img", folder / "core-1.img"
    assert cache.unchanged_since_kept(pages) and cache.unchanged_since_kept(core)
    with open(pages, "r+b") as f:  # changed in place, same size
        f.write(b"q")
    assert not cache.unchanged_since_kept(pages)
    (folder / "new-core").write_bytes(b"core")
    (folder / "new-core").rename(core)  # replaced by an equal file
    assert not cache.unchanged_since_kept(core)
    # Another process (a server started again) hashes them: it kept nothing itself.
    assert not ImageCache(tmp_path / "images", 1 << 30).unchanged_since_kept(folder / "pages-1.img")


def test_a_restore_hashes_kept_images_only_if_not_as_kept_with_the_manifests_digest(tmp_path, monkeypatch):
    """A kept image this process kept, unchanged since (same inode, size,
    modification and change times), with the digest the manifest names, is
    linked without hashing; one changed in place (its modification time set
    back), a digest that differs, or a cache that kept nothing (a server started
    again) are hashed, and a mismatch is not linked."""
    from jupyter_ckpt import image_cache
    from jupyter_ckpt.image_cache import ImageCache
    from jupyter_ckpt.pack_format import StoredFile, file_digest

    hashed = []
    real_digest = image_cache.file_digest
    monkeypatch.setattr(image_cache, "file_digest", lambda data: hashed.append(1) or real_digest(data))
    cache = ImageCache(tmp_path / "images", 1 << 30)
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id=str(uuid.uuid4()), trigger="manual", status="complete")
    staging = tmp_path / "staging"
    staging.mkdir()
    contents = {"pages-1.img": b"p" * 8192, "core-1.img": b"core"}
    files = []
    for name, data in contents.items():
        (staging / name).write_bytes(data)
        files.append(StoredFile(name, len(data), 4096, digest=file_digest(data)))
    cache.keep(record, staging, files, as_hashed(staging))

    def link(into: str, cache: ImageCache = cache, manifest: list[StoredFile] = files) -> bool:
        dest = tmp_path / into
        dest.mkdir()
        return cache.link(record, manifest, dest)

    assert link("restore-1") and hashed == []
    assert link("restore-2") and hashed == []  # linking changed the change time: noted
    assert link("restore-3", ImageCache(tmp_path / "images", 1 << 30)) and len(hashed) == 2
    hashed.clear()
    other = [StoredFile(f.name, f.size, f.chunk_size, digest=f.digest[::-1]) for f in files]
    assert not link("restore-4", manifest=other) and hashed == [1]  # dropped, as any mismatch
    again = staging_again(tmp_path, contents)
    cache.keep(record, again, files, as_hashed(again))
    _, folder = cache.latest(record.kernel_id)
    pages = folder / "pages-1.img"
    before = pages.stat()
    with open(pages, "r+b") as f:  # changed in place, same size, same modification time
        f.write(b"q")
    os.utime(pages, ns=(before.st_atime_ns, before.st_mtime_ns))
    hashed.clear()
    assert not link("restore-5") and hashed == [1]


def as_hashed(staging):
    from jupyter_ckpt.pack_reader import file_identity

    return {p.name: file_identity(p) for p in staging.iterdir()}


def test_an_image_written_after_it_was_hashed_is_not_trusted_as_kept(store, monkeypatch):
    """A staged image written (same size) after the store hashed it, before it
    is kept: it is kept, but not as holding its manifest's digest, so a
    restore hashes it and does not link it, and it is no parent either."""
    record = SnapshotRecord(id=new_snapshot_id(), kernel_id=str(uuid.uuid4()), trigger="auto", status="dumping")
    images = store.create(record)
    (images / "pages-1.img").write_bytes(np.random.default_rng(2).bytes(16 * 4096))
    (images / "inventory.img").write_bytes(b"inventory")
    real_put_files = store.chunks.put_files

    def put_files_then_write(directory, *args):
        stored = real_put_files(directory, *args)
        with open(directory / "pages-1.img", "r+b") as f:
            f.write(b"X")
        return stored

    monkeypatch.setattr(store.chunks, "put_files", put_files_then_write)
    done = store.commit(record)
    _, kept = store.kept_images.latest(record.kernel_id)
    _, files = store.read_manifest(done.id)
    pages = next(f for f in files if f.name == "pages-1.img")
    assert not store.kept_images.holds(kept / "pages-1.img", pages.digest)
    assert store.kept_images.holds(kept / "inventory.img", next(f for f in files if f.name == "inventory.img").digest)
    assert store.link_kept(record.kernel_id, done.id) is None
    dest = store.new_scratch_dir("restore-")
    assert not store.kept_images.link(done, files, dest)  # hashed: it does not match


def staging_again(tmp_path, contents: dict[str, bytes]):
    staging = tmp_path / "staging-again"
    staging.mkdir()
    for name, data in contents.items():
        (staging / name).write_bytes(data)
    return staging


def write_pagemap(path, pages_id: int, runs: list[tuple[int, int]]) -> None:
    """A CRIU pagemap image: its pages image's id, then runs of present pages."""
    import pycriu

    entries = [{"pages_id": pages_id}]
    entries += [{"vaddr": vaddr, "nr_pages": n, "flags": 4, "compat_nr_pages": 0} for vaddr, n in runs]
    with open(path, "wb") as f:
        pycriu.images.dump({"magic": "PAGEMAP", "entries": entries}, f)


def test_memory_images_are_compared_with_the_kept_pages_at_the_same_addresses(store):
    """Between two snapshots a process mapped two pages below its four, and
    changed one; another process's pages image took the first one's name.
    Only what is new is hashed; the manifests name each page's own hash."""
    import blake3

    def page(byte: int) -> bytes:
        return bytes([byte]) * 4096

    put_stats = note_put_stats(store)
    kernel_id, at = str(uuid.uuid4()), 0x7F0000010000
    first = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="auto", status="dumping")
    images = store.create(first)
    write_pagemap(images / "pagemap-7.img", 1, [(at, 4)])
    (images / "pages-1.img").write_bytes(b"".join(page(i) for i in range(4)))
    store.commit(first)

    second = SnapshotRecord(id=new_snapshot_id(), kernel_id=kernel_id, trigger="auto", status="dumping")
    images = store.create(second)
    write_pagemap(images / "pagemap-7.img", 2, [(at - 2 * 4096, 6)])  # two pages mapped below
    memory = [page(10), page(11), page(0), page(1), page(12), page(3)]  # and page 2 changed
    (images / "pages-2.img").write_bytes(b"".join(memory))
    write_pagemap(images / "pagemap-8.img", 1, [(at, 3)])  # another process, its pages now "pages-1"
    other = [page(20), page(21), page(22)]
    (images / "pages-1.img").write_bytes(b"".join(other))
    store.commit(second)

    # Hashed: the two new pages, the changed one, the other process's three,
    # and the two pagemaps (smaller than a chunk).
    assert put_stats[1].hashed_chunks == 2 + 1 + 3 + 2, put_stats[1]
    _, files = store.read_manifest(second.id)
    chunks = {f.name: f.chunks for f in files}
    assert chunks["pages-2.img"] == [blake3.blake3(p).digest() for p in memory]
    assert chunks["pages-1.img"] == [blake3.blake3(p).digest() for p in other]
