"""The chunk store and signed manifests, on real files, without a server."""

from __future__ import annotations

import os
import struct

import fsspec
import numpy as np
import pytest

from jupyter_ckpt import manifest
from jupyter_ckpt.chunk_index import ChunkIndex
from jupyter_ckpt.chunks import ChunkStore
from jupyter_ckpt.errors import SnapshotNotRestorable
from jupyter_ckpt.private_files import load_or_create_key

MiB = 1 << 20


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(fsspec.filesystem("file"), str(tmp_path / "backend"), tmp_path / "cache")
    yield s
    s.close()


def image_dir(path, pages: bytes, other: bytes = b"core image" * 100):
    path.mkdir(parents=True, exist_ok=True)
    (path / "pages-1.img").write_bytes(pages)
    (path / "core-1.img").write_bytes(other)
    return path


def random_pages(n_bytes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8)


def test_round_trip_is_byte_exact(store, tmp_path):
    data = random_pages(8 * MiB + 123).tobytes()
    src = image_dir(tmp_path / "a", data)
    files, stats = store.put_files(src)
    assert stats.raw_bytes == len(data) + 1000
    dest = tmp_path / "out"
    dest.mkdir()
    store.materialize(files, dest)
    assert (dest / "pages-1.img").read_bytes() == data
    assert (dest / "core-1.img").read_bytes() == (src / "core-1.img").read_bytes()
    assert os.stat(dest / "pages-1.img").st_mode & 0o777 == 0o600


def test_unchanged_second_version_costs_almost_nothing(store, tmp_path):
    data = random_pages(16 * MiB).tobytes()
    _, first = store.put_files(image_dir(tmp_path / "v1", data))
    _, second = store.put_files(image_dir(tmp_path / "v2", data))
    assert second.new_bytes <= 0.03 * first.new_bytes


def test_ten_percent_of_pages_changed_costs_about_ten_percent(store, tmp_path):
    pages = random_pages(16 * MiB)
    _, first = store.put_files(image_dir(tmp_path / "v1", pages.tobytes()))
    changed = pages.reshape(-1, 4096).copy()
    rows = np.random.default_rng(1).choice(len(changed), len(changed) // 10, replace=False)
    changed[rows, 0] ^= 0xFF  # scattered: the hard case for dedup
    _, second = store.put_files(image_dir(tmp_path / "v2", changed.tobytes()))
    assert second.new_bytes <= 0.15 * first.new_bytes


def test_zero_memory_costs_next_to_nothing(store, tmp_path):
    _, stats = store.put_files(image_dir(tmp_path / "z", bytes(64 * MiB)))
    assert stats.new_bytes < 64 * 1024


@pytest.fixture
def stored(store, tmp_path):
    files, _ = store.put_files(image_dir(tmp_path / "src", random_pages(2 * MiB).tobytes()))
    return files


def pack_path(store) -> str:
    (pack,) = [p for p in store.fs.ls(f"{store.root}/packs", detail=False) if p.endswith(".pack")]
    return pack


def restore_into(store, files, tmp_path):
    dest = tmp_path / "restore"
    dest.mkdir(exist_ok=True)
    store.materialize(files, dest)


def test_flipped_byte_in_a_pack_is_refused(store, stored, tmp_path):
    path = pack_path(store)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(SnapshotNotRestorable, match="corrupt|cannot be read"):
        restore_into(store, stored, tmp_path)


def test_truncated_pack_is_refused(store, stored, tmp_path):
    path = pack_path(store)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(SnapshotNotRestorable, match="cannot be read|corrupt"):
        restore_into(store, stored, tmp_path)


def test_deleted_pack_is_refused(store, stored, tmp_path):
    os.unlink(pack_path(store))
    with pytest.raises(SnapshotNotRestorable, match="cannot be read"):
        restore_into(store, stored, tmp_path)


def test_manifest_signature(stored, tmp_path):
    key = load_or_create_key(tmp_path / "keys" / "store.key")
    assert os.stat(tmp_path / "keys" / "store.key").st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "keys" / "store.key") == key  # created once
    data = manifest.encode({"id": "S1", "label": "x"}, stored, key)
    record, files = manifest.decode(data, key)
    assert record["label"] == "x" and [f.chunks for f in files] == [f.chunks for f in stored]

    edited = data.replace(b'"label": "x"', b'"label": "y"')
    with pytest.raises(SnapshotNotRestorable, match="signature"):
        manifest.decode(edited, key)
    with pytest.raises(SnapshotNotRestorable, match="signature"):
        manifest.decode(data, b"k" * 32)  # another store's key
    with pytest.raises(SnapshotNotRestorable, match="damaged or truncated|signature"):
        manifest.decode(data[: len(data) // 2], key)


def test_gc_reclaims_unreferenced_packs_and_partial_uploads(store, tmp_path):
    keep, _ = store.put_files(image_dir(tmp_path / "keep", random_pages(2 * MiB, seed=1).tobytes()))
    drop, _ = store.put_files(image_dir(tmp_path / "drop", random_pages(2 * MiB, seed=2).tobytes()))
    # A crash between writing a pack and its index leaves a pack nobody knows.
    store.fs.pipe_file(f"{store.root}/packs/deadbeef.pack", b"x" * 1000)
    referenced = {h for f in keep for h in f.chunks}
    deleted, freed = store.gc(referenced)
    assert deleted == 2 and freed > 2 * MiB * 0.9
    restore_into(store, keep, tmp_path)  # what is referenced survives
    with pytest.raises(SnapshotNotRestorable, match="missing"):
        restore_into(store, drop, tmp_path)


def test_index_cache_is_rebuilt_from_the_backend(store, stored, tmp_path):
    cache = tmp_path / "cache2"
    again = ChunkStore(store.fs, store.root, cache)
    restore_into(again, stored, tmp_path)
    again.close()
    # Every byte back, located through an index built from the backend's packs alone.
    assert (tmp_path / "restore" / "pages-1.img").read_bytes() == random_pages(2 * MiB).tobytes()
    assert (tmp_path / "restore" / "core-1.img").read_bytes() == b"core image" * 100
    assert any(cache.iterdir())


def test_closing_the_index_during_lookups_fails_them_cleanly(tmp_path):
    """A server stopping while a snapshot is being stored closes the index under
    a worker thread's lookups: they must fail with a clear error (a crash once)."""
    import threading

    index = ChunkIndex(tmp_path / "index")
    entries = b"".join(struct.pack("<32sQIII", os.urandom(32), 0, 1, 0, 1) for _ in range(20_000))
    index.add_pack("pack", b"JCKIDX1\n" + entries)
    wanted = [os.urandom(32) for _ in range(20_000)]
    failures: list[Exception] = []
    looking = threading.Event()

    def look_up() -> None:
        try:
            for _ in range(2000):
                index.locate(wanted)
                looking.set()
        except SnapshotNotRestorable as e:
            failures.append(e)

    worker = threading.Thread(target=look_up)
    worker.start()
    assert looking.wait(30)  # lookups are running
    index.close()
    worker.join()
    assert failures and "closed" in str(failures[0])


def test_index_finds_chunks_across_packs_and_forgets_dropped_ones(tmp_path):
    index = ChunkIndex(tmp_path / "index")
    packs = {}
    for p in range(20):  # enough packs to be merged into fewer sorted runs
        hashes = [os.urandom(32) for _ in range(1000)]
        # Two hashes with the same first 8 bytes: both must be found.
        hashes[0] = hashes[1][:8] + os.urandom(24)
        body = b"".join(struct.pack("<32sQIII", h, 4096 * i, 4096, 0, 4096) for i, h in enumerate(hashes))
        index.add_pack(f"pack{p}", b"JCKIDX1\n" + body)
        packs[f"pack{p}"] = hashes
    wanted = [h for hashes in packs.values() for h in hashes[::97]] + [os.urandom(32)]
    found, rows = index.locate(wanted)
    assert found[:-1].all() and not found[-1]
    assert index.pack_name(int(rows["pack"][0])) == "pack0" and int(rows["offset"][1]) == 4096 * 97
    index.drop_pack("pack0")
    found, _ = index.locate(packs["pack0"][:2] + packs["pack1"][:2])
    assert found.tolist() == [False, False, True, True]
    # A restart reads the copies it kept; a damaged copy is dropped.
    (tmp_path / "index" / "pack1.idx").write_bytes(b"garbage")
    index.close()
    again = ChunkIndex(tmp_path / "index")
    assert again.known_packs() == {f"pack{p}" for p in range(2, 20)}
    assert again.locate(packs["pack7"])[0].all()


# -- what gc takes and keeps, exactly -----------------------------------------------


def backend_files(store) -> dict[str, int]:
    return {os.path.basename(p): store.fs.size(p) for p in store.fs.ls(f"{store.root}/packs", detail=False)}


def test_gc_merges_small_packs_and_counts_what_it_freed(store, tmp_path):
    a, _ = store.put_files(image_dir(tmp_path / "a", random_pages(1 * MiB, seed=1).tobytes()))
    b, _ = store.put_files(image_dir(tmp_path / "b", random_pages(1 * MiB, seed=2).tobytes(), b"other core"))
    before = backend_files(store)
    assert len(before) == 4  # two packs, each with its index
    referenced = {h for f in a + b for h in f.chunks}
    deleted, freed = store.gc(referenced)
    after = backend_files(store)
    gone = set(before) - set(after)
    assert deleted == 2 and freed == sum(before[n] for n in gone) and len(gone) == 4
    assert len(after) == 2  # one pack of both, with its index
    restore_into(store, a, tmp_path)
    assert (tmp_path / "restore" / "pages-1.img").read_bytes() == random_pages(1 * MiB, seed=1).tobytes()
    assert store.gc(referenced) == (0, 0)  # a single small pack stays as it is


def test_gc_repacks_a_pack_under_half_live_and_keeps_one_at_half(store, tmp_path):
    pages = random_pages(4 * 4096, seed=3).tobytes()  # four distinct pages
    files, _ = store.put_files(image_dir(tmp_path / "a", pages, b""))
    [page_file] = [f for f in files if f.name == "pages-1.img"]
    half = set(page_file.chunks[:2])
    assert store.gc(half) == (0, 0)  # exactly half of its bytes live: kept
    deleted, freed = store.gc(set(page_file.chunks[:1]))
    assert deleted == 1 and freed > 0  # a quarter: its live chunk copied out, the pack deleted
    assert len(backend_files(store)) == 2
    kept = store.read_file(type(page_file)("pages-1.img", 4096, 4096, page_file.chunks[:1]))
    assert b"".join(bytes(c) for c in kept) == pages[:4096]


def test_gc_removes_stray_uploads_and_counts_them(store, tmp_path):
    store.put_files(image_dir(tmp_path / "a", random_pages(4096).tobytes()))
    store.fs.pipe_file(f"{store.root}/packs/cafe.pack.part", b"p" * 300)
    store.fs.pipe_file(f"{store.root}/packs/f00d.idx.part", b"i" * 20)
    store.fs.pipe_file(f"{store.root}/packs/beef.pack", b"x" * 1000)  # no index: a crash before it
    kept = set(backend_files(store)) - {"cafe.pack.part", "f00d.idx.part", "beef.pack"}
    everything = {h.tobytes() for p in store.index.known_packs() for h in store.index.pack_rows(p)["hash"]}
    assert store.gc(everything) == (3, 1320)
    assert set(backend_files(store)) == kept


def test_a_missing_chunk_is_named_by_its_place_in_the_file(store, tmp_path):
    first = random_pages(3000 * 4096, seed=4).tobytes()
    store.put_files(image_dir(tmp_path / "v1", first))
    second = first[: 2100 * 4096] + random_pages(900 * 4096, seed=5).tobytes()
    files, _ = store.put_files(image_dir(tmp_path / "v2", second))
    [pages] = [f for f in files if f.name == "pages-1.img"]
    newest = max(backend_files(store), key=lambda n: os.path.getmtime(f"{store.root}/packs/{n}"))
    pack = newest.split(".")[0]
    for suffix in (".pack", ".idx"):
        store.fs.rm_file(f"{store.root}/packs/{pack}{suffix}")
    with pytest.raises(SnapshotNotRestorable) as e:
        list(store.read_file(pages))  # this store's index still lists the pack
    assert str(e.value).startswith(f"pages-1.img: chunk 2100 cannot be read from pack {pack}: ")
    fresh = ChunkStore(store.fs, store.root, tmp_path / "fresh-cache")  # an index built from the backend
    with pytest.raises(SnapshotNotRestorable) as e:
        list(fresh.read_file(pages))
    fresh.close()
    assert str(e.value) == f"pages-1.img: chunk 2100 ({pages.chunks[2100].hex()[:16]}) is missing from the store"


def test_a_store_on_a_filesystem_that_is_not_local(tmp_path):
    """fsspec's in-memory filesystem stands in for an object store (packs are
    uploaded and read back through fsspec, not mapped)."""
    import uuid

    memory = fsspec.filesystem("memory")
    root = f"/ckpt-{uuid.uuid4().hex}"
    remote = ChunkStore(memory, root, tmp_path / "cache")
    data = random_pages(3 * MiB + 5).tobytes()
    files, _ = remote.put_files(image_dir(tmp_path / "a", data))
    dest = tmp_path / "out"
    dest.mkdir()
    remote.materialize(files, dest)
    assert (dest / "pages-1.img").read_bytes() == data
    assert memory.ls(f"{root}/packs", detail=False)
    remote.close()
    memory.rm(root, recursive=True)


def test_a_pack_copied_across_filesystems_is_private_and_whole(tmp_path):
    from jupyter_ckpt.chunks import _copy_private

    source, target = tmp_path / "staged.pack", tmp_path / "store" / "p.pack"
    target.parent.mkdir()
    source.write_bytes(b"pack" * 5000)
    os.umask(old := os.umask(0))
    try:
        _copy_private(source, target)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"pack" * 5000 and os.stat(target).st_mode & 0o777 == 0o600
    assert not source.exists() and not (tmp_path / "store" / "p.pack.part").exists()


def hashes_of(data: bytes, step: int = 4096) -> list[bytes]:
    """Each page's BLAKE3, computed here (not by the store)."""
    import blake3

    return [blake3.blake3(data[i : i + step]).digest() for i in range(0, len(data), step)]


def test_chunks_unchanged_against_a_reference_are_taken_from_it(store, tmp_path):
    from jupyter_ckpt.chunks import Reference

    first = random_pages(4 * MiB, seed=1)
    (first_files, _) = store.put_files(image_dir(tmp_path / "v1", first.tobytes()))
    second = first.copy()
    second[3 * 4096 + 7] ^= 1  # two pages changed in place
    second[700 * 4096] ^= 1
    grown = np.concatenate([second, random_pages(5 * 4096, seed=2)])  # and five new pages at the end
    references = {f.name: Reference.of(tmp_path / "v1" / f.name, f) for f in first_files}
    assert all(references.values())
    files, stats = store.put_files(image_dir(tmp_path / "v2", grown.tobytes()), references)
    pages = next(f for f in files if f.name == "pages-1.img")
    assert pages.chunks == hashes_of(grown.tobytes())
    # The changed and new pages were hashed, and the core image (shorter than
    # its chunk size: compared only as whole chunks): nothing else.
    assert stats.hashed_chunks == 2 + 5 + 1
    assert stats.new_chunks == 2 + 5
    # Unchanged: only the small core image is hashed, nothing is new.
    files, stats = store.put_files(image_dir(tmp_path / "v1-again", first.tobytes()), references)
    assert next(f for f in files if f.name == "pages-1.img").chunks == hashes_of(first.tobytes())
    assert (stats.hashed_chunks, stats.new_chunks) == (1, 0)
    # Grown past the reference by more than is read at a time: the new part is hashed.
    longer = np.concatenate([first, random_pages(12 * MiB, seed=7)])
    files, stats = store.put_files(image_dir(tmp_path / "longer", longer.tobytes()), references)
    assert next(f for f in files if f.name == "pages-1.img").chunks == hashes_of(longer.tobytes())
    assert stats.hashed_chunks == 12 * MiB // 4096 + 1
    # Shifted by a page: nothing lines up, everything is hashed, and the list is right.
    shifted = np.concatenate([random_pages(4096, seed=3), first])
    files, stats = store.put_files(image_dir(tmp_path / "v3", shifted.tobytes()), references)
    assert next(f for f in files if f.name == "pages-1.img").chunks == hashes_of(shifted.tobytes())
    assert stats.hashed_chunks == len(shifted) // 4096 + 1


def test_a_reference_is_used_only_if_it_is_the_file_its_manifest_names(store, tmp_path):
    """A kept image changed after it was stored (same size) must not lend its
    chunk hashes: the new snapshot would name chunks that are not its bytes."""
    from jupyter_ckpt.chunks import Reference

    data = random_pages(1 * MiB, seed=4).tobytes()
    (files, _) = store.put_files(image_dir(tmp_path / "v1", data))
    pages = next(f for f in files if f.name == "pages-1.img")
    kept = tmp_path / "v1" / "pages-1.img"
    changed = bytearray(data)
    changed[5] ^= 1
    kept.write_bytes(bytes(changed))
    assert Reference.of(kept, pages) is None
    assert Reference.of(tmp_path / "v1" / "missing.img", pages) is None
    kept.write_bytes(data + b"\0" * 4096)  # another size
    assert Reference.of(kept, pages) is None
    kept.write_bytes(data)
    assert Reference.of(kept, pages) is not None


def test_an_older_version_is_assembled_from_a_reference_where_it_holds_its_chunks(store, tmp_path):
    """Restoring an older snapshot: chunks the kernel's latest kept images hold
    (compared by hash, wherever they are) come from them; the packs give the
    rest. The first version's pack is deleted to show it."""
    from jupyter_ckpt.chunks import Reference

    older = random_pages(1 * MiB, seed=5)
    (older_files, _) = store.put_files(image_dir(tmp_path / "older", older.tobytes()))
    first_packs = set(store.pack_names())
    latest = np.concatenate([random_pages(4096, seed=6), older])  # shifted by a page
    latest[200 * 4096] ^= 1  # and one of the older's pages changed
    (latest_files, _) = store.put_files(image_dir(tmp_path / "latest", latest.tobytes()))
    references = {f.name: Reference.of(tmp_path / "latest" / f.name, f) for f in latest_files}
    # The older's page 199 (changed in the latest) is in no reference...
    for pack in first_packs:
        for ext in ("pack", "idx"):
            (tmp_path / "backend" / "packs" / f"{pack}.{ext}").unlink()
    store.sync_index()
    out = tmp_path / "out"
    out.mkdir()
    older_pages = [f for f in older_files if f.name == "pages-1.img"]
    with pytest.raises(SnapshotNotRestorable, match="pages-1.img: chunk 199 .* is missing"):
        store.materialize(older_pages, out, references)
    # ... with that page put back in the store (a third version holds it), it assembles byte-exact.
    store.put_files(image_dir(tmp_path / "third", older.tobytes()[199 * 4096 : 200 * 4096]))
    store.materialize(older_pages, out, references)
    assert (out / "pages-1.img").read_bytes() == older.tobytes()


def test_an_assembled_file_that_does_not_match_its_digest_is_refused(store, tmp_path):
    """Every chunk checks out, yet the whole differs from what was dumped (a
    reference whose bytes changed after it was trusted lent a wrong chunk):
    the file's digest says so."""
    from jupyter_ckpt.chunks import Reference

    data = random_pages(1 * MiB, seed=8).tobytes()
    (files, _) = store.put_files(image_dir(tmp_path / "v1", data))
    pages = next(f for f in files if f.name == "pages-1.img")
    changed = bytearray(data)
    changed[3 * 4096] ^= 1
    lying = Reference(memoryview(bytes(changed)), pages)  # trusted, though it changed
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SnapshotNotRestorable, match="pages-1.img: the assembled file does not match its digest"):
        store.materialize([pages], out, {"pages-1.img": lying})
    store.materialize([pages], out)
    assert (out / "pages-1.img").read_bytes() == data


def test_what_a_reference_matches_chunk_by_chunk():
    """Reference.matches on made-up pages: by place, and by the counterparts a
    page layout gives; the expected indices are written out here."""
    from jupyter_ckpt.chunks import Reference
    from jupyter_ckpt.pack_format import StoredFile

    page = 4096
    old_pages = [bytes([i]) * page for i in range(6)]  # six pages, each its own byte
    old = memoryview(b"".join(old_pages))
    stored = StoredFile("pages-1.img", len(old), page, [bytes([i]) * 32 for i in range(6)])
    by_place = Reference(old, stored)

    new = memoryview(b"".join([old_pages[0], b"x" * page, old_pages[2], old_pages[3], old_pages[5], b"y" * page]))
    assert by_place.matches(new, 0, len(new), page).tolist() == [0, -1, 2, 3, -1, -1]
    assert by_place.matches(new, 2 * page, 4 * page, page).tolist() == [2, 3]  # a block further on
    longer = memoryview(bytes(new) + old_pages[0] * 3)  # past the reference's end: no counterpart
    assert by_place.matches(longer, 0, len(longer), page).tolist() == [0, -1, 2, 3, -1, -1, -1, -1, -1]
    assert by_place.matches(longer, 6 * page, 9 * page, page).tolist() == [-1, -1, -1]
    half = memoryview(bytes(new) + b"z" * 100)  # a last piece shorter than a chunk is not matched
    assert len(by_place.matches(half, 0, len(half), page)) == 6
    assert by_place.matches(new, 0, page - 1, page).tolist() == []
    # Not comparable: another chunk size, a block not on a chunk, a size not in words.
    assert by_place.matches(new, 0, len(new), 2 * page).tolist() == [-1, -1, -1]
    assert by_place.matches(new, 8, 8 + 2 * page, page).tolist() == [-1, -1]
    odd = Reference(memoryview(b"a" * 60), StoredFile("core-1.img", 60, 12, [b"c" * 32] * 5))
    assert odd.matches(memoryview(b"a" * 60), 0, 60, 12).tolist() == [-1] * 5

    # By address: new page k is compared with old page counterparts[k].
    counterparts = np.array([5, 1, -1, 0, 9, 2], np.int64)  # 9: past the reference's end
    moved = memoryview(b"".join([old_pages[5], old_pages[1], old_pages[2], b"w" * page, old_pages[4], old_pages[2]]))
    by_address = Reference(old, stored, counterparts)
    assert by_address.matches(moved, 0, len(moved), page).tolist() == [5, 1, -1, -1, -1, 2]
    assert by_address.matches(moved, 4 * page, 6 * page, page).tolist() == [-1, 2]
    grown = memoryview(bytes(moved) + old_pages[3])  # more pages than counterparts given
    assert by_address.matches(grown, 0, len(grown), page).tolist() == [5, 1, -1, -1, -1, 2, -1]

    # Pages marked as copies of their counterparts (an incremental dump made
    # whole from this file) take them uncompared: page 3 differs, yet matches.
    copies = np.array([False, False, True, True, True, False])
    trusted = Reference(old, stored, counterparts, copies)
    assert trusted.matches(moved, 0, len(moved), page).tolist() == [5, 1, -1, 0, -1, 2]
    assert trusted.matches(moved, 2 * page, 4 * page, page).tolist() == [-1, 0]  # a block further on


def test_a_reference_finds_chunks_by_hash_wherever_they_are():
    from jupyter_ckpt.chunks import Reference
    from jupyter_ckpt.pack_format import StoredFile, chunk_hash

    pieces = [bytes([i]) * 4096 for i in range(4)] + [b"tail"]
    hashes = [chunk_hash(p) for p in pieces]
    reference = Reference(memoryview(b"".join(pieces)), StoredFile("pages-1.img", 4 * 4096 + 4, 4096, hashes))
    other = chunk_hash(b"not there")
    # The same first 8 bytes as a hash it holds, another hash: not found.
    twin = hashes[2][:8] + bytes(24)
    assert reference.offsets_of([hashes[3], other, hashes[0], twin, hashes[4]]) == [3 * 4096, None, 0, None, 4 * 4096]
    assert reference.offsets_of([]) == []
    empty = Reference(memoryview(b""), StoredFile("pages-2.img", 0, 4096, []))
    assert empty.offsets_of([hashes[0]]) == [None]
