"""Content-addressed, deduplicated, compressed storage of CRIU image files.

Files are cut into chunks (memory pages: 4 KiB, so that a kernel that changed
10 % of its pages stores about 10 % again; other images: 1 MiB), each named by
its BLAKE3 hash and stored once across all snapshots and kernels. New chunks
go in runs ("frames", up to 1 MiB of one file's new chunks, in file order),
zstd-compressed where that pays, and are appended to a pack; a pack's index
lists, for each chunk, where it is.

On the backend (any fsspec filesystem: a local directory, S3 through s3fs)::

    packs/<pack>.pack    frames, back to back
    packs/<pack>.idx     per chunk: hash, frame offset, frame length (high bit:
                         stored as is), start in frame, size

A pack is written, then its index; the index is what makes a pack's chunks
known, so a crash leaves at worst a pack without index or an index no manifest
refers to, both reclaimed by gc. Every chunk is checked against its hash when
read: a damaged pack cannot feed CRIU wrong bytes.

The union of the pack indexes is held in memory (copies of them are kept in
a local cache directory), so dedup lookups never list the backend.
"""

from __future__ import annotations

import mmap
import os
import queue
import struct
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import blake3
import numpy as np
import zstandard

from .errors import SnapshotNotRestorable

PAGE_CHUNK = 4096
OTHER_CHUNK = 1 << 20
FRAME_BYTES = 1 << 20  # raw bytes of consecutive new chunks compressed together
_READ_BYTES = 8 << 20  # read, hashed and looked up at a time
PACK_BYTES = 64 << 20  # start a new pack after this many compressed bytes
HASH_BYTES = 32
_IDX_ENTRY = struct.Struct("<32sQIII")  # hash, frame offset, frame length, start in frame, size
_IDX_MAGIC = b"JCKIDX1\n"
_SAMPLE_BYTES = 64 << 10  # compressed first, to see whether a frame is worth compressing
_WORTH_IT = 0.9
# In an index entry's frame length: the frame is stored as is, not compressed
# (frames are at most a few MiB, so the bit is free).
_RAW_FRAME = 1 << 31


def chunk_size_for(name: str) -> int:
    return PAGE_CHUNK if name.startswith("pages-") else OTHER_CHUNK


_blake3 = blake3.blake3


def chunk_hash(data: bytes | memoryview) -> bytes:
    return _blake3(data).digest()


def file_digest(data: bytes | memoryview) -> str:
    """BLAKE3 of a whole file, on every core (a few tenths of a second per GiB)."""
    return _blake3(data, max_threads=_blake3.AUTO).hexdigest()


@dataclass
class StoredFile:
    """One image file as a list of chunk hashes."""

    name: str
    size: int
    chunk_size: int
    chunks: list[bytes] = field(default_factory=list)
    digest: str = ""  # BLAKE3 of the whole file, hex: checks a local copy in one pass


@dataclass
class PutStats:
    raw_bytes: int = 0  # bytes of the files
    new_bytes: int = 0  # compressed bytes added to the store
    new_chunks: int = 0
    chunks: int = 0


class ChunkIndex:
    """hash -> location of every chunk in the packs, held in memory as sorted
    numpy arrays, so that a block of 2048 pages is looked up in one vectorized
    search (per-chunk lookups cost more than hashing the pages). About 64 bytes
    per distinct chunk: 16 MiB per GiB of distinct pages.

    The packs' indexes on the backend are the truth; copies of them in
    ``cache_dir`` spare a restart downloading them again. A copy found damaged
    is dropped and fetched again."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._names: list[str] = []  # pack number -> name (slots of dropped packs stay)
        self._numbers: dict[str, int] = {}
        # Arrays of _ROW, each sorted by key, with its keys apart (contiguous:
        # searchsorted copies a strided array on every call).
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._closed = False
        loaded = []
        for path in sorted(self.dir.glob("*.idx")):
            entries = _parse_idx(path.read_bytes())
            if entries is None:
                path.unlink()
                continue
            loaded.append(self._rows(path.stem, entries))
        if loaded:
            self._runs = [_sorted_run(np.concatenate(loaded))]

    def _rows(self, pack: str, entries: np.ndarray) -> np.ndarray:
        number = self._numbers[pack] = len(self._names)
        self._names.append(pack)
        rows = np.empty(len(entries), _ROW)
        rows["hash"] = entries["hash"]
        rows["key"] = entries["hash"][:, 0]
        rows["pack"] = number
        for name in ("offset", "length", "start", "size"):
            rows[name] = entries[name]
        return rows

    def _check_open(self) -> None:
        if self._closed:
            # A server stopping while a snapshot is still being stored.
            raise SnapshotNotRestorable("the store was closed while this operation used it")

    def known_packs(self) -> set[str]:
        with self._lock:
            return set(self._numbers)

    def pack_name(self, number: int) -> str:
        return self._names[number]

    def add_pack(self, pack: str, idx: bytes) -> None:
        """Index a pack from its index file's bytes (and keep a copy)."""
        entries = _parse_idx(idx)
        if entries is None:
            raise ValueError(f"pack index {pack} is damaged")
        with self._lock:
            self._check_open()
            if pack in self._numbers:
                return
            self._runs.append(_sorted_run(self._rows(pack, entries)))
            # Runs of decreasing size, each at least twice the next: few
            # runs to search, and every row merged only O(log n) times.
            while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
                merged = np.concatenate([self._runs.pop()[1], self._runs.pop()[1]])
                self._runs.append(_sorted_run(merged))
        copy = self.dir / f"{pack}.idx"
        with open(copy, "wb", opener=_private_opener) as f:
            f.write(idx)

    def drop_pack(self, pack: str) -> None:
        with self._lock:
            number = self._numbers.pop(pack, None)
            if number is not None:
                self._runs = [_sorted_run(rows[rows["pack"] != number]) for _, rows in self._runs]
        (self.dir / f"{pack}.idx").unlink(missing_ok=True)

    def locate(self, hashes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``hashes``: whether it is stored, and its row of _ROW
        (pack number, frame offset and length, start in frame, size)."""
        wanted = np.frombuffer(b"".join(hashes), dtype="<u8").reshape(-1, 4)
        keys = wanted[:, 0]
        found = np.zeros(len(hashes), bool)
        rows = np.zeros(len(hashes), _ROW)
        with self._lock:
            self._check_open()
            for run_keys, run in self._runs:
                if not len(run):
                    continue
                at = np.minimum(np.searchsorted(run_keys, keys), len(run) - 1)
                maybe = np.nonzero((run_keys[at] == keys) & ~found)[0]
                candidates = run[at[maybe]]
                same = (candidates["hash"] == wanted[maybe]).all(axis=1)
                rows[maybe[same]] = candidates[same]
                found[maybe[same]] = True
                # Two hashes with the same first 8 bytes: look past the first.
                for i in maybe[~same]:
                    j = at[i] + 1
                    while j < len(run) and run_keys[j] == keys[i]:
                        if (run["hash"][j] == wanted[i]).all():
                            rows[i], found[i] = run[j], True
                            break
                        j += 1
        return found, rows

    def packs_of(self, hashes: set[bytes]) -> dict[str, int]:
        """pack -> number of the given hashes it holds."""
        counts = np.zeros(len(self._names) + 1, np.int64)
        ordered = list(hashes)
        for first in range(0, len(ordered), 1 << 20):
            found, rows = self.locate(ordered[first : first + (1 << 20)])
            counts += np.bincount(rows["pack"][found], minlength=len(counts))[: len(counts)]
        with self._lock:
            return {pack: int(counts[number]) for pack, number in self._numbers.items()}

    def close(self) -> None:
        # Under the lock: a snapshot still being stored when the server stops
        # may be looking up from a worker thread; it fails with a clear error.
        with self._lock:
            self._closed = True
            self._runs = []


_IDX_DTYPE = np.dtype(
    [("hash", "<u8", (4,)), ("offset", "<u8"), ("length", "<u4"), ("start", "<u4"), ("size", "<u4")]
)  # one entry of a pack index file (_IDX_ENTRY)
_ROW = np.dtype(
    [("key", "<u8"), ("hash", "<u8", (4,)), ("pack", "<i4"), ("offset", "<u8"), ("length", "<u4"), ("start", "<u4"), ("size", "<u4")]
)  # one chunk in the index: key is the hash's first 8 bytes


def _parse_idx(data: bytes) -> np.ndarray | None:
    """A pack index file's entries, or None if it is not one (or cut short)."""
    if not data.startswith(_IDX_MAGIC) or (len(data) - len(_IDX_MAGIC)) % _IDX_DTYPE.itemsize:
        return None
    return np.frombuffer(data, _IDX_DTYPE, offset=len(_IDX_MAGIC))


def _sorted_run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows[np.argsort(rows["key"], kind="stable")]
    return np.ascontiguousarray(rows["key"]), rows


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


class _PackWriter:
    """Appends frames to one pack file; index entries are written on close."""

    def __init__(self, store: "ChunkStore"):
        self.store = store
        self.name = uuid.uuid4().hex
        self.tmp_path = store.cache_dir / f"{self.name}.pack.part"
        self.file = open(self.tmp_path, "wb")
        os.chmod(self.tmp_path, 0o600)
        self.offset = 0
        self.entries: list[bytes] = []  # packed _IDX_ENTRY

    def add_frame(self, chunks: list[tuple[bytes, memoryview]]) -> int:
        raw = b"".join(data for _, data in chunks)
        frame = self.store._compress(raw)
        self.file.write(frame or raw)
        length = len(frame) if frame else len(raw) | _RAW_FRAME
        start = 0
        for h, data in chunks:
            self.entries.append(_IDX_ENTRY.pack(h, self.offset, length, start, len(data)))
            start += len(data)
        written = len(frame or raw)
        self.offset += written
        return written

    def finish(self) -> None:
        """Upload pack then index; only then are its chunks part of the store."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if not self.entries:
            os.unlink(self.tmp_path)
            return
        fs, root = self.store.fs, self.store.root
        target = f"{root}/packs/{self.name}.pack"
        if _is_local(fs):
            os.replace(self.tmp_path, target)  # same disk by default; keeps 0600
            _fsync_dir(os.path.dirname(target))
        else:
            fs.put_file(str(self.tmp_path), target)
        idx = _IDX_MAGIC + b"".join(self.entries)
        self.store._write_atomic(f"packs/{self.name}.idx", idx)
        self.tmp_path.unlink(missing_ok=True)
        self.store.index.add_pack(self.name, idx)

    def abort(self) -> None:
        self.file.close()
        if self.tmp_path.exists():
            os.unlink(self.tmp_path)


class _FrameSink:
    """Compresses frames and appends them to packs in a worker thread, so that
    reading, hashing and looking up the next chunks overlap compression and
    disk writes (zstd and file I/O release the GIL)."""

    def __init__(self, store: "ChunkStore", stats: PutStats):
        self.store, self.stats = store, stats
        self.queue: queue.Queue[list[tuple[bytes, memoryview]] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.writer = _PackWriter(store)
        self.thread = threading.Thread(target=self._work, daemon=True, name="jupyter-ckpt-packs")
        self.thread.start()

    def put(self, chunks: list[tuple[bytes, memoryview]]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunks)

    def _work(self) -> None:
        while (chunks := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining: the producer must never block on a dead sink
            try:
                self.stats.new_bytes += self.writer.add_frame(chunks)
                if self.writer.offset >= PACK_BYTES:
                    self.writer.finish()
                    self.writer = _PackWriter(self.store)
            except BaseException as e:
                self.error = e

    def close(self) -> None:
        """Wait for every frame, then publish the last pack."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.finish()

    def abort(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.writer.abort()


class _FrameReader:
    """Decompressed frames by location. A file's chunks come from a few frames
    at a time (the frame of its first version's pages, the frame of the pages
    changed since), so the last few frames and their packs are kept open."""

    _KEEP = 4

    def __init__(self, store: "ChunkStore"):
        self.store = store
        self.decompressor = zstandard.ZstdDecompressor()
        self.frames: dict[tuple[str, int], memoryview] = {}  # oldest first
        self.packs: dict[str, Any] = {}

    def get(self, pack: str, offset: int, length: int) -> memoryview:
        key = (pack, offset)
        frame = self.frames.pop(key, None)
        if frame is None:
            frame = self._read(pack, offset, length)
        self.frames[key] = frame  # most recent last
        if len(self.frames) > self._KEEP:
            del self.frames[next(iter(self.frames))]
        return frame

    def _read(self, pack: str, offset: int, length: int) -> memoryview:
        source = self.packs.pop(pack, None) or self._open(pack)
        self.packs[pack] = source  # most recent last
        if len(self.packs) > self._KEEP:
            del self.packs[next(iter(self.packs))]
        raw, length = length & _RAW_FRAME, length & ~_RAW_FRAME
        if isinstance(source, memoryview):  # a local pack, mapped
            data = source[offset : offset + length]
            if len(data) < length:
                raise OSError(f"pack {pack} ends before its frame at {offset}")
        else:
            source.seek(offset)
            data = source.read(length)
        if raw:
            return memoryview(data)
        return memoryview(self.decompressor.decompress(data, max_output_size=FRAME_BYTES + OTHER_CHUNK))

    def _open(self, pack: str) -> Any:
        path = f"{self.store.root}/packs/{pack}.pack"
        if _is_local(self.store.fs):
            # Frames stored as is are read without a copy. (Packs are only
            # ever replaced whole, never truncated in place: a mapped pack
            # cut short under us would fault.)
            return map_file(Path(path))
        return self.store.fs.open(path, "rb")

    def close(self) -> None:
        for source in self.packs.values():
            if not isinstance(source, memoryview):
                source.close()
        self.packs.clear()

    def __enter__(self) -> "_FrameReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkStore:
    """Chunks on an fsspec filesystem ``fs`` under ``root``, indexed in ``cache_dir``."""

    def __init__(self, fs, root: str, cache_dir: str | os.PathLike[str], zstd_level: int = 1):
        self.fs = fs
        self.root = root.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.makedirs("packs")
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self.index = ChunkIndex(self.cache_dir / "pack-indexes")
        self.sync_index()

    def _compress(self, raw: bytes) -> bytes | None:
        """The frame zstd-compressed, or None where that does not pay: random
        data (most float arrays) barely compresses, and stored as is it is
        read back without a copy."""
        sample = raw[:_SAMPLE_BYTES]
        if len(raw) > 2 * _SAMPLE_BYTES and len(self._compressor.compress(sample)) > _WORTH_IT * len(sample):
            return None
        frame = self._compressor.compress(raw)
        return frame if len(frame) < len(raw) else None

    # -- backend helpers ------------------------------------------------------------

    def makedirs(self, rel: str) -> None:
        path = f"{self.root}/{rel}"
        self.fs.makedirs(path, exist_ok=True)
        if _is_local(self.fs):
            os.chmod(path, 0o700)

    def _write_atomic(self, rel: str, data: bytes) -> None:
        """Local: temp file, fsync, rename. Object stores: one PUT is atomic."""
        path = f"{self.root}/{rel}"
        if _is_local(self.fs):
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
            if _parse_idx(data) is None:
                continue  # not ours, or cut short: its chunks stay unknown and will be stored again
            self.index.add_pack(pack, data)

    # -- write ------------------------------------------------------------------------

    def put_files(self, directory: Path) -> tuple[list[StoredFile], PutStats]:
        """Store every file of ``directory``; returns them as chunk lists."""
        stats = PutStats()
        files: list[StoredFile] = []
        sink = _FrameSink(self, stats)
        pending: list[tuple[bytes, memoryview]] = []  # new chunks of the next frame, in file order
        pending_bytes = 0
        seen_here: set[bytes] = set()  # new chunks already queued in this call
        try:
            for path in sorted(p for p in directory.iterdir() if p.is_file()):
                stored = StoredFile(path.name, path.stat().st_size, chunk_size_for(path.name))
                step = stored.chunk_size
                # Chunks are views of the mapped file: copying 4 KiB pages one
                # by one costs as much as hashing them. The mapping lives as
                # long as the last view the frame sink still holds.
                data = map_file(path)
                for first in range(0, len(data), _READ_BYTES):
                    pieces = [data[i : i + step] for i in range(first, min(first + _READ_BYTES, len(data)), step)]
                    hashes = [_blake3(piece).digest() for piece in pieces]
                    known, _ = self.index.locate(hashes)  # a block at a time: one lookup
                    stored.chunks += hashes
                    stats.chunks += len(pieces)
                    for h, piece, old in zip(hashes, pieces, known.tolist(), strict=True):
                        if old or h in seen_here:
                            continue
                        seen_here.add(h)
                        pending.append((h, piece))
                        pending_bytes += len(piece)
                        stats.new_chunks += 1
                        if pending_bytes >= FRAME_BYTES:
                            sink.put(pending)
                            pending, pending_bytes = [], 0
                stats.raw_bytes += len(data)
                stored.digest = file_digest(data)
                if pending:  # a frame holds one file's chunks
                    sink.put(pending)
                    pending, pending_bytes = [], 0
                files.append(stored)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return files, stats

    # -- read -------------------------------------------------------------------------

    def read_file(self, stored: StoredFile) -> Iterator[memoryview]:
        """The file's bytes, chunk by chunk, each checked against its hash."""
        with _FrameReader(self) as frames:
            batch = 2048
            for first in range(0, len(stored.chunks), batch):
                hashes = stored.chunks[first : first + batch]
                found, rows = self.index.locate(hashes)
                if not found.all():
                    self.sync_index()  # written by another server sharing the store, or a cold cache
                    found, rows = self.index.locate(hashes)
                if not found.all():
                    n = int(np.argmin(found))
                    raise SnapshotNotRestorable(f"{stored.name}: chunk {first + n} ({hashes[n].hex()[:16]}) is missing from the store")
                where = zip(
                    hashes, *(rows[f].tolist() for f in ("pack", "offset", "length", "start", "size")), strict=True
                )
                for n, (h, pack, offset, length, start, size) in enumerate(where, start=first):
                    name = self.index.pack_name(pack)
                    try:
                        frame = frames.get(name, offset, length)
                    except (OSError, zstandard.ZstdError) as e:
                        raise SnapshotNotRestorable(f"{stored.name}: chunk {n} cannot be read from pack {name}: {e}") from None
                    data = frame[start : start + size]
                    if chunk_hash(data) != h:
                        raise SnapshotNotRestorable(f"{stored.name}: chunk {n} is corrupt (its content does not match its hash)")
                    yield data

    def materialize(self, files: list[StoredFile], dest: Path) -> None:
        """Write verified copies of ``files`` into ``dest`` (private)."""
        for stored in files:
            target = dest / stored.name
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                written, pending = 0, []
                for data in self.read_file(stored):
                    pending.append(data)
                    if len(pending) == _IOV_MAX:
                        written += _write_all(fd, pending)
                        pending = []
                written += _write_all(fd, pending)
            finally:
                os.close(fd)
            if written != stored.size:
                raise SnapshotNotRestorable(f"{stored.name}: {written} bytes read, {stored.size} expected")

    # -- gc ---------------------------------------------------------------------------

    def gc(self, referenced: set[bytes]) -> tuple[int, int]:
        """Delete packs none of whose chunks is referenced, and stray partial
        uploads. Returns (packs deleted, bytes freed)."""
        self.sync_index()
        deleted = freed = 0
        counts = self.index.packs_of(referenced)
        for pack, live in counts.items():
            if live:
                continue
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

    def close(self) -> None:
        self.index.close()


_IOV_MAX = 1024  # buffers per writev


def map_file(path: Path) -> memoryview:
    """The file's bytes, mapped read-only (not copied)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return memoryview(b"")
        # Populated: one fault per 4 KiB page, taken page by page, costs as
        # much as hashing the page.
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    return memoryview(mapped)


def _write_all(fd: int, buffers: list[memoryview]) -> int:
    """writev the buffers (no joined copy), resuming after a short write."""
    total = sum(len(b) for b in buffers)
    written = os.writev(fd, buffers) if buffers else 0
    if written < total:  # rare (a signal, a full disk): finish with plain writes
        rest = memoryview(b"".join(buffers))[written:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_private_atomic(path: Path, data: bytes) -> None:
    """A 0600 file that readers see whole or not at all, durably: temporary
    file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
