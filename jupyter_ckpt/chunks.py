"""Content-addressed, deduplicated, compressed storage of CRIU image files.

Files are cut into chunks (memory pages: 4 KiB, so that a kernel that changed
10 % of its pages stores about 10 % again; other images: 1 MiB), each named by
its BLAKE3 hash and stored once across all snapshots and kernels. New chunks
are zstd-compressed in runs ("frames", up to 1 MiB of consecutive new chunks)
and appended to a pack; a pack's index lists, for each chunk, where it is.

On the backend (any fsspec filesystem: a local directory, S3 through s3fs)::

    packs/<pack>.pack    zstd frames, back to back
    packs/<pack>.idx     per chunk: hash, frame offset, frame length, start in frame, size

A pack is written, then its index; the index is what makes a pack's chunks
known, so a crash leaves at worst a pack without index or an index no manifest
refers to, both reclaimed by gc. Every chunk is checked against its hash when
read: a damaged pack cannot feed CRIU wrong bytes.

A local SQLite file caches the union of the pack indexes (rebuilt from them
when missing), so dedup lookups never list the backend.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import struct
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import blake3
import zstandard

from .errors import SnapshotNotRestorable

PAGE_CHUNK = 4096
OTHER_CHUNK = 1 << 20
FRAME_BYTES = 1 << 20  # raw bytes of consecutive new chunks compressed together
PACK_BYTES = 64 << 20  # start a new pack after this many compressed bytes
HASH_BYTES = 32
_IDX_ENTRY = struct.Struct("<32sQIII")  # hash, frame offset, frame length, start in frame, size
_IDX_MAGIC = b"JCKIDX1\n"
_SAMPLE_BYTES = 64 << 10  # compressed first, to see whether a frame is worth compressing
_WORTH_IT = 0.9


def chunk_size_for(name: str) -> int:
    return PAGE_CHUNK if name.startswith("pages-") else OTHER_CHUNK


def chunk_hash(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


@dataclass
class StoredFile:
    """One image file as a list of chunk hashes."""

    name: str
    size: int
    chunk_size: int
    chunks: list[bytes] = field(default_factory=list)


@dataclass
class PutStats:
    raw_bytes: int = 0  # bytes of the files
    new_bytes: int = 0  # compressed bytes added to the store
    new_chunks: int = 0
    chunks: int = 0


@dataclass
class _Location:
    pack: str
    offset: int  # of the frame in the pack
    length: int  # of the compressed frame
    start: int  # of the chunk in the decompressed frame
    size: int


class ChunkIndex:
    """hash -> location, in a local SQLite cache of the packs' indexes.

    Only a cache: the pack indexes on the backend are the truth. So it is
    written without fsync, and a cache found damaged is rebuilt from them."""

    def __init__(self, path: Path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError:
            for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                stale.unlink(missing_ok=True)
            self._db = self._open(path)

    def _open(self, path: Path) -> sqlite3.Connection:
        # Private before SQLite opens it: its WAL and shared-memory files take
        # the database file's permissions.
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        db = sqlite3.connect(str(path), check_same_thread=False)
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=off")
        with db:
            db.execute(
                "create table if not exists chunks (hash blob primary key, pack text, "
                "offset integer, length integer, start integer, size integer) without rowid"
            )
            db.execute("create table if not exists packs (pack text primary key)")
        return db

    def known_packs(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("select pack from packs")}

    def add_pack(self, pack: str, entries: Iterable[tuple[bytes, int, int, int, int]]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "insert or ignore into chunks values (?, ?, ?, ?, ?, ?)",
                ((h, pack, off, ln, start, size) for h, off, ln, start, size in entries),
            )
            self._db.execute("insert or ignore into packs values (?)", (pack,))

    def drop_pack(self, pack: str) -> None:
        with self._lock, self._db:
            self._db.execute("delete from chunks where pack = ?", (pack,))
            self._db.execute("delete from packs where pack = ?", (pack,))


    def lookup_many(self, hashes: list[bytes]) -> dict[bytes, _Location]:
        """Locations of those of ``hashes`` that are stored (one query per 500)."""
        found: dict[bytes, _Location] = {}
        unique = list(dict.fromkeys(hashes))
        with self._lock:
            for i in range(0, len(unique), 500):
                batch = unique[i : i + 500]
                rows = self._db.execute(
                    "select hash, pack, offset, length, start, size from chunks where hash in "
                    f"({','.join('?' * len(batch))})",
                    batch,
                ).fetchall()
                for row in rows:
                    found[row[0]] = _Location(*row[1:])
        return found

    def packs_of(self, hashes: set[bytes]) -> dict[str, int]:
        """pack -> number of the given hashes it holds."""
        out: dict[str, int] = {}
        with self._lock:
            for (pack,) in self._db.execute("select pack from chunks").fetchall():
                out.setdefault(pack, 0)
            for h in hashes:
                row = self._db.execute("select pack from chunks where hash = ?", (h,)).fetchone()
                if row:
                    out[row[0]] = out.get(row[0], 0) + 1
        return out

    def close(self) -> None:
        # Under the lock: a snapshot still being stored when the server stops
        # may be querying from a worker thread, and closing a SQLite connection
        # in the middle of a query crashes the process. Queries after this one
        # fail with an error instead (the snapshot is recorded failed).
        with self._lock:
            self._db.close()


class _PackWriter:
    """Appends frames to one pack file; index entries are written on close."""

    def __init__(self, store: "ChunkStore"):
        self.store = store
        self.name = uuid.uuid4().hex
        self.tmp_path = store.cache_dir / f"{self.name}.pack.part"
        self.file = open(self.tmp_path, "wb")
        os.chmod(self.tmp_path, 0o600)
        self.offset = 0
        self.entries: list[tuple[bytes, int, int, int, int]] = []

    def add_frame(self, chunks: list[tuple[bytes, bytes]]) -> int:
        raw = b"".join(data for _, data in chunks)
        frame = self.store._compress(raw)
        self.file.write(frame)
        start = 0
        for h, data in chunks:
            self.entries.append((h, self.offset, len(frame), start, len(data)))
            start += len(data)
        self.offset += len(frame)
        return len(frame)

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
        idx = _IDX_MAGIC + b"".join(_IDX_ENTRY.pack(*e) for e in self.entries)
        self.store._write_atomic(f"packs/{self.name}.idx", idx)
        self.tmp_path.unlink(missing_ok=True)
        self.store.index.add_pack(self.name, self.entries)

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
        self.queue: queue.Queue[list[tuple[bytes, bytes]] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.writer = _PackWriter(store)
        self.thread = threading.Thread(target=self._work, daemon=True, name="jupyter-ckpt-packs")
        self.thread.start()

    def put(self, chunks: list[tuple[bytes, bytes]]) -> None:
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
    """Decompressed frames by location, reading each frame once and keeping the
    pack being read open (a file's frames come mostly in order)."""

    def __init__(self, store: "ChunkStore"):
        self.store = store
        self.decompressor = zstandard.ZstdDecompressor()
        self.key: tuple[str, int] | None = None
        self.frame = b""
        self.pack_name: str | None = None
        self.pack = None

    def get(self, loc: _Location) -> bytes:
        if self.key != (loc.pack, loc.offset):
            if self.pack_name != loc.pack:
                self.close()
                self.pack = self.store.fs.open(f"{self.store.root}/packs/{loc.pack}.pack", "rb")
                self.pack_name = loc.pack
            self.pack.seek(loc.offset)
            self.frame = self.decompressor.decompress(self.pack.read(loc.length), max_output_size=FRAME_BYTES + OTHER_CHUNK)
            self.key = (loc.pack, loc.offset)
        return self.frame

    def close(self) -> None:
        if self.pack is not None:
            self.pack.close()
            self.pack, self.pack_name = None, None

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
        self._fast = zstandard.ZstdCompressor(level=-1)
        self.index = ChunkIndex(self.cache_dir / "chunk-index.sqlite")
        self.sync_index()

    def _compress(self, raw: bytes) -> bytes:
        """zstd, at full effort only where it pays: random data (most float
        arrays) barely compresses, at a fifth of the speed of storing it."""
        sample = raw[:_SAMPLE_BYTES]
        if len(raw) > 2 * _SAMPLE_BYTES and len(self._compressor.compress(sample)) > _WORTH_IT * len(sample):
            return self._fast.compress(raw)
        return self._compressor.compress(raw)

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
            if not data.startswith(_IDX_MAGIC) or (len(data) - len(_IDX_MAGIC)) % _IDX_ENTRY.size:
                continue  # not ours, or cut short: its chunks stay unknown and will be stored again
            body = data[len(_IDX_MAGIC):]
            self.index.add_pack(pack, (_IDX_ENTRY.unpack_from(body, i) for i in range(0, len(body), _IDX_ENTRY.size)))

    # -- write ------------------------------------------------------------------------

    def put_files(self, directory: Path) -> tuple[list[StoredFile], PutStats]:
        """Store every file of ``directory``; returns them as chunk lists."""
        stats = PutStats()
        files: list[StoredFile] = []
        sink = _FrameSink(self, stats)
        pending: list[tuple[bytes, bytes]] = []  # consecutive new chunks of the current frame
        pending_bytes = 0
        seen_here: set[bytes] = set()  # new chunks already queued in this call

        def flush() -> None:
            nonlocal pending, pending_bytes
            if pending:
                sink.put(pending)
                pending, pending_bytes = [], 0

        try:
            for path in sorted(p for p in directory.iterdir() if p.is_file()):
                size = path.stat().st_size
                stored = StoredFile(path.name, size, chunk_size_for(path.name))
                step = stored.chunk_size
                with open(path, "rb") as f:
                    # A block of chunks at a time: one index query per block.
                    while block := f.read(max(step, FRAME_BYTES)):
                        pieces = [block[i : i + step] for i in range(0, len(block), step)]
                        hashes = [chunk_hash(data) for data in pieces]
                        known = self.index.lookup_many(hashes)
                        for h, data in zip(hashes, pieces, strict=True):
                            stored.chunks.append(h)
                            stats.chunks += 1
                            stats.raw_bytes += len(data)
                            if h in seen_here or h in known:
                                flush()  # a frame holds consecutive new chunks only
                                continue
                            seen_here.add(h)
                            pending.append((h, data))
                            pending_bytes += len(data)
                            stats.new_chunks += 1
                            if pending_bytes >= FRAME_BYTES:
                                flush()
                flush()
                files.append(stored)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return files, stats

    # -- read -------------------------------------------------------------------------

    def read_file(self, stored: StoredFile) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk, each checked against its hash."""
        with _FrameReader(self) as frames:
            batch = 2048
            for first in range(0, len(stored.chunks), batch):
                hashes = stored.chunks[first : first + batch]
                where = self.index.lookup_many(hashes)
                if len(where) < len(set(hashes)):
                    self.sync_index()  # written by another server sharing the store, or a cold cache
                    where = self.index.lookup_many(hashes)
                for n, h in enumerate(hashes, start=first):
                    loc = where.get(h)
                    if loc is None:
                        raise SnapshotNotRestorable(f"{stored.name}: chunk {n} ({h.hex()[:16]}) is missing from the store")
                    try:
                        frame = frames.get(loc)
                    except (OSError, zstandard.ZstdError) as e:
                        raise SnapshotNotRestorable(f"{stored.name}: chunk {n} cannot be read from pack {loc.pack}: {e}") from None
                    data = frame[loc.start : loc.start + loc.size]
                    if chunk_hash(data) != h:
                        raise SnapshotNotRestorable(f"{stored.name}: chunk {n} is corrupt (its content does not match its hash)")
                    yield data

    def materialize(self, files: list[StoredFile], dest: Path) -> None:
        """Write verified copies of ``files`` into ``dest`` (private)."""
        for stored in files:
            target = dest / stored.name
            with open(target, "wb") as out:
                os.chmod(target, 0o600)
                written, buffered = 0, []
                for data in self.read_file(stored):
                    buffered.append(data)
                    written += len(data)
                    if len(buffered) >= 256:
                        out.write(b"".join(buffered))
                        buffered = []
                out.write(b"".join(buffered))
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
