"""The chunk store's formats: how files are cut into chunks, how chunks are
named, and the pack index file that says where each chunk is.

    packs/<pack>.pack    frames, back to back (a frame: up to FRAME_BYTES of one
                         file's new chunks, zstd-compressed where that pays)
    packs/<pack>.idx     IDX_MAGIC, then per chunk: hash, frame offset, frame
                         length (high bit: stored as is), start in frame, size
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import blake3
import numpy as np

PAGE_CHUNK = 4096
OTHER_CHUNK = 1 << 20
FRAME_BYTES = 1 << 20  # raw bytes of consecutive new chunks compressed together
PACK_BYTES = 64 << 20  # start a new pack after this many compressed bytes
HASH_BYTES = 32
IDX_ENTRY = struct.Struct("<32sQIII")  # hash, frame offset, frame length, start in frame, size
IDX_MAGIC = b"JCKIDX1\n"
# In an index entry's frame length: the frame is stored as is, not compressed
# (frames are at most a few MiB, so the bit is free).
RAW_FRAME = 1 << 31
IDX_DTYPE = np.dtype(
    [("hash", "<u8", (4,)), ("offset", "<u8"), ("length", "<u4"), ("start", "<u4"), ("size", "<u4")]
)  # one entry of a pack index file (IDX_ENTRY)


def chunk_size_for(name: str) -> int:
    """Memory pages are cut per page, so that a kernel that changed 10 % of its
    pages stores about 10 % again; other images per MiB."""
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


def encode_idx(entries: list[bytes]) -> bytes:
    """A pack index file from its packed IDX_ENTRY entries."""
    return IDX_MAGIC + b"".join(entries)


def parse_idx(data: bytes) -> np.ndarray | None:
    """A pack index file's entries, or None if it is not one (or cut short)."""
    if not data.startswith(IDX_MAGIC) or (len(data) - len(IDX_MAGIC)) % IDX_DTYPE.itemsize:
        return None
    return np.frombuffer(data, IDX_DTYPE, offset=len(IDX_MAGIC))
