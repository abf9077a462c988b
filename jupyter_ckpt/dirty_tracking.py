"""Snapshots that copy only the pages written since the previous one.

CRIU's ``--track-mem`` with ``--prev-images-dir``: after each dump the kernel
tracks the pages its processes write, and the next dump saves only those; the
others are holes (PE_PARENT) in the previous dump's images. The freeze then
follows what changed, not the kernel's size.

The tracking itself: soft-dirty bits where the Linux kernel has them; where
it does not (CONFIG_MEM_SOFT_DIRTY unset, as on many cloud kernels, and
arm64), userfaultfd write-protect in async mode read with PAGEMAP_SCAN
(Linux 6.7), which our CRIU patch adds (patches/criu/0004). Its registration
lives as long as a userfaultfd that CRIU makes in each process and hands over
("dirty-track" notification): ``DirtyTracking`` keeps those fds between dumps
and passes them back; closing them ends the tracking, and every page reads as
written again (a full dump, never a wrong one).

An incremental dump is made whole again (``flatten``) before anything else
sees it: the store, the kept images and every restore work on full dumps.
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .page_layout import PAGE, PE_PARENT, PE_PRESENT, read_pagemap, write_pagemap
from .refusals import tree_pids

# Memory that devices or the kernel write through pinned pages (RDMA, io_uring's
# fixed buffers, a GPU's DMA into registered host memory) changes without a
# page fault, so no dirty tracking sees it: such kernels get full dumps.
_UNTRACKED_WRITERS = ("anon_inode:[io_uring]", "/dev/infiniband/", "/dev/nvidia", "/dev/kfd", "/dev/dri/")


@dataclass
class DirtyTracking:
    """The dirty tracking of one kernel's processes, from one dump to the next.

    ``counted_from``: the snapshot whose dump the tracking counts from (its
    kept images are the next dump's parent), None when there is none to build
    on (the next dump is a full one). The userfaultfds, by host pid, exist only
    where userfaultfd write-protect is the source. Used from the dump's worker
    thread and from the event loop (``end``): the fds are behind a lock."""

    counted_from: str | None = None
    fds: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def pass_back(self) -> dict[int, int]:
        """Copies of the kept fds, for CRIU's inherit fds (``uffd-wp[<pid>]``);
        the caller closes them (an ``end`` meanwhile cannot close them under it)."""
        with self.lock:
            return {pid: os.dup(fd) for pid, fd in self.fds.items()}

    def take(self, pid: int, fd: int) -> None:
        """A userfaultfd CRIU handed over for ``pid`` (replacing a stale one)."""
        with self.lock:
            old = self.fds.pop(pid, None)
            self.fds[pid] = fd
        if old is not None and old != fd:
            os.close(old)

    def prune(self, alive: set[int]) -> None:
        """Close the fds of processes that are gone."""
        with self.lock:
            gone = [self.fds.pop(pid) for pid in [p for p in self.fds if p not in alive]]
        for fd in gone:
            os.close(fd)

    def end(self) -> None:
        """The processes are replaced or gone: nothing to count from."""
        self.counted_from = None
        self.prune(set())

    def __del__(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def untracked_writer(root_pid: int) -> str | None:
    """Why the memory of the tree under ``root_pid`` may change without a
    page fault, or None: a process holds io_uring or a device that writes
    memory by DMA (open, or mapped after its fd was closed), or has pages
    pinned (VmPin: RDMA, io_uring's fixed buffers, vfio)."""
    for pid in tree_pids(root_pid):
        try:
            names = os.listdir(f"/proc/{pid}/fd")
            status = Path(f"/proc/{pid}/status").read_text()
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        pinned = next((line.split()[1] for line in status.splitlines() if line.startswith("VmPin:")), "0")
        if pinned != "0":
            return f"process {pid} has {pinned} kB of memory pinned"
        for line in maps.splitlines():
            mapped = line.split(maxsplit=5)[5:]
            if mapped and mapped[0].startswith(_UNTRACKED_WRITERS):
                return f"process {pid} maps {mapped[0]}"
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith(_UNTRACKED_WRITERS):
                return f"process {pid} holds {target}"
    return None


class ParentMismatch(Exception):
    """The parent images lack pages an incremental dump refers to them for."""


def flatten(images: Path, parent: Path) -> dict[str, np.ndarray]:
    """Make the incremental dump in ``images`` whole: each run CRIU left in the
    ``parent`` images (PE_PARENT) is copied from there, so that every pagemap
    lists its pages as present, in address order, as a full dump does (runs
    that meet with the same flags are one again).

    Returns, for each pages file it rewrote, which of its pages were copied
    from the parent's page at the same address (the store need not compare
    those). ``parent`` must be whole itself (kept images always are).
    ParentMismatch if it lacks a page."""
    _remove_strays(images)
    copied = {}
    for pagemap in sorted(images.glob("pagemap-*.img")):
        prefix, pages_id, entries = read_pagemap(pagemap)
        if (entries[:, 2] & PE_PARENT).any():
            whole_id = max(_pages_ids(images)) + 1
            copied[f"pages-{whole_id}.img"] = _flatten_pagemap(pagemap, prefix, pages_id, entries, parent, whole_id)
    link = images / "parent"
    if link.is_symlink():
        link.unlink()
    return copied


def _pages_ids(images: Path) -> list[int]:
    return [int(p.name[len("pages-") : -len(".img")]) for p in images.glob("pages-*.img")] or [0]


def _remove_strays(images: Path) -> None:
    """What a flatten cut short left (run again, it starts over): unfinished
    files, and a pages file no pagemap names (the whole one not yet named, or
    the incremental one it replaced)."""
    named = {f"pages-{read_pagemap(p)[1]}.img" for p in images.glob("pagemap-*.img")}
    for stray in [*images.glob("*.part"), *images.glob("*.new")]:
        stray.unlink()
    for pages in images.glob("pages-*.img"):
        if pages.name not in named:
            pages.unlink()


def _flatten_pagemap(
    pagemap: Path, prefix: bytes, pages_id: int, entries: np.ndarray, parent: Path, whole_id: int
) -> np.ndarray:
    """One pagemap made whole, its pages into ``pages-<whole_id>.img``. The
    order of the renames lets a flatten cut short be run again: the whole
    pages file is complete before the pagemap names it, and the incremental
    one is removed only after."""
    try:
        _, parent_pages_id, parent_entries = read_pagemap(parent / pagemap.name)
    except (OSError, ValueError) as e:
        raise ParentMismatch(f"{pagemap.name}: the parent images have no such pagemap ({e})") from None
    new_pages = pagemap.parent / f"pages-{pages_id}.img"
    whole = pagemap.parent / f"pages-{whole_id}.img.part"
    runs = _ParentRuns(parent_entries.tolist())
    out: list[list[int]] = []  # (address, pages, flags), runs that meet merged
    from_parent: list[tuple[int, int]] = []  # (pages, copied from the parent) in file order

    def emit(start: int, n: int, flags: int, copy_of_parent: bool) -> None:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] * PAGE == start:
            out[-1][1] += n
        else:
            out.append([start, n, flags])
        if flags & PE_PRESENT:
            from_parent.append((n, copy_of_parent))

    with (
        open(new_pages, "rb") as new,
        open(parent / f"pages-{parent_pages_id}.img", "rb") as old,
        open(whole, "wb") as target,
    ):
        copy = _Copier(target.fileno())
        at_new = 0
        for start, n, flags in entries.tolist():
            if flags & PE_PRESENT:
                copy(new.fileno(), at_new, n * PAGE)
                at_new += n * PAGE
                emit(start, n, flags & ~PE_PARENT, False)
            elif flags & PE_PARENT:
                for piece_start, piece_n, offset, piece_flags in runs.cover(pagemap.name, start, n):
                    copy(old.fileno(), offset, piece_n * PAGE)
                    emit(piece_start, piece_n, piece_flags, True)
            else:
                emit(start, n, flags, False)
        copy.flush()
    # Renamed to a new name, not over the old file: ext4 would then start
    # writing the new one out at once (auto_da_alloc), a second for a GiB.
    os.rename(whole, pagemap.parent / f"pages-{whole_id}.img")
    write_pagemap(pagemap, prefix, whole_id, [(v, n, f) for v, n, f in out])
    new_pages.unlink()
    marks = np.array(from_parent, np.int64).reshape(-1, 2)  # pages, copied (0/1)
    return np.repeat(marks[:, 1].astype(bool), marks[:, 0])


class _ParentRuns:
    """The parent pagemap's present runs, for looking up where a page is."""

    def __init__(self, entries: list[list[int]]):
        self.runs = []  # (start, pages, offset in the pages file, flags)
        offset = 0
        for start, n, flags in entries:
            if flags & PE_PARENT:
                raise ParentMismatch("the parent images are incremental themselves")
            if flags & PE_PRESENT:
                self.runs.append((start, n, offset, flags))
                offset += n * PAGE
        self.starts = [r[0] for r in self.runs]

    def cover(self, name: str, start: int, n: int) -> list[tuple[int, int, int, int]]:
        """The pieces of the parent's runs that hold pages [start, start + n)."""
        pieces = []
        at, end = start, start + n * PAGE
        i = bisect.bisect_right(self.starts, at) - 1
        while at < end:
            if i < 0 or i >= len(self.runs):
                raise ParentMismatch(f"{name}: the parent images lack the page at {at:#x}")
            run_start, run_n, run_offset, flags = self.runs[i]
            run_end = run_start + run_n * PAGE
            if not run_start <= at < run_end:
                raise ParentMismatch(f"{name}: the parent images lack the page at {at:#x}")
            piece_end = min(end, run_end)
            pieces.append((at, (piece_end - at) // PAGE, run_offset + (at - run_start), flags | PE_PRESENT))
            at = piece_end
            i += 1
        return pieces


class _Copier:
    """copy_file_range into ``out``, appending; consecutive ranges of one
    source are copied in one call."""

    def __init__(self, out: int):
        self.out = out
        self.pending: tuple[int, int, int] | None = None  # source fd, offset, length

    def __call__(self, src: int, offset: int, length: int) -> None:
        if self.pending and self.pending[0] == src and self.pending[1] + self.pending[2] == offset:
            self.pending = (src, self.pending[1], self.pending[2] + length)
            return
        self.flush()
        self.pending = (src, offset, length)

    def flush(self) -> None:
        if not self.pending:
            return
        src, offset, length = self.pending
        self.pending = None
        while length:
            done = os.copy_file_range(src, self.out, length, offset)
            if done == 0:
                raise ParentMismatch("a pages file is shorter than its pagemap says")
            offset += done
            length -= done
