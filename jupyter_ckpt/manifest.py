"""Signed snapshot manifests: which files, made of which chunks, plus the record.

Layout of a manifest file::

    b"JCKPT-MANIFEST-1\\n"
    u32 length of the header, the header (JSON: record, files, chunk counts)
    32 bytes per chunk hash, all files in order
    32 bytes: HMAC-SHA256 of everything above, with the store's key

CRIU restores as root: a manifest that does not verify is never used. The key
lives outside the store (so that write access to the store is not enough to
forge a snapshot), is created on first use and readable by its owner only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

from .chunks import HASH_BYTES, StoredFile
from .errors import SnapshotNotRestorable

MAGIC = b"JCKPT-MANIFEST-1\n"
_LEN = struct.Struct("<I")


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"store key {path} is shorter than 32 bytes")
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return key


def encode(record: dict[str, Any], files: list[StoredFile], key: bytes) -> bytes:
    header = json.dumps(
        {
            "record": record,
            "files": [
                {"name": f.name, "size": f.size, "chunk_size": f.chunk_size, "chunks": len(f.chunks), "digest": f.digest}
                for f in files
            ],
        },
        sort_keys=True,
    ).encode()
    body = MAGIC + _LEN.pack(len(header)) + header + b"".join(h for f in files for h in f.chunks)
    return body + hmac.new(key, body, hashlib.sha256).digest()


class SignatureMismatch(SnapshotNotRestorable):
    """Well-formed, but not signed with this store's key."""


def decode(
    data: bytes, key: bytes | None, name: str = "manifest"
) -> tuple[dict[str, Any], list[StoredFile]]:
    """Verify and parse; raises SnapshotNotRestorable on any mismatch.

    ``key=None`` skips the signature check: only for an import the user chose to
    trust, whose chunks are then still checked against the hashes listed here."""
    if len(data) < len(MAGIC) + _LEN.size + 32 or not data.startswith(MAGIC):
        raise SnapshotNotRestorable(f"{name} is not a jupyter-ckpt manifest (damaged or truncated)")
    body, signature = data[:-32], data[-32:]
    if key is not None and not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), signature):
        raise SignatureMismatch(f"{name} failed its signature check: it was modified, or signed with another key")
    (length,) = _LEN.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    header = json.loads(body[start : start + length])
    hashes = body[start + length :]
    files, pos = [], 0
    for entry in header["files"]:
        n = entry["chunks"]
        chunks = [hashes[pos + i * HASH_BYTES : pos + (i + 1) * HASH_BYTES] for i in range(n)]
        pos += n * HASH_BYTES
        files.append(StoredFile(entry["name"], entry["size"], entry["chunk_size"], chunks, entry.get("digest", "")))
    if pos != len(hashes):
        raise SnapshotNotRestorable(f"{name} lists {pos // HASH_BYTES} chunks but holds {len(hashes) // HASH_BYTES}")
    return header["record"], files
