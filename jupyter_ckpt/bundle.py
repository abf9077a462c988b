"""Export a snapshot as one self-contained file, and import it into another store.

A bundle::

    b"JCKPT-BUNDLE-1\\n"
    u64 length of the manifest, the manifest (signed, as in the store)
    one zstd stream: the bytes of the snapshot's files, in the manifest's order

Both directions stream: export reads verified chunks and compresses as it goes;
import decompresses into the store's staging area, checking every chunk against
the hash the manifest lists, then stores it like a fresh snapshot. A bundle
whose manifest is signed with another key is refused unless the caller trusts
it explicitly; it is then re-signed with this store's key (its content is still
verified chunk by chunk against the hashes it carries).
"""

from __future__ import annotations

import shutil
import struct
from typing import BinaryIO

import zstandard

from . import manifest
from .chunks import chunk_hash
from .errors import InvalidRequest, SnapshotNotFound, SnapshotNotRestorable
from .store import SnapshotRecord, SnapshotStore

MAGIC = b"JCKPT-BUNDLE-1\n"
_LEN = struct.Struct("<Q")
_MAX_MANIFEST = 512 << 20


def export_bundle(store: SnapshotStore, snapshot_id: str, out: BinaryIO) -> int:
    """Write the bundle of a complete snapshot to ``out``; returns bytes written."""
    data = store.fs.cat_file(store._manifest_path(snapshot_id))
    record, files = manifest.decode(data, store.key, name=f"the manifest of snapshot {snapshot_id}")
    if record.get("status") != "complete":
        raise SnapshotNotRestorable(f"snapshot {snapshot_id} is not complete")
    counter = _CountingWriter(out)
    counter.write(MAGIC + _LEN.pack(len(data)) + data)
    with zstandard.ZstdCompressor(level=3).stream_writer(counter, closefd=False) as z:
        for stored in files:
            for chunk in store.chunks.read_file(stored):
                z.write(chunk)
    return counter.count


def import_bundle(store: SnapshotStore, src: BinaryIO, trust: bool = False) -> SnapshotRecord:
    """Read a bundle from ``src`` into ``store``; returns the imported snapshot."""
    if src.read(len(MAGIC)) != MAGIC:
        raise InvalidRequest("not a jupyter-ckpt bundle")
    (length,) = _LEN.unpack(_read_exactly(src, _LEN.size))
    if length > _MAX_MANIFEST:
        raise InvalidRequest("bundle manifest is implausibly large")
    data = _read_exactly(src, length)
    try:
        fields, files = manifest.decode(data, store.key, name="the bundle's manifest")
        signed_here = True
    except manifest.SignatureMismatch:
        if not trust:
            raise SnapshotNotRestorable(
                "the bundle is signed with another store's key: share the key between the servers, "
                "or import it explicitly trusting its origin"
            ) from None
        fields, files = manifest.decode(data, None, name="the bundle's manifest")
        signed_here = False
    record = SnapshotRecord.from_json(fields)
    try:
        store.get(record.id)
    except SnapshotNotFound:
        pass
    else:
        raise InvalidRequest(f"snapshot {record.id} is already in this store")
    record.status = "storing"
    staging = store.create(record)
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(src, closefd=False)
        for stored in files:
            with open(staging / stored.name, "wb") as out:
                for n, expected in enumerate(stored.chunks):
                    size = min(stored.chunk_size, stored.size - n * stored.chunk_size)
                    chunk = _read_exactly(reader, size)
                    if chunk_hash(chunk) != expected:
                        raise SnapshotNotRestorable(f"bundle: {stored.name} chunk {n} does not match its hash")
                    out.write(chunk)
        stored_files, stats = store.chunks.put_files(staging)
        if [f.chunks for f in stored_files] != [f.chunks for f in files]:
            raise SnapshotNotRestorable("bundle: its files do not match its manifest")
        record.status, record.error = "complete", None
        record.stored_bytes = stats.new_bytes
        if signed_here:
            store.chunks._write_atomic(f"manifests/{record.id}.manifest", data)
        else:
            store._write_manifest(record, stored_files)
        store._record_path(record.id).unlink(missing_ok=True)
    except BaseException as e:
        reason = str(e) if isinstance(e, (SnapshotNotRestorable, InvalidRequest)) else f"import failed: {e}"
        store.fail(record, reason)
        store.delete(record.id)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return store.get(record.id)


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = src.read(left)
        if not part:
            raise SnapshotNotRestorable("bundle is truncated")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class _CountingWriter:
    def __init__(self, out: BinaryIO):
        self.out, self.count = out, 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()
