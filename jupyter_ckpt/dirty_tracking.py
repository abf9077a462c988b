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

An incremental dump is made whole again: the kept images and every restore
work on full dumps. ``plan_whole`` says where each page of a whole pages file
comes from; the store takes the chunks of the pages from the parent from the
parent's manifest, not reading them again, and writes the whole file after
(``write_whole_pages``). ``flatten`` does it all at once (recovery).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .page_layout import PAGE, PE_PARENT, PE_PRESENT, read_pagemap, write_pagemap
from .private_files import private_opener
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


@dataclass
class WholePages:
    """How one pagemap of an incremental dump is made whole (``plan_whole``).

    The whole pages file ``name`` holds, in file order, the runs of ``runs``:
    (from the parent: 1, else 0; byte offset in the parent's pages file
    ``parent_pages`` or in the dump's own ``pages``; pages). ``entries`` is
    the whole pagemap: every run present, in address order, as a full dump
    lists it (runs that meet with the same flags are one again)."""

    pagemap: str
    prefix: bytes
    pages: str
    parent_pages: str
    whole_id: int
    entries: list[tuple[int, int, int]]
    runs: np.ndarray

    @property
    def name(self) -> str:
        return f"pages-{self.whole_id}.img"

    def copied(self) -> np.ndarray:
        """For each page of the whole file, whether it comes from the parent's page at the same address."""
        return np.repeat(self.runs[:, 0].astype(bool), self.runs[:, 2])

    def parent_chunks(self) -> np.ndarray:
        """For each page of the whole file, which page of the parent's pages
        file it is a copy of (its chunk there), or -1: one of the dump's own."""
        firsts = np.where(self.runs[:, 0] == 1, self.runs[:, 1] // PAGE, -1)
        starts = np.repeat(firsts, self.runs[:, 2])
        within = np.arange(len(starts)) - np.repeat(np.cumsum(self.runs[:, 2]) - self.runs[:, 2], self.runs[:, 2])
        return np.where(starts >= 0, starts + within, -1)


@dataclass
class IncrementalDump:
    """A dump of the pages written since snapshot ``base_id`` (the dump the
    tracking counts from), whose kept images (linked at ``parent``: CRIU's
    parent images) hold the others; ``plans``: how each of its pagemaps with
    holes is made whole (``plan_whole``)."""

    base_id: str
    parent: Path
    plans: list[WholePages]


def flatten(images: Path, parent: Path) -> dict[str, np.ndarray]:
    """Make the incremental dump in ``images`` whole: each run CRIU left in the
    ``parent`` images (PE_PARENT) is copied from there, so that every pagemap
    lists its pages as present, in address order, as a full dump does.

    Returns, for each pages file it rewrote, which of its pages were copied
    from the parent's page at the same address (chunks.Reference.copies). ``parent`` must be whole itself (kept images always are).
    ParentMismatch if it lacks a page. Run again after being cut short, it
    starts over: the whole pages file is complete before the pagemap names
    it, and the incremental one is removed only after."""
    _remove_strays(images)
    plans = plan_whole(images, parent)
    for plan in plans:
        write_whole_pages(images, parent, plan)
        write_whole_pagemap(images, plan)
        (images / plan.pages).unlink()
    link = images / "parent"
    if link.is_symlink():
        link.unlink()
    return {plan.name: plan.copied() for plan in plans}


def plan_whole(images: Path, parent: Path) -> list[WholePages]:
    """How each pagemap of ``images`` that has holes would be made whole from
    ``parent`` (reading pagemaps only). ParentMismatch if the parent lacks a page."""
    plans = []
    whole_id = max(_pages_ids(images))
    for pagemap in sorted(images.glob("pagemap-*.img")):
        prefix, pages_id, entries = read_pagemap(pagemap)
        if (entries[:, 2] & PE_PARENT).any():
            whole_id += 1
            plans.append(_plan_pagemap(pagemap, prefix, pages_id, entries, parent, whole_id))
    return plans


def write_whole_pages(images: Path, parent: Path, plan: WholePages) -> None:
    """The whole pages file of ``plan``, copied together from the dump's pages and the parent's."""
    whole = images / f"{plan.name}.part"
    with (
        open(images / plan.pages, "rb") as new,
        open(parent / plan.parent_pages, "rb") as old,
        open(whole, "wb", opener=private_opener) as target,
    ):
        copy = _Copier(target.fileno())
        for from_parent, offset, n in plan.runs.tolist():
            copy(old.fileno() if from_parent else new.fileno(), offset, n * PAGE)
        copy.flush()
    # Renamed to a new name, not over the old file: ext4 would then start
    # writing the new one out at once (auto_da_alloc), a second for a GiB.
    os.rename(whole, images / plan.name)


def write_whole_pagemap(images: Path, plan: WholePages) -> None:
    write_pagemap(images / plan.pagemap, plan.prefix, plan.whole_id, plan.entries)


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


def _plan_pagemap(
    pagemap: Path, prefix: bytes, pages_id: int, entries: np.ndarray, parent: Path, whole_id: int
) -> WholePages:
    """One pagemap's plan, computed on whole arrays of runs: a scattered
    change is tens of thousands of them."""
    try:
        _, parent_pages_id, parent_entries = read_pagemap(parent / pagemap.name)
    except (OSError, ValueError) as e:
        raise ParentMismatch(f"{pagemap.name}: the parent images have no such pagemap ({e})") from None
    held = parent_entries.astype(np.int64)
    if (held[:, 2] & PE_PARENT).any():
        raise ParentMismatch("the parent images are incremental themselves")
    held = held[(held[:, 2] & PE_PRESENT) != 0]
    if not len(held):
        raise ParentMismatch(f"{pagemap.name}: the parent images hold no pages")
    held_start, held_n = held[:, 0], held[:, 1]
    held_end = held_start + held_n * PAGE
    held_offset = (np.cumsum(held_n) - held_n) * PAGE

    start, n, flags = entries.astype(np.int64).T
    present = (flags & PE_PRESENT) != 0
    in_parent = ~present & ((flags & PE_PARENT) != 0)
    own = np.where(present, n, 0)
    # Rows of the whole pagemap before merging: (address, pages, flags, from
    # the parent, offset in its source), each entry one row, or one per
    # parent run it takes pages from.
    rows = np.column_stack([start, n, flags & ~PE_PARENT, np.zeros_like(n), (np.cumsum(own) - own) * PAGE])
    which = np.flatnonzero(in_parent)
    if len(which):
        first, last = start[which], start[which] + n[which] * PAGE
        lo = np.searchsorted(held_start, first, "right") - 1
        hi = np.searchsorted(held_start, last, "left") - 1
        gaps = np.concatenate([[0], np.cumsum(held_end[:-1] != held_start[1:])])
        bad = (lo < 0) | (hi < lo) | (first >= held_end[np.maximum(lo, 0)]) | (last > held_end[np.maximum(hi, 0)])
        bad |= ~bad & (gaps[np.maximum(hi, 0)] != gaps[np.maximum(lo, 0)])
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            at = _first_missing(held_start, held_end, int(first[j]), int(last[j]))
            raise ParentMismatch(f"{pagemap.name}: the parent images lack the page at {at:#x}")
        counts = hi - lo + 1
        k = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        piece_first = np.maximum(np.repeat(first, counts), held_start[k])
        piece_last = np.minimum(np.repeat(last, counts), held_end[k])
        pieces = np.column_stack(
            [
                piece_first,
                (piece_last - piece_first) // PAGE,
                held[k, 2] | PE_PRESENT,
                np.ones_like(k),
                held_offset[k] + piece_first - held_start[k],
            ]
        )
        order = np.argsort(np.concatenate([np.flatnonzero(~in_parent), np.repeat(which, counts)]), kind="stable")
        rows = np.concatenate([rows[~in_parent], pieces])[order]
    address, pages, row_flags, from_parent, offset = rows.T
    # Runs that meet with the same flags are one again, as a full dump lists them.
    meets = (row_flags[1:] == row_flags[:-1]) & (address[1:] == address[:-1] + pages[:-1] * PAGE)
    heads = np.flatnonzero(np.concatenate([[True], ~meets]))
    merged = np.column_stack([address[heads], np.add.reduceat(pages, heads), row_flags[heads]])
    # The whole file's pages, by source: consecutive pages of one source are one run.
    filed = rows[(row_flags & PE_PRESENT) != 0][:, [3, 4, 1]]
    follows = (filed[1:, 0] == filed[:-1, 0]) & (filed[1:, 1] == filed[:-1, 1] + filed[:-1, 2] * PAGE)
    heads = np.flatnonzero(np.concatenate([[True], ~follows]))
    runs = np.column_stack([filed[heads, 0], filed[heads, 1], np.add.reduceat(filed[:, 2], heads)])
    return WholePages(
        pagemap.name,
        prefix,
        f"pages-{pages_id}.img",
        f"pages-{parent_pages_id}.img",
        whole_id,
        [(int(v), int(c), int(f)) for v, c, f in merged.tolist()],
        runs.reshape(-1, 3),
    )


def _first_missing(held_start: np.ndarray, held_end: np.ndarray, first: int, last: int) -> int:
    """The first address of [first, last) that no run of the parent holds."""
    at, i = first, int(np.searchsorted(held_start, first, "right")) - 1
    while at < last and 0 <= i < len(held_start) and held_start[i] <= at < held_end[i]:
        at, i = int(held_end[i]), i + 1
    return at


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
