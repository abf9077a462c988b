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

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .page_layout import PAGE, PE_PRESENT
from .refusals import tree_pids

PE_PARENT = 1 << 0  # CRIU's pagemap flag: the run's pages are in the parent images
PE_LAZY = 1 << 1

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
    where userfaultfd write-protect is the source."""

    counted_from: str | None = None
    fds: dict[int, int] = field(default_factory=dict)

    def pass_back(self) -> dict[int, int]:
        """The kept fds, for CRIU's inherit fds (``uffd-wp[<pid>]``)."""
        return dict(self.fds)

    def take(self, pid: int, fd: int) -> None:
        """A userfaultfd CRIU handed over for ``pid`` (replacing a stale one)."""
        old = self.fds.pop(pid, None)
        if old is not None and old != fd:
            os.close(old)
        self.fds[pid] = fd

    def prune(self, alive: set[int]) -> None:
        """Close the fds of processes that are gone."""
        for pid in [p for p in self.fds if p not in alive]:
            os.close(self.fds.pop(pid))

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
    page fault (a process holds io_uring or a device that writes memory by
    DMA), or None."""
    for pid in tree_pids(root_pid):
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
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
    lists its pages as present, in address order, as a full dump does.

    Returns, for each pages file it rewrote, which of its pages were copied
    from the parent's page at the same address (the store need not compare
    those). ``parent`` must be whole itself (kept images always are).
    ParentMismatch if it lacks a page."""
    import pycriu

    copied: dict[str, np.ndarray] = {}
    for pagemap in sorted(images.glob("pagemap-*.img")):
        with open(pagemap, "rb") as f:
            image = pycriu.images.load(f)
        head, *entries = image["entries"]
        if not any(int(e.get("flags", 0)) & PE_PARENT for e in entries):
            continue
        try:
            with open(parent / pagemap.name, "rb") as f:
                parent_head, *parent_entries = pycriu.images.load(f)["entries"]
        except OSError as e:
            raise ParentMismatch(f"{pagemap.name}: the parent images have no such pagemap ({e})") from None
        new_pages = images / f"pages-{int(head['pages_id'])}.img"
        old_pages = parent / f"pages-{int(parent_head['pages_id'])}.img"
        runs = _ParentRuns(parent_entries)
        whole = new_pages.with_suffix(".whole")
        out_entries = []
        from_parent = []  # (pages, copied from the parent) in file order
        with open(new_pages, "rb") as new, open(old_pages, "rb") as old, open(whole, "wb") as out:
            copy = _Copier(out.fileno())
            at_new = 0
            for e in entries:
                start, n, flags = int(e["vaddr"]), int(e["nr_pages"]), int(e.get("flags", 0))
                if flags & PE_PRESENT:
                    copy(new.fileno(), at_new, n * PAGE)
                    at_new += n * PAGE
                    out_entries.append({**e, "flags": flags & ~PE_PARENT})
                    from_parent.append((n, False))
                elif flags & PE_PARENT:
                    for piece_start, piece_n, offset, piece_flags in runs.cover(pagemap.name, start, n):
                        copy(old.fileno(), offset, piece_n * PAGE)
                        out_entries.append({**e, "vaddr": piece_start, "nr_pages": piece_n, "flags": piece_flags})
                        from_parent.append((piece_n, True))
                else:
                    out_entries.append(e)
            copy.flush()
        image["entries"] = [head, *out_entries]
        tmp = pagemap.with_suffix(".whole")
        with open(tmp, "wb") as f:
            pycriu.images.dump(image, f)
        # Not a rename over the old file: ext4 would then start writing the new
        # one out at once (auto_da_alloc), a second for a GiB.
        new_pages.unlink()
        os.rename(whole, new_pages)
        os.replace(tmp, pagemap)
        runs_of = np.array(from_parent, np.int64).reshape(-1, 2)  # pages, copied (0/1)
        copied[new_pages.name] = np.repeat(runs_of[:, 1].astype(bool), runs_of[:, 0])
    link = images / "parent"
    if link.is_symlink():
        link.unlink()
    return copied


class _ParentRuns:
    """The parent pagemap's present runs, for looking up where a page is."""

    def __init__(self, entries: list[dict]):
        self.runs = []  # (start, pages, offset in the pages file, flags)
        offset = 0
        for e in entries:
            flags = int(e.get("flags", 0))
            if flags & PE_PARENT:
                raise ParentMismatch("the parent images are incremental themselves")
            if flags & PE_PRESENT:
                n = int(e["nr_pages"])
                self.runs.append((int(e["vaddr"]), n, offset, flags))
                offset += n * PAGE
        self.starts = [r[0] for r in self.runs]

    def cover(self, name: str, start: int, n: int) -> list[tuple[int, int, int, int]]:
        """The pieces of the parent's runs that hold pages [start, start + n)."""
        import bisect

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
