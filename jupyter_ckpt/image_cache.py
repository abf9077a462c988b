"""Local copies of each kernel's latest CRIU images, beside the store's chunks.

Restores mostly go back to the latest snapshot: linking its kept images skips
reassembling them from chunks. One copy per kernel, under a byte budget; a copy
is used only if every file matches the (verified) manifest's digests.

    <state>/images/<kernel>/<snapshot id>/
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from .pack_format import StoredFile, file_digest
from .pack_reader import map_file
from .private_files import private_dir
from .records import KERNEL_ID, SNAPSHOT_ID, SnapshotRecord


class ImageCache:
    def __init__(self, directory: Path, budget_bytes: int):
        self.dir = private_dir(directory)
        self.budget_bytes = budget_bytes
        # Files kept by this process, as they were when kept (inode, size,
        # modification and change times), and their digest in the manifest,
        # computed from those very bytes (None where not given).
        self._as_kept: dict[Path, tuple[tuple[int, int, int, int], str | None]] = {}

    def _dir_of(self, record: SnapshotRecord) -> Path | None:
        if not KERNEL_ID.match(record.kernel_id or "") or not SNAPSHOT_ID.match(record.id or ""):
            return None  # not ids this server made: never a path
        return self.dir / record.kernel_id / record.id

    def keep(self, record: SnapshotRecord, staging: Path, files: list[StoredFile] | None = None) -> None:
        """Keep a committed snapshot's staged images (a rename) in place of the
        kernel's previous ones, then drop the oldest kept images beyond the
        budget. The memory the previous copy held in the page cache serves the
        next snapshot's dump. ``files``: the manifest's entries for them, whose
        digests were computed from these bytes (a restore then need not hash
        them again while they stay as kept)."""
        digests = {f.name: f.digest for f in files or []}
        target = self._dir_of(record)
        if target is None or self.budget_bytes <= 0 or _dir_bytes(staging) > self.budget_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            return
        for image in staging.iterdir():
            image.chmod(0o600)  # CRIU writes them 0644 (in a private directory)
        for previous in target.parent.glob("*"):
            shutil.rmtree(previous, ignore_errors=True)
        for path in [p for p in self._as_kept if p.parent.parent == target.parent]:
            del self._as_kept[path]
        target.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:  # the state directory spans filesystems: not worth a copy
            shutil.rmtree(staging, ignore_errors=True)
            return
        for image in target.iterdir():
            self._as_kept[image] = (_identity(image), digests.get(image.name) or None)
        # Submitting a GiB for writeback blocks for a few tenths of a second:
        # not in the way of the snapshot's completion.
        threading.Thread(target=_start_writeback, args=(list(target.iterdir()),), daemon=True).start()
        kept = sorted(self._all(), key=lambda d: d.name)
        sizes = [_dir_bytes(d) for d in kept]
        total = sum(sizes)
        for d, size in zip(kept, sizes, strict=True):  # oldest first: ids sort by time
            if total <= self.budget_bytes:
                break
            total -= size
            shutil.rmtree(d, ignore_errors=True)

    def link(self, record: SnapshotRecord, files: list[StoredFile], dest: Path) -> bool:
        """Hard-link the kept images into ``dest`` if every file is there and
        matches its digest (computed, unless the file is as this process kept
        it with that digest). A restore may rewrite files in ``dest``, always by
        replacing them: the kept copy stays as is. A copy that does not match
        is dropped; the caller uses the chunks."""
        kept = self._dir_of(record)
        if kept is None or not kept.is_dir():
            return False
        try:
            for stored in files:
                path = kept / stored.name
                if (
                    not stored.digest
                    or path.stat().st_size != stored.size
                    or not (self.holds(path, stored.digest) or file_digest(map_file(path)) == stored.digest)
                ):
                    raise ValueError(f"{path} does not match the snapshot's manifest")
            for stored in files:
                os.link(kept / stored.name, dest / stored.name)
                # A link changes the file's change time; its bytes were just checked.
                self._as_kept[kept / stored.name] = (_identity(kept / stored.name), stored.digest)
        except (OSError, ValueError):
            shutil.rmtree(kept, ignore_errors=True)
            for stored in files:
                (dest / stored.name).unlink(missing_ok=True)
            return False
        return True

    def link_all(self, kernel_id: str, snapshot_id: str, dest: Path) -> bool:
        """Hard-link every kept image of ``snapshot_id`` into ``dest``, if they
        are the kernel's latest kept ones and each is as this process kept it
        (its bytes are its manifest's: no digest to compute); False if not, or
        dropped meanwhile."""
        kept = self.latest(kernel_id)
        if kept is None or kept[0] != snapshot_id:
            return False
        try:
            images = list(kept[1].iterdir())
            if not all(self.unchanged_since_kept(image) for image in images):
                return False
            for image in images:
                os.link(image, dest / image.name)
                # A link changes only the file's change time.
                self._as_kept[image] = (_identity(image), self._as_kept.get(image, (None, None))[1])
        except OSError:
            return False
        return True

    def latest(self, kernel_id: str) -> tuple[str, Path] | None:
        """The snapshot id and folder of the images kept for ``kernel_id``."""
        if not KERNEL_ID.match(kernel_id or ""):
            return None
        kept = sorted(d for d in (self.dir / kernel_id).glob("*") if SNAPSHOT_ID.match(d.name))
        return (kept[-1].name, kept[-1]) if kept else None

    def unchanged_since_kept(self, path: Path) -> bool:
        """Whether ``path`` is a file this process kept, not changed since
        (same inode, size, modification and change times): no need to hash
        it again to know it holds its manifest's bytes."""
        kept = self._as_kept.get(path)
        try:
            return kept is not None and _identity(path) == kept[0]
        except OSError:
            return False

    def holds(self, path: Path, digest: str) -> bool:
        """Whether ``path`` is unchanged since this process kept it, and was
        kept with ``digest``: it holds the bytes that digest was computed from."""
        kept = self._as_kept.get(path)
        return bool(digest) and kept is not None and kept[1] == digest and self.unchanged_since_kept(path)

    def drop(self, snapshot_id: str) -> None:
        for kept in self.dir.glob(f"*/{snapshot_id}"):
            shutil.rmtree(kept, ignore_errors=True)

    def drop_unless(self, committed: Callable[[str], bool]) -> None:
        """After a restart: drop copies of snapshots deleted meanwhile."""
        for d in self.dir.glob("*/*"):
            if not SNAPSHOT_ID.match(d.name) or not committed(d.name):
                shutil.rmtree(d, ignore_errors=True)

    def _all(self) -> list[Path]:
        return [d for d in self.dir.glob("*/*") if SNAPSHOT_ID.match(d.name)]


def _start_writeback(paths: list[Path]) -> None:
    """Have the kernel start writing the files' dirty pages to disk now, in the
    background, rather than during the next snapshot's freeze, where the
    writeback competes with CRIU. The pages stay cached (sync_file_range)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # dropped meanwhile
        try:
            _libc().sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)
        except (OSError, AttributeError):
            pass  # not Linux's libc: the kernel writes them back in its own time
        finally:
            os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path, follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
