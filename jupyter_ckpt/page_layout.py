"""Which memory page each page of a dump's memory images holds.

CRIU writes the pages of a process (or a shared memory segment) into
``pages-<id>.img``, in the order its ``pagemap-*.img`` lists them: runs of
pages by address, those with PE_PRESENT in the file. Two dumps of one kernel
hold most pages at the same addresses, but not at the same offsets once
anything was mapped or unmapped in between; matching pages by address lets the
store compare each page with the one it replaced (chunks.Reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAGE = 4096
PE_PRESENT = 1 << 2  # CRIU's pagemap flag: the run's pages are in the pages image


def page_addresses(images: Path) -> dict[str, tuple[str, np.ndarray]]:
    """For each ``pages-<id>.img`` in ``images``: the name of the pagemap that
    lays it out, and the address of each of its pages. Files that cannot be
    read or do not add up are left out (their pages are then matched by place)."""
    try:
        import pycriu
    except ImportError:
        return {}
    found = {}
    for pagemap in images.glob("pagemap-*.img"):
        try:
            with open(pagemap, "rb") as f:
                head, *entries = pycriu.images.load(f)["entries"]
            runs = [(int(e["vaddr"]), int(e["nr_pages"])) for e in entries if int(e.get("flags", 0)) & PE_PRESENT]
            pages = f"pages-{int(head['pages_id'])}.img"
            size = (images / pages).stat().st_size
        except Exception:  # pycriu's own errors, a missing field or file: no layout
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
