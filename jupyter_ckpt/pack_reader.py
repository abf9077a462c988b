"""Reading frames back from packs: decompressed (or mapped, when stored as
is), the last few kept, every chunk checked by the caller against its hash."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from .pack_format import FRAME_BYTES, OTHER_CHUNK, RAW_FRAME


class FrameReader:
    """Decompressed frames by location. A file's chunks come from a few frames
    at a time (the frame of its first version's pages, the frame of the pages
    changed since), so the last few frames and their packs are kept open."""

    _KEEP = 4

    def __init__(self, open_pack: Callable[[str], Any]):
        # pack name -> a mapped memoryview (local packs) or a seekable file
        self.open_pack = open_pack
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
        source = self.packs.pop(pack, None) or self.open_pack(pack)
        self.packs[pack] = source  # most recent last
        if len(self.packs) > self._KEEP:
            del self.packs[next(iter(self.packs))]
        raw, length = length & RAW_FRAME, length & ~RAW_FRAME
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

    def close(self) -> None:
        for source in self.packs.values():
            if not isinstance(source, memoryview):
                source.close()
        self.packs.clear()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


IOV_MAX = 1024  # buffers per writev


FileIdentity = tuple[int, int, int, int]


def file_identity(path: Path) -> FileIdentity:
    """Inode, size, modification and change times: a file whose identity did
    not change still holds the same bytes (a write changes the times)."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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


def write_all(fd: int, buffers: list[memoryview]) -> int:
    """writev the buffers (no joined copy), resuming after a short write."""
    total = sum(len(b) for b in buffers)
    written = os.writev(fd, buffers) if buffers else 0
    if written < total:  # rare (a signal, a full disk): finish with plain writes
        rest = memoryview(b"".join(buffers))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    return total
