"""Content-addressed, deduplicated, compressed storage of CRIU image files.

Files are cut into chunks (pack_format.chunk_size_for), each named by its
BLAKE3 hash and stored once across all snapshots and kernels. New chunks go in
runs ("frames") into packs (pack_writer); a pack's index lists, for each chunk,
where it is (pack_format). On the backend (any fsspec filesystem: a local
directory, S3 through s3fs)::

    packs/<pack>.pack    frames, back to back
    packs/<pack>.idx     where each of its chunks is

A pack is written, then its index; the index is what makes a pack's chunks
known, so a crash leaves at worst a pack without index or an index no manifest
refers to, both reclaimed by gc. Every chunk is checked against its hash when
read (pack_reader): a damaged pack cannot feed CRIU wrong bytes.

The union of the pack indexes is held in memory (chunk_index), with copies in a
local cache directory, so dedup lookups never list the backend.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from .chunk_index import ChunkIndex
from .errors import SnapshotNotRestorable
from .pack_format import FRAME_BYTES, PACK_BYTES, StoredFile, chunk_hash, chunk_size_for, file_digest, parse_idx
from .pack_reader import IOV_MAX, FileIdentity, FrameReader, file_identity, map_file, write_all
from .pack_writer import FinishedPack, FrameCompressor, FrameSink
from .private_files import fsync_dir, private_dir, private_opener, write_private_atomic

_READ_BYTES = 8 << 20  # read, hashed and looked up at a time


@dataclass
class PutStats:
    raw_bytes: int = 0  # bytes of the files
    new_bytes: int = 0  # compressed bytes added to the store
    new_chunks: int = 0
    chunks: int = 0
    hashed_chunks: int = 0  # the others were found unchanged against a reference


@dataclass
class Reference:
    """A file stored before, whose bytes are at hand and checked against its
    digest (a kernel's kept image of its previous snapshot). Where a new file
    holds the same bytes as one of its chunks, the new chunk is that chunk:
    comparing runs at memory speed, hashing page by page several times slower."""

    data: memoryview
    stored: StoredFile
    # For each chunk of the new file, the chunk of this one to compare it with
    # (the page at the same address: page_layout), -1 for none; None: the
    # chunk at the same place.
    counterparts: np.ndarray | None = None
    # For each chunk of the new file, whether it is a copy of its counterpart
    # (an incremental dump made whole from this very file: dirty_tracking),
    # so equal without comparing; None: compare them all.
    copies: np.ndarray | None = None

    @classmethod
    def of(cls, path: Path, stored: StoredFile, known_intact: bool = False) -> Reference | None:
        """The file at ``path`` if it is the one ``stored`` describes, else
        None. ``known_intact``: the caller knows it is (skips the digest)."""
        try:
            data = map_file(path)
        except OSError:
            return None
        if len(data) != stored.size or not (known_intact or (stored.digest and file_digest(data) == stored.digest)):
            return None
        return cls(data, stored)

    def matches(self, data: memoryview, first: int, end: int, step: int) -> np.ndarray:
        """For each whole chunk of ``data[first:end]``: the index of this
        file's chunk with the same bytes, or -1."""
        count = (end - first) // step
        whole = len(self.data) // step
        if count <= 0 or step % 8 or first % step or step != self.stored.chunk_size:
            return np.full(max(count, 0), -1, np.int64)
        base = first // step
        new = np.frombuffer(data, np.uint64, count * step // 8, first).reshape(count, step // 8)
        if self.counterparts is None:  # place by place: compared without a copy
            n = max(0, min(count, whole - base))
            found = np.full(count, -1, np.int64)
            if n:
                old = np.frombuffer(self.data, np.uint64, n * step // 8, first).reshape(n, step // 8)
                found[:n] = np.where((new[:n] == old).all(axis=1), np.arange(base, base + n), -1)
            return found
        candidates = np.full(count, -1, np.int64)
        given = self.counterparts[base : base + count]
        candidates[: len(given)] = given
        candidates[candidates >= whole] = -1
        valid = np.flatnonzero(candidates >= 0)
        found = np.full(count, -1, np.int64)
        if self.copies is not None:
            copied = np.zeros(count, bool)
            marks = self.copies[base : base + count]
            copied[: len(marks)] = marks
            found[valid[copied[valid]]] = candidates[valid[copied[valid]]]
            valid = valid[~copied[valid]]
        old = np.frombuffer(self.data, np.uint64, whole * step // 8).reshape(whole, step // 8)
        same = (new[valid] == old[candidates[valid]]).all(axis=1)
        found[valid[same]] = candidates[valid[same]]
        return found

    @functools.cached_property
    def _by_hash(self) -> tuple[np.ndarray, np.ndarray]:
        """The first 8 bytes of each chunk's hash, sorted, and which chunk each is
        (16 bytes a chunk, where a dict of the hashes would take ten times more)."""
        keys = np.frombuffer(b"".join(self.stored.chunks), "<u8").reshape(-1, 4)[:, 0]
        order = np.argsort(keys, kind="stable")
        return keys[order], order

    def offsets_of(self, hashes: list[bytes]) -> list[int | None]:
        """Where a chunk with each of ``hashes`` starts in this file, or None
        (equal hashes: equal bytes, of the chunk's length, wherever they are)."""
        keys, order = self._by_hash
        if not len(keys) or not hashes:
            return [None] * len(hashes)
        wanted = np.frombuffer(b"".join(hashes), "<u8").reshape(-1, 4)[:, 0]
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        candidates = order[at].tolist()
        step, chunks = self.stored.chunk_size, self.stored.chunks
        return [
            c * step if hit and chunks[c] == h else None
            for c, hit, h in zip(candidates, (keys[at] == wanted).tolist(), hashes, strict=True)
        ]


@dataclass
class Assembled:
    """A file stored before it is written (an incremental dump's whole pages
    file: dirty_tracking.WholePages). For each of its chunks, in order: the
    index of the chunk of ``base`` (a file stored before) it is a copy of,
    or -1 for the next chunk of ``source``."""

    from_base: np.ndarray
    source: Path
    base: StoredFile


class _Frame:
    """New chunks of one file, in file order, handed to the sink a frame at a time."""

    def __init__(self, sink: FrameSink):
        self.sink = sink
        self.chunks: list[tuple[bytes, memoryview]] = []
        self.bytes = 0

    def add(self, h: bytes, piece: memoryview) -> None:
        self.chunks.append((h, piece))
        self.bytes += len(piece)
        if self.bytes >= FRAME_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.chunks:
            self.sink.put(self.chunks)
            self.chunks, self.bytes = [], 0


def _row_tuples(rows: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Rows of chunk_index as (pack, offset, length, start, size)."""
    return list(zip(*(rows[f].tolist() for f in ("pack", "offset", "length", "start", "size")), strict=True))


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class ChunkStore:
    """Chunks on an fsspec filesystem ``fs`` under ``root``, indexed in ``cache_dir``."""

    def __init__(self, fs: Any, root: str, cache_dir: str | os.PathLike[str], zstd_level: int = 1):
        self.fs = fs
        self.root = root.rstrip("/")
        self.local = is_local(fs)
        self.cache_dir = private_dir(cache_dir)
        self.zstd_level = zstd_level
        self.makedirs("packs")
        self.index = ChunkIndex(self.cache_dir / "pack-indexes")
        self.sync_index()

    # -- backend helpers ------------------------------------------------------------

    def makedirs(self, rel: str) -> None:
        path = f"{self.root}/{rel}"
        if self.local:
            private_dir(path)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Local: temp file, fsync, rename. Object stores: one PUT is atomic."""
        path = f"{self.root}/{rel}"
        if self.local:
            write_private_atomic(Path(path), data)
        else:
            self.fs.pipe_file(path, data)

    def ls(self, rel: str) -> list[str]:
        """Fresh listing (another server may share the store); [] if absent."""
        path = f"{self.root}/{rel}"
        self.fs.invalidate_cache(path)
        try:
            return self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []

    def pack_names(self) -> set[str]:
        names = set()
        for p in self.ls("packs"):
            base = os.path.basename(p)
            if base.endswith(".idx"):
                names.add(base[: -len(".idx")])
        return names

    def sync_index(self) -> None:
        """Bring the local cache up to date with the packs on the backend."""
        on_backend = self.pack_names()
        cached = self.index.known_packs()
        for pack in cached - on_backend:
            self.index.drop_pack(pack)
        for pack in on_backend - cached:
            data = self.fs.cat_file(f"{self.root}/packs/{pack}.idx")
            if parse_idx(data) is None:
                continue  # not ours, or cut short: its chunks stay unknown and will be stored again
            self.index.add_pack(pack, data)

    # -- write ------------------------------------------------------------------------

    def _publish(self, pack: FinishedPack) -> None:
        """Upload a pack, then its index; only then are its chunks part of the store."""
        target = f"{self.root}/packs/{pack.name}.pack"
        if self.local:
            try:
                os.replace(pack.path, target)  # same disk by default; keeps 0600
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy_private(pack.path, Path(target))  # the state directory is on another filesystem
            fsync_dir(os.path.dirname(target))
        else:
            self.fs.put_file(str(pack.path), target)
        self.write_atomic(f"packs/{pack.name}.idx", pack.index)
        self.index.add_pack(pack.name, pack.index)

    def put_files(
        self,
        directory: Path,
        references: dict[str, Reference] | None = None,
        hashed: dict[str, FileIdentity] | None = None,
        assembled: dict[str, Assembled] | None = None,
    ) -> tuple[list[StoredFile], PutStats]:
        """Store every file of ``directory``; returns them as chunk lists.
        ``references``: files stored before, by name, to compare with.
        ``hashed``: filled with the identity of each file that did not change
        while it was read (its digest is of the bytes it held with it).
        ``assembled``: files not written yet, by name, stored from their
        pieces instead of the files those are taken from (no digest)."""
        stats = PutStats()
        files: list[StoredFile] = []
        sink = FrameSink(self.cache_dir, self._publish, FrameCompressor(self.zstd_level))
        seen_here: set[bytes] = set()  # new chunks already queued in this call
        assembled = assembled or {}
        sources = {a.source for a in assembled.values()}
        try:
            paths = {p.name: p for p in directory.iterdir() if p.is_file() and p not in sources}
            for name in sorted({*paths, *assembled}):
                if name in assembled:
                    piece = assembled[name]
                    before = file_identity(piece.source)
                    files.append(self._put_assembled(name, piece, sink, stats, seen_here))
                    if hashed is not None and file_identity(piece.source) == before:
                        hashed[piece.source.name] = before
                    continue
                path = paths[name]
                reference = (references or {}).get(name)
                before = file_identity(path)
                files.append(self._put_file(path, sink, stats, seen_here, reference))
                if hashed is not None and file_identity(path) == before:
                    hashed[name] = before
            sink.close()
        except BaseException as e:
            sink.abort()
            # The failed file's mapping must go now, not when the exception is
            # collected: a deleted image kept mapped keeps its disk space used
            # (a full disk stays full). Its views live in the frames below.
            traceback.clear_frames(e.__traceback__)
            raise
        stats.new_bytes = sink.new_bytes
        return files, stats

    def _put_file(
        self, path: Path, sink: FrameSink, stats: PutStats, seen_here: set[bytes], reference: Reference | None
    ) -> StoredFile:
        stored = StoredFile(path.name, path.stat().st_size, chunk_size_for(path.name))
        step = stored.chunk_size
        frame = _Frame(sink)
        # Chunks are views of the mapped file: copying 4 KiB pages one by one
        # costs as much as hashing them. The mapping lives as long as the last
        # view the frame sink still holds.
        data = map_file(path)
        for first in range(0, len(data), _READ_BYTES):
            end = min(first + _READ_BYTES, len(data))
            starts = range(first, end, step)
            found = reference.matches(data, first, end, step) if reference is not None else None
            if found is not None and (found >= 0).any():
                # Unchanged chunks take the reference's hashes; they are in the
                # store (its manifest refers to them, and gc waits for this put).
                known_chunks = reference.stored.chunks  # type: ignore[union-attr]
                hashes = [known_chunks[j] if j >= 0 else b"" for j in found.tolist()]
                hashed = np.flatnonzero(found < 0).tolist() + list(range(len(found), len(starts)))  # in file order
                hashes += [b""] * (len(starts) - len(found))
                for k in hashed:
                    hashes[k] = chunk_hash(data[starts[k] : starts[k] + step])
            else:
                hashes = [chunk_hash(data[i : i + step]) for i in starts]
                hashed = range(len(starts))
            stored.chunks += hashes
            stats.chunks += len(starts)
            self._add_new([hashes[k] for k in hashed], [starts[k] for k in hashed], data, step, frame, stats, seen_here)
        stats.raw_bytes += len(data)
        stored.digest = file_digest(data)
        frame.flush()  # a frame holds one file's chunks
        return stored

    def _put_assembled(
        self, name: str, assembled: Assembled, sink: FrameSink, stats: PutStats, seen_here: set[bytes]
    ) -> StoredFile:
        """Store a file that is not written yet: its base's chunks by their
        hashes, without reading them, and the source's in order."""
        step = chunk_size_for(name)
        taken = assembled.from_base
        known_chunks = assembled.base.chunks
        if step != assembled.base.chunk_size or (len(taken) and int(taken.max()) >= len(known_chunks)):
            raise ValueError(f"{name}: {assembled.base.name} has no such chunks")
        data = map_file(assembled.source)
        own = np.flatnonzero(taken < 0)
        if len(own) * step != len(data):
            raise ValueError(f"{name}: {assembled.source.name} holds {len(data)} bytes, {len(own) * step} expected")
        stored = StoredFile(name, len(taken) * step, step)
        hashes = [known_chunks[j] if j >= 0 else b"" for j in taken.tolist()]
        frame = _Frame(sink)
        per_block = _READ_BYTES // step
        for first in range(0, len(own), per_block):
            places = own[first : first + per_block].tolist()
            starts = range(first * step, (first + len(places)) * step, step)
            fresh = [chunk_hash(data[i : i + step]) for i in starts]
            for k, h in zip(places, fresh, strict=True):
                hashes[k] = h
            self._add_new(fresh, starts, data, step, frame, stats, seen_here)
        stored.chunks = hashes
        stats.chunks += len(taken)
        stats.raw_bytes += stored.size
        frame.flush()
        return stored

    def _add_new(
        self,
        hashes: list[bytes],
        starts: Sequence[int],
        data: memoryview,
        step: int,
        frame: _Frame,
        stats: PutStats,
        seen_here: set[bytes],
    ) -> None:
        """Queue the chunks of ``data`` at ``starts`` (hashed as ``hashes``) the store does not hold yet."""
        stats.hashed_chunks += len(hashes)
        known, _ = self.index.locate(hashes)  # a block at a time: one lookup
        for h, start, old in zip(hashes, starts, known.tolist(), strict=True):
            if old or h in seen_here:
                continue
            seen_here.add(h)
            stats.new_chunks += 1
            frame.add(h, data[start : start + step])

    # -- read -------------------------------------------------------------------------

    def pack_path(self, pack: str) -> str:
        return f"{self.root}/packs/{pack}.pack"

    def _open_pack(self, pack: str) -> Any:
        path = self.pack_path(pack)
        if self.local:
            # Frames stored as is are read without a copy. (Packs are only
            # ever replaced whole, never truncated in place: a mapped pack
            # cut short under us would fault.)
            return map_file(Path(path))
        return self.fs.open(path, "rb")

    def read_file(
        self, stored: StoredFile, reference: Reference | None = None, check_chunks: bool = True
    ) -> Iterator[memoryview]:
        """The file's bytes, chunk by chunk, each checked against its hash
        unless ``check_chunks`` is false (the caller checks the whole file);
        those ``reference`` holds (checked as a whole) are taken from it."""
        with FrameReader(self._open_pack) as frames:
            batch = 2048
            for first in range(0, len(stored.chunks), batch):
                hashes = stored.chunks[first : first + batch]
                at = reference.offsets_of(hashes) if reference is not None else [None] * len(hashes)
                read = [k for k, a in enumerate(at) if a is None]  # from the packs
                rows = self._locate(stored, [first + k for k in read])
                where = dict(zip(read, _row_tuples(rows), strict=True))
                for n in range(first, first + len(hashes)):
                    if at[n - first] is not None:
                        offset = at[n - first]
                        yield reference.data[offset : offset + reference.stored.chunk_size]  # type: ignore[union-attr]
                        continue
                    yield self._read_chunk(frames, stored, n, where[n - first], check_chunks)

    def _locate(self, stored: StoredFile, numbers: list[int]) -> np.ndarray:
        """Where chunks ``numbers`` of ``stored`` are (rows of chunk_index);
        SnapshotNotRestorable naming the first one the store lacks."""
        wanted = [stored.chunks[n] for n in numbers]
        found, rows = self.index.locate(wanted)
        if not found.all():
            self.sync_index()  # written by another server sharing the store, or a cold cache
            found, rows = self.index.locate(wanted)
        if not found.all():
            n = numbers[int(np.argmin(found))]
            raise SnapshotNotRestorable(
                f"{stored.name}: chunk {n} ({stored.chunks[n].hex()[:16]}) is missing from the store"
            )
        return rows

    def _read_chunk(self, frames: FrameReader, stored: StoredFile, n: int, row: tuple, check: bool) -> memoryview:
        pack, offset, length, start, size = row
        name = self.index.pack_name(pack)
        try:
            frame = frames.get(name, offset, length)
        except (OSError, zstandard.ZstdError) as e:
            raise SnapshotNotRestorable(f"{stored.name}: chunk {n} cannot be read from pack {name}: {e}") from None
        data = frame[start : start + size]
        if check and chunk_hash(data) != stored.chunks[n]:
            raise SnapshotNotRestorable(f"{stored.name}: chunk {n} is corrupt (its content does not match its hash)")
        return data

    def locate_all(self, stored: StoredFile) -> tuple[list[str], np.ndarray]:
        """The packs ``stored``'s chunks are in, and for each chunk its pack
        (an index of that list), frame offset and length, start and size."""
        rows = self._locate(stored, list(range(len(stored.chunks))))
        numbers, packs = np.unique(rows["pack"], return_inverse=True)
        table = np.zeros(
            len(rows), [("pack", "<u4"), ("offset", "<u8"), ("length", "<u4"), ("start", "<u4"), ("size", "<u4")]
        )
        table["pack"] = packs
        for field in ("offset", "length", "start", "size"):
            table[field] = rows[field]
        return [self.index.pack_name(int(p)) for p in numbers], table

    def read_chunks(self, stored: StoredFile, numbers: np.ndarray) -> Iterator[tuple[int, memoryview]]:
        """Chunks ``numbers`` (ascending) of ``stored``, each checked against its hash."""
        with FrameReader(self._open_pack) as frames:
            for first in range(0, len(numbers), 2048):
                batch = numbers[first : first + 2048].tolist()
                rows = self._locate(stored, batch)
                for n, row in zip(batch, _row_tuples(rows), strict=True):
                    yield n, self._read_chunk(frames, stored, n, row, True)

    def materialize(self, files: list[StoredFile], dest: Path, references: dict[str, Reference] | None = None) -> None:
        """Write verified copies of ``files`` into ``dest`` (private), taking
        the chunks ``references`` (by file name) hold from them."""
        for stored in files:
            target = dest / stored.name
            reference = (references or {}).get(stored.name)
            # With the file's digest (signed in the manifest) checked below, one
            # BLAKE3 of the whole file on every core replaces one per chunk in
            # this thread (about 0.9 s per GiB).
            check_chunks = not stored.digest
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                written, pending = 0, []
                for data in self.read_file(stored, reference, check_chunks):
                    pending.append(data)
                    if len(pending) == IOV_MAX:
                        written += write_all(fd, pending)
                        pending = []
                written += write_all(fd, pending)
            finally:
                os.close(fd)
            if written != stored.size:
                raise SnapshotNotRestorable(f"{stored.name}: {written} bytes read, {stored.size} expected")
            # The whole, against the digest taken from the bytes CRIU wrote
            # (what a reference lent included).
            if stored.digest and file_digest(map_file(target)) != stored.digest:
                # Name the corrupt chunk where one is (a second pass, checking each).
                for _ in self.read_file(stored, reference):
                    pass
                raise SnapshotNotRestorable(f"{stored.name}: the assembled file does not match its digest")

    # -- gc ---------------------------------------------------------------------------

    def gc(self, referenced: set[bytes], repack_below: float = 0.5) -> tuple[int, int]:
        """Delete packs none of whose chunks is referenced; copy the live chunks
        of packs less than ``repack_below`` live (by bytes), and of small packs
        when there are several, into new packs and delete those too; delete
        stray partial uploads. Returns (packs deleted, bytes freed)."""
        self.sync_index()
        doomed: list[str] = []
        keep: list[np.ndarray] = []  # live chunks of the packs to repack
        small: list[tuple[str, np.ndarray]] = []  # whole, but small: merged when there are several
        for pack in sorted(self.index.known_packs()):
            rows = self.index.pack_rows(pack)
            live = np.fromiter((h.tobytes() in referenced for h in rows["hash"]), bool, len(rows))
            live_bytes, total = int(rows["size"][live].sum()), int(rows["size"].sum())
            if live.all() or (live.any() and live_bytes >= repack_below * total):
                if total < PACK_BYTES // 2:
                    small.append((pack, rows[live]))
                continue
            doomed.append(pack)
            if live.any():
                keep.append(rows[live])
        if len(small) > 1:  # one snapshot's pages spread over many packs: a few full ones instead
            doomed += [pack for pack, _ in small]
            keep += [rows for _, rows in small]
        if keep:
            self._copy_chunks(np.concatenate(keep))  # published before the old packs go
        deleted = freed = 0
        for pack in doomed:
            for suffix in (".idx", ".pack"):  # index first: the pack is unknown from then on
                path = f"{self.root}/packs/{pack}{suffix}"
                if self.fs.exists(path):
                    freed += self.fs.size(path)
                    self.fs.rm_file(path)
            self.index.drop_pack(pack)
            deleted += 1
        # Packs whose index was never written (a crash mid-upload), and part files.
        indexed = self.pack_names()
        for p in self.ls("packs"):
            base = os.path.basename(p)
            stem = base.split(".", 1)[0]
            if ".part" in base or (base.endswith(".pack") and stem not in indexed):
                freed += self.fs.size(p)
                self.fs.rm_file(p)
                deleted += 1
        return deleted, freed

    def _copy_chunks(self, rows: np.ndarray) -> None:
        """Write the chunks at ``rows`` into new packs, each checked against its
        hash on the way (a damaged chunk stops gc before anything is deleted)."""
        sink = FrameSink(self.cache_dir, self._publish, FrameCompressor(self.zstd_level))
        pending: list[tuple[bytes, memoryview]] = []
        pending_bytes = 0
        try:
            with FrameReader(self._open_pack) as frames:
                where = zip(
                    rows["hash"],
                    *(rows[f].tolist() for f in ("pack", "offset", "length", "start", "size")),
                    strict=True,
                )
                for h, pack, offset, length, start, size in where:
                    data = frames.get(self.index.pack_name(pack), offset, length)[start : start + size]
                    if chunk_hash(data) != h.tobytes():
                        raise SnapshotNotRestorable(f"gc: a chunk of pack {self.index.pack_name(pack)} is corrupt")
                    pending.append((h.tobytes(), data))
                    pending_bytes += size
                    if pending_bytes >= FRAME_BYTES:
                        sink.put(pending)
                        pending, pending_bytes = [], 0
                if pending:
                    sink.put(pending)
            sink.close()
        except BaseException:
            sink.abort()
            raise

    def close(self) -> None:
        self.index.close()


def _copy_private(source: Path, target: Path) -> None:
    """Copy a finished pack across filesystems: to a part file, fsync, rename."""
    part = target.with_name(target.name + ".part")
    with open(source, "rb") as src, open(part, "wb", opener=private_opener) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(part, target)
    source.unlink()
