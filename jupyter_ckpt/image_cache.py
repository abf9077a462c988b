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
from .pack_reader import FileIdentity, file_identity, map_file
from .private_files import private_dir
from .records import KERNEL_ID, SNAPSHOT_ID, SnapshotRecord


class ImageCache:
    def __init__(self, directory: Path, budget_bytes: int):
        self.dir = private_dir(directory)
        self.budget_bytes = budget_bytes
        # Files kept by this process, as they were when kept, and the digest
        # their manifest names, if it was computed from those very bytes.
        self._as_kept: dict[Path, tuple[FileIdentity, str | None]] = {}
        self._lock = threading.Lock()  # _as_kept: snapshots and restores run in worker threads

    def _dir_of(self, record: SnapshotRecord) -> Path | None:
        if not KERNEL_ID.match(record.kernel_id or "") or not SNAPSHOT_ID.match(record.id or ""):
            return None  # not ids this server made: never a path
        return self.dir / record.kernel_id / record.id

    def keep(
        self,
        record: SnapshotRecord,
        staging: Path,
        files: list[StoredFile] | None = None,
        hashed: dict[str, FileIdentity] | None = None,
    ) -> None:
        """Keep a committed snapshot's staged images (a rename) in place of the
        kernel's previous ones, then drop the oldest kept images beyond the
        budget. The memory the previous copy held in the page cache serves the
        next snapshot's dump. ``files``: the manifest's entries for them;
        ``hashed``: each file's identity while its digest was computed
        (chunks.put_files). A file still as it was then holds the bytes of its
        digest: a restore need not hash it again."""
        digests = {f.name: f.digest for f in files or []}
        target = self._dir_of(record)
        if target is None or self.budget_bytes <= 0 or _dir_bytes(staging) > self.budget_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            return
        for previous in target.parent.glob("*"):
            shutil.rmtree(previous, ignore_errors=True)
        with self._lock:
            for path in [p for p in self._as_kept if p.parent.parent == target.parent]:
                del self._as_kept[path]
        target.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:  # the state directory spans filesystems: not worth a copy
            shutil.rmtree(staging, ignore_errors=True)
            return
        for image in target.iterdir():
            now = file_identity(image)
            if hashed is None:  # as the caller knows them: its bytes, no digest
                entry = (now, None)
            elif hashed.get(image.name) == now:
                entry = (now, digests.get(image.name) or None)
            else:
                continue  # changed since it was hashed, or never hashed: not trusted
            with self._lock:
                self._as_kept[image] = entry
        try:
            # Submitting a GiB for writeback blocks for a few tenths of a
            # second: not in the way of the snapshot's completion.
            threading.Thread(target=_start_writeback, args=(list(target.iterdir()),), daemon=True).start()
        except RuntimeError:
            pass  # no thread to be had: the kernel writes them back in its own time
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
        it with that digest) and did not change meanwhile. A restore may
        rewrite files in ``dest``, always by replacing them: the kept copy
        stays as is. A copy that does not match is dropped; the caller uses
        the chunks."""
        kept = self._dir_of(record)
        if kept is None or not kept.is_dir():
            return False
        if not all(stored.digest for stored in files):
            # Read before the digests were added (SnapshotStore.keep_whole): not
            # checkable as a whole, and no reason to drop the copy.
            return False
        try:
            for stored in files:
                path = kept / stored.name
                seen = file_identity(path)
                if seen[1] != stored.size or not (
                    self._held(path, seen, stored.digest) or file_digest(map_file(path)) == stored.digest
                ):
                    raise ValueError(f"{path} does not match the snapshot's manifest")
                os.link(path, dest / stored.name)
                self._linked(path, seen, stored.digest)
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
            for image in list(kept[1].iterdir()):
                seen = file_identity(image)
                entry = self._entry(image, seen)
                if entry is None:
                    return False
                os.link(image, dest / image.name)
                self._linked(image, seen, entry[1])
        except (OSError, ValueError):
            return False
        return True

    def _linked(self, path: Path, seen: FileIdentity, digest: str | None) -> None:
        """After a link to ``path`` checked as ``seen``: the link changed its
        change time, nothing else may have changed (ValueError); noted as kept."""
        now = file_identity(path)
        if now[:3] != seen[:3]:
            raise ValueError(f"{path} changed while it was being linked")
        with self._lock:
            self._as_kept[path] = (now, digest)

    def _entry(self, path: Path, seen: FileIdentity) -> tuple[FileIdentity, str | None] | None:
        """What this process noted when it kept ``path``, if ``path`` is still
        as it was then (``seen``: its identity now)."""
        entry = self._as_kept.get(path)
        return entry if entry is not None and entry[0] == seen else None

    def _held(self, path: Path, seen: FileIdentity, digest: str) -> bool:
        entry = self._entry(path, seen)
        return bool(digest) and entry is not None and entry[1] == digest

    def latest(self, kernel_id: str) -> tuple[str, Path] | None:
        """The snapshot id and folder of the images kept for ``kernel_id``."""
        if not KERNEL_ID.match(kernel_id or ""):
            return None
        kept = sorted(d for d in (self.dir / kernel_id).glob("*") if SNAPSHOT_ID.match(d.name))
        return (kept[-1].name, kept[-1]) if kept else None

    def unchanged_since_kept(self, path: Path) -> bool:
        """Whether ``path`` is a file this process kept, not changed since
        (same inode, size, modification and change times)."""
        try:
            return self._entry(path, file_identity(path)) is not None
        except OSError:
            return False

    def holds(self, path: Path, digest: str) -> bool:
        """Whether ``path`` is unchanged since this process kept it, with
        ``digest`` computed from the bytes it held then."""
        try:
            return self._held(path, file_identity(path), digest)
        except OSError:
            return False

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


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
