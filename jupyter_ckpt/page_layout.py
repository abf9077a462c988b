"""Which memory page each page of a dump's memory images holds.

CRIU writes the pages of a process (or a shared memory segment) into
``pages-<id>.img``, in the order its ``pagemap-*.img`` lists them: runs of
pages by address, those with PE_PRESENT in the file. Two dumps of one kernel
hold most pages at the same addresses, but not at the same offsets once
anything was mapped or unmapped in between; matching pages by address lets the
store compare each page with the one it replaced (chunks.Reference).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

PAGE = 4096
# CRIU's pagemap flags (images/pagemap.proto)
PE_PARENT = 1 << 0  # the run's pages are in the parent images (an incremental dump)
PE_LAZY = 1 << 1  # the run's pages may come back lazily
PE_PRESENT = 1 << 2  # the run's pages are in the pages image


# CRIU's image magics (criu/include/magic.h): a pagemap image starts with the
# common one, then its own.
_IMG_COMMON, _IMG_SERVICE, _PAGEMAP = 0x54564319, 0x55105940, 0x56084025


def read_pagemap(path: Path) -> tuple[bytes, int, np.ndarray]:
    """A pagemap image: its magic bytes, its pages file's id, and its runs as
    rows of (address, pages, flags). Read with the protobuf messages
    themselves: pycriu's dicts cost tens of microseconds a run, and a dump of
    scattered changes has tens of thousands."""
    from pycriu.images import pb

    data = path.read_bytes()
    at = 8 if int.from_bytes(data[:4], "little") in (_IMG_COMMON, _IMG_SERVICE) else 4
    if int.from_bytes(data[at - 4 : at], "little") != _PAGEMAP:
        raise ValueError(f"{path.name} is not a pagemap image")
    prefix, message, rows = data[:at], pb.pagemap_head(), []
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "little")
        message.ParseFromString(data[at + 4 : at + 4 + size])
        at += 4 + size
        if isinstance(message, pb.pagemap_head):
            pages_id, message = message.pages_id, pb.pagemap_entry()
            continue
        pages = message.nr_pages if message.HasField("nr_pages") else message.compat_nr_pages
        rows.append((message.vaddr, pages, message.flags))
    return prefix, pages_id, np.array(rows, np.uint64).reshape(-1, 3)


def write_pagemap(path: Path, prefix: bytes, pages_id: int, runs: list[tuple[int, int, int]]) -> None:
    """The pagemap image ``read_pagemap`` reads, written whole (a new file renamed)."""
    from pycriu.images import pb

    out = [prefix]
    for message in [pb.pagemap_head(pages_id=pages_id)] + [
        pb.pagemap_entry(vaddr=v, compat_nr_pages=0, nr_pages=n, flags=f) for v, n, f in runs
    ]:
        body = message.SerializeToString()
        out += [len(body).to_bytes(4, "little"), body]
    tmp = path.with_suffix(".new")
    tmp.write_bytes(b"".join(out))
    os.replace(tmp, path)


def page_addresses(images: Path) -> dict[str, tuple[str, np.ndarray]]:
    """For each ``pages-<id>.img`` in ``images``: the name of the pagemap that
    lays it out, and the address of each of its pages. Files that cannot be
    read or do not add up are left out (their pages are then matched by place)."""
    found = {}
    for pagemap in images.glob("pagemap-*.img"):
        try:
            _, pages_id, rows = read_pagemap(pagemap)
            runs = [(int(v), int(n)) for v, n, f in rows.tolist() if int(f) & PE_PRESENT]
            pages = f"pages-{pages_id}.img"
            size = (images / pages).stat().st_size
        except Exception:  # no pycriu, a damaged image, a missing file: no layout
            continue
        addresses = np.concatenate(
            [np.arange(start, start + n * PAGE, PAGE, dtype=np.uint64) for start, n in runs] or [np.zeros(0, np.uint64)]
        )
        if len(addresses) * PAGE == size:
            found[pages] = (pagemap.name, addresses)
    return found


def same_addresses(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """For each address in ``new``: the index of the same address in ``old``,
    or -1."""
    if not len(old):
        return np.full(len(new), -1, np.int64)
    order = np.argsort(old, kind="stable")
    at = np.minimum(np.searchsorted(old, new, sorter=order), len(old) - 1)
    candidates = order[at]
    return np.where(old[candidates] == new, candidates, -1).astype(np.int64)
