"""Writing new chunks into packs: frames compressed where that pays, appended
to a local pack file; a full pack is handed, with its index, to whoever
publishes it (the chunk store uploads the pack, then the index)."""

from __future__ import annotations

import os
import queue
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from .pack_format import IDX_ENTRY, PACK_BYTES, RAW_FRAME, encode_idx
from .private_files import private_opener

_SAMPLE_BYTES = 64 << 10  # compressed first, to see whether a frame is worth compressing
_WORTH_IT = 0.9

Chunks = list[tuple[bytes, memoryview]]  # (hash, bytes) of consecutive new chunks


class FrameCompressor:
    """zstd where it pays: random data (most float arrays) barely compresses,
    and a frame stored as is is read back without a copy."""

    def __init__(self, level: int = 1):
        self._zstd = zstandard.ZstdCompressor(level=level)

    def compress(self, raw: bytes) -> bytes | None:
        """The frame compressed, or None where that does not pay."""
        sample = raw[:_SAMPLE_BYTES]
        if len(raw) > 2 * _SAMPLE_BYTES and len(self._zstd.compress(sample)) > _WORTH_IT * len(sample):
            return None
        frame = self._zstd.compress(raw)
        return frame if len(frame) < len(raw) else None


@dataclass
class FinishedPack:
    """A pack written locally, ready to publish: the pack file, then its index."""

    name: str
    path: Path
    index: bytes


class PackWriter:
    """Appends frames to one local pack file and lists its index entries."""

    def __init__(self, directory: Path, compressor: FrameCompressor):
        self.name = uuid.uuid4().hex
        self.path = directory / f"{self.name}.pack.part"
        self.file = open(self.path, "wb", opener=private_opener)
        self.compressor = compressor
        self.offset = 0
        self.entries: list[bytes] = []  # packed IDX_ENTRY

    def add_frame(self, chunks: Chunks) -> int:
        """Append one frame; returns the bytes it took in the pack."""
        raw = b"".join(data for _, data in chunks)
        frame = self.compressor.compress(raw)
        self.file.write(frame or raw)
        length = len(frame) if frame else len(raw) | RAW_FRAME
        start = 0
        for h, data in chunks:
            self.entries.append(IDX_ENTRY.pack(h, self.offset, length, start, len(data)))
            start += len(data)
        written = len(frame or raw)
        self.offset += written
        return written

    def finish(self) -> FinishedPack | None:
        """The pack, durably on local disk, with its index; None if it is empty."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if not self.entries:
            os.unlink(self.path)
            return None
        return FinishedPack(self.name, self.path, encode_idx(self.entries))

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class FrameSink:
    """Compresses frames and appends them to packs in a worker thread, so that
    reading, hashing and looking up the next chunks overlap compression and
    disk writes (zstd and file I/O release the GIL). Each full pack goes to
    ``publish``, in the worker thread."""

    def __init__(self, directory: Path, publish: Callable[[FinishedPack], None], compressor: FrameCompressor):
        self.directory, self.publish, self.compressor = directory, publish, compressor
        self.new_bytes = 0  # bytes added to packs
        self.queue: queue.Queue[Chunks | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.writer = PackWriter(directory, compressor)
        self.thread = threading.Thread(target=self._work, daemon=True, name="jupyter-ckpt-packs")
        self.thread.start()

    def put(self, chunks: Chunks) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunks)

    def _work(self) -> None:
        while (chunks := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining: the producer must never block on a dead sink
            try:
                self.new_bytes += self.writer.add_frame(chunks)
                if self.writer.offset >= PACK_BYTES:
                    self._publish()
                    self.writer = PackWriter(self.directory, self.compressor)
            except BaseException as e:
                self.error = e

    def _publish(self) -> None:
        finished = self.writer.finish()
        if finished is not None:
            try:
                self.publish(finished)
            finally:
                finished.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Wait for every frame, then publish the last pack."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            self.writer.abort()
            raise self.error
        self._publish()

    def abort(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        self.writer.abort()
        if self.error is not None:  # its frames hold views of the images being stored
            traceback.clear_frames(self.error.__traceback__)
