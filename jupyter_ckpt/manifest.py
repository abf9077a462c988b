"""Signed snapshot manifests: which files, made of which chunks, plus the record.

Layout of a manifest file::

    b"JCKPT-MANIFEST-1\\n"
    u32 length of the header, the header (JSON: record, files, chunk counts)
    32 bytes per chunk hash, all files in order
    32 bytes: HMAC-SHA256 of everything above, with the store's key

CRIU restores as root: a manifest that does not verify is never used. The key
lives outside the store (so that write access to the store is not enough to
forge a snapshot), is created on first use and readable by its owner only
(private_files.load_or_create_key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from typing import Any

import numpy as np

from .errors import SnapshotNotRestorable
from .pack_format import HASH_BYTES, StoredFile, chunk_size_for
from .private_files import key_fingerprint

MAGIC = b"JCKPT-MANIFEST-1\n"
_LEN = struct.Struct("<I")


def encode(record: dict[str, Any], files: list[StoredFile], key: bytes) -> bytes:
    header = json.dumps(
        {
            "record": record,
            "signer": key_fingerprint(key),
            "files": [
                {
                    "name": f.name,
                    "size": f.size,
                    "chunk_size": f.chunk_size,
                    "chunks": len(f.chunks),
                    "digest": f.digest,
                }
                for f in files
            ],
        },
        sort_keys=True,
    ).encode()
    body = MAGIC + _LEN.pack(len(header)) + header + b"".join([b"".join(f.chunks) for f in files])
    return body + hmac.new(key, body, hashlib.sha256).digest()


class SignatureMismatch(SnapshotNotRestorable):
    """Well-formed, but not signed with this store's key."""


class MalformedManifest(SnapshotNotRestorable):
    """Not a manifest this package writes: bad structure, names, sizes or counts."""


# CRIU's image names (core-1.img, pages-2.img, tmpfs-dev-68.tar.gz.img, ...):
# a plain file name, never a path.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MAX_FILES = 100_000


def decode(
    data: bytes, key: bytes | None, name: str = "manifest", max_bytes: int | None = None
) -> tuple[dict[str, Any], list[StoredFile]]:
    """Verify and parse; raises SnapshotNotRestorable on any mismatch.

    ``key=None`` skips the signature check: only for an import the user chose to
    trust, whose chunks are then still checked against the hashes listed here.
    Either way the structure is checked: file names are plain names, chunk sizes
    are the ones this format uses and chunk counts match the sizes, and the
    files add up to at most ``max_bytes``."""
    if len(data) < len(MAGIC) + _LEN.size + 32 or not data.startswith(MAGIC):
        raise SnapshotNotRestorable(f"{name} is not a jupyter-ckpt manifest (damaged or truncated)")
    body, signature = data[:-32], data[-32:]
    if key is not None and not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), signature):
        raise SignatureMismatch(f"{name} failed its signature check: it was modified, or signed with another key")
    (length,) = _LEN.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    try:
        header = json.loads(body[start : start + length])
    except (ValueError, RecursionError) as e:
        raise MalformedManifest(f"{name} has an unreadable header: {e}") from None
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("record"), dict)
        or not isinstance(header.get("files"), list)
    ):
        raise MalformedManifest(f"{name} has no record or no file list")
    hashes = body[start + length :]
    entries = header["files"]
    if len(entries) > MAX_FILES:
        raise MalformedManifest(f"{name} lists {len(entries)} files, more than {MAX_FILES}")
    files, pos, seen, total = [], 0, set(), 0
    for entry in entries:
        stored = _file_entry(entry, name)
        if stored.name in seen:
            raise MalformedManifest(f"{name} lists {stored.name!r} twice")
        seen.add(stored.name)
        total += stored.size
        if max_bytes is not None and total > max_bytes:
            raise MalformedManifest(f"{name} describes more than {max_bytes} bytes of files, the most accepted here")
        n = -(-stored.size // stored.chunk_size)
        if pos + n * HASH_BYTES > len(hashes):
            raise MalformedManifest(f"{name} lists more chunks than it holds")
        # numpy cuts the hashes into bytes objects 3 to 6 times faster than a
        # comprehension: 262,144 of them for a GiB of memory, read at every restore.
        stored.chunks = np.frombuffer(hashes, f"V{HASH_BYTES}", n, pos).tolist()
        pos += n * HASH_BYTES
        files.append(stored)
    if pos != len(hashes):
        raise MalformedManifest(f"{name} lists {pos // HASH_BYTES} chunks but holds {len(hashes) // HASH_BYTES}")
    return header["record"], files


def _file_entry(entry: Any, name: str) -> StoredFile:
    """One entry of a manifest's file list, checked (its chunks are filled in after)."""
    if not isinstance(entry, dict):
        raise MalformedManifest(f"{name} has a file entry that is not an object")
    file_name, size, chunk_size, chunks = (
        entry.get("name"),
        entry.get("size"),
        entry.get("chunk_size"),
        entry.get("chunks"),
    )
    if not isinstance(file_name, str) or not _FILE_NAME.match(file_name) or ".." in file_name:
        raise MalformedManifest(f"{name} names a file {file_name!r}: only plain file names are allowed")
    for field_name, value in (("size", size), ("chunk_size", chunk_size), ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MalformedManifest(f"{name}: {file_name}: {field_name} must be a whole number, not {value!r}")
    if chunk_size != chunk_size_for(file_name):
        raise MalformedManifest(
            f"{name}: {file_name}: chunk size {chunk_size}, this format uses {chunk_size_for(file_name)}"
        )
    if chunks != -(-size // chunk_size):
        raise MalformedManifest(f"{name}: {file_name}: {chunks} chunks do not make {size} bytes")
    digest = entry.get("digest", "")
    if not isinstance(digest, str) or (digest and not re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise MalformedManifest(f"{name}: {file_name}: the digest is not a BLAKE3 hex digest")
    return StoredFile(file_name, size, chunk_size, [], digest)


def claimed_signer(data: bytes) -> str:
    """The fingerprint of the key a manifest says signed it (not verified:
    only a manifest that verifies with a key is known to come from it)."""
    try:
        (length,) = _LEN.unpack_from(data, len(MAGIC))
        signer = json.loads(data[len(MAGIC) + _LEN.size : len(MAGIC) + _LEN.size + length]).get("signer")
    except (ValueError, RecursionError, struct.error, AttributeError):
        return "unknown"
    return signer if isinstance(signer, str) and re.fullmatch(r"[0-9a-f]{16}", signer) else "unknown"
