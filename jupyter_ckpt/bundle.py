"""Export a snapshot as one self-contained file, and import it into another store.

A bundle::

    b"JCKPT-BUNDLE-1\\n"
    u64 length of the manifest, the manifest (signed, as in the store)
    one zstd stream: the bytes of the snapshot's files, in the manifest's order

Both directions stream: export reads verified chunks and compresses as it goes;
import decompresses into the store's staging area, checking every chunk against
the hash the manifest lists, then stores it like a fresh snapshot. A bundle
whose manifest is signed with another key is refused unless the caller trusts
it explicitly. An imported snapshot is signed with this store's key; its record
keeps who signed the bundle (see import_bundle).
"""

from __future__ import annotations

import shutil
import struct
import uuid
from collections.abc import Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import zstandard

from . import manifest
from .errors import InvalidRequest, SnapshotNotRestorable
from .pack_format import StoredFile, chunk_hash
from .private_files import key_fingerprint, private_opener
from .records import SnapshotRecord
from .store import SnapshotStore

MAGIC = b"JCKPT-BUNDLE-1\n"
_LEN = struct.Struct("<Q")
_MAX_MANIFEST = 512 << 20
# Images a bundle may hold, in all, unless the caller says otherwise
# (CheckpointApp.max_import_bytes).
DEFAULT_MAX_IMPORT_BYTES = 256 << 30


def export_bundle(store: SnapshotStore, snapshot_id: str, out: BinaryIO) -> int:
    """Write the bundle of a complete snapshot to ``out``; returns bytes written."""
    data = store.manifest_bytes(snapshot_id)
    record, files = manifest.decode(data, store.key, name=f"the manifest of snapshot {snapshot_id}")
    if record.get("status") != "complete":
        raise SnapshotNotRestorable(f"snapshot {snapshot_id} is not complete")
    counter = _CountingWriter(out)
    counter.write(MAGIC + _LEN.pack(len(data)) + data)
    with zstandard.ZstdCompressor(level=3).stream_writer(counter, closefd=False) as z:
        for stored in files:
            for chunk in store.read_chunks(stored):
                z.write(chunk)
    return counter.count


def import_bundle(
    store: SnapshotStore,
    src: BinaryIO,
    trust: bool = False,
    max_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
    running_kernels: Collection[str] = (),
) -> SnapshotRecord:
    """Read a bundle from ``src`` into ``store``; returns the imported snapshot.

    A bundle is hostile input even when trusted (trust accepts the signer; it
    skips no check): the manifest's structure, names, sizes and record are
    checked before a byte is written, the files are decompressed only up to
    their declared sizes (at most ``max_bytes`` in all) into a private scratch
    folder, every chunk is checked against its hash, and only then is the
    snapshot stored. Its record says when it was imported, which key signed
    it and whether this store could verify that. It never takes the id of a
    kernel in ``running_kernels`` (the kernels running here)."""
    if src.read(len(MAGIC)) != MAGIC:
        raise InvalidRequest("not a jupyter-ckpt bundle")
    (length,) = _LEN.unpack(_read_exactly(src, _LEN.size))
    if length > _MAX_MANIFEST:
        raise InvalidRequest("bundle manifest is implausibly large")
    data = _read_exactly(src, length)
    name = "the bundle's manifest"
    try:
        try:
            fields, files = manifest.decode(data, store.key, name=name, max_bytes=max_bytes)
            verified = True
        except manifest.SignatureMismatch:
            if not trust:
                raise SnapshotNotRestorable(
                    "the bundle is signed with another store's key: share the key between the servers, "
                    "or import it explicitly trusting its origin"
                ) from None
            fields, files = manifest.decode(data, None, name=name, max_bytes=max_bytes)
            verified = False
        record = SnapshotRecord.from_untrusted(fields)
    except (manifest.MalformedManifest, ValueError) as e:
        raise InvalidRequest(f"the bundle cannot be imported: {e}") from None
    if store.exists(record.id):
        raise InvalidRequest(f"snapshot {record.id} is already in this store")
    needed = sum(f.size for f in files)
    free = shutil.disk_usage(store.state).free
    if needed > free:
        raise InvalidRequest(f"the bundle holds {needed} bytes of images; {free} bytes are free here")
    if not verified and record.kernel_id in running_kernels:
        # Signed elsewhere, it must not pass for a kernel of this server's: it
        # would be listed as that kernel's, and restored into it by default.
        record.kernel_id = str(uuid.uuid4())
    record.status, record.error = "complete", None
    record.imported = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "signer": key_fingerprint(store.key) if verified else manifest.claimed_signer(data),
        "verified": verified,
    }
    with store.scratch_dir("import-") as scratch:
        try:
            _unpack(src, files, scratch)
        except zstandard.ZstdError as e:
            raise InvalidRequest(f"bundle: its compressed data is damaged ({e})") from None
        return store.commit_imported(record, scratch, files)


def _unpack(src: BinaryIO, files: list[StoredFile], directory: Path) -> None:
    """Decompress the bundle's files into ``directory``, never past their
    declared sizes, every chunk checked against its hash."""
    reader = zstandard.ZstdDecompressor().stream_reader(src, closefd=False)
    for stored in files:
        with open(directory / stored.name, "xb", opener=private_opener) as out:
            for n, expected in enumerate(stored.chunks):
                size = min(stored.chunk_size, stored.size - n * stored.chunk_size)
                chunk = _read_exactly(reader, size)
                if chunk_hash(chunk) != expected:
                    raise InvalidRequest(f"bundle: {stored.name} chunk {n} does not match its hash")
                out.write(chunk)
    if reader.read(1):
        raise InvalidRequest("bundle: it holds more data than its manifest lists")


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = src.read(left)
        if not part:
            raise InvalidRequest("bundle is truncated")
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
