"""The in-memory index of every chunk in the store's packs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .errors import SnapshotNotRestorable
from .pack_format import parse_idx
from .private_files import private_dir, private_opener


class ChunkIndex:
    """hash -> location of every chunk in the packs, held in memory as sorted
    numpy arrays, so that a block of 2048 pages is looked up in one vectorized
    search (per-chunk lookups cost more than hashing the pages). About 64 bytes
    per distinct chunk: 16 MiB per GiB of distinct pages.

    The packs' indexes on the backend are the truth; copies of them in
    ``cache_dir`` spare a restart downloading them again. A copy found damaged
    is dropped and fetched again."""

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)
        private_dir(self.dir)
        self._lock = threading.Lock()
        self._names: list[str] = []  # pack number -> name (slots of dropped packs stay)
        self._numbers: dict[str, int] = {}
        # Arrays of _ROW, each sorted by key, with its keys apart (contiguous:
        # searchsorted copies a strided array on every call).
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._closed = False
        loaded = []
        for path in sorted(self.dir.glob("*.idx")):
            entries = parse_idx(path.read_bytes())
            if entries is None:
                path.unlink()
                continue
            loaded.append(self._rows(path.stem, entries))
        if loaded:
            self._runs = [_sorted_run(np.concatenate(loaded))]

    def _rows(self, pack: str, entries: np.ndarray) -> np.ndarray:
        number = self._numbers[pack] = len(self._names)
        self._names.append(pack)
        rows = np.empty(len(entries), _ROW)
        rows["hash"] = entries["hash"]
        rows["key"] = entries["hash"][:, 0]
        rows["pack"] = number
        for name in ("offset", "length", "start", "size"):
            rows[name] = entries[name]
        return rows

    def _check_open(self) -> None:
        if self._closed:
            # A server stopping while a snapshot is still being stored.
            raise SnapshotNotRestorable("the store was closed while this operation used it")

    def known_packs(self) -> set[str]:
        with self._lock:
            return set(self._numbers)

    def pack_name(self, number: int) -> str:
        return self._names[number]

    def add_pack(self, pack: str, idx: bytes) -> None:
        """Index a pack from its index file's bytes (and keep a copy)."""
        entries = parse_idx(idx)
        if entries is None:
            raise ValueError(f"pack index {pack} is damaged")
        with self._lock:
            self._check_open()
            if pack in self._numbers:
                return
            self._runs.append(_sorted_run(self._rows(pack, entries)))
            # Runs of decreasing size, each at least twice the next: few
            # runs to search, and every row merged only O(log n) times.
            while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
                merged = np.concatenate([self._runs.pop()[1], self._runs.pop()[1]])
                self._runs.append(_sorted_run(merged))
        copy = self.dir / f"{pack}.idx"
        with open(copy, "wb", opener=private_opener) as f:
            f.write(idx)

    def drop_pack(self, pack: str) -> None:
        with self._lock:
            number = self._numbers.pop(pack, None)
            if number is not None:
                self._runs = [_sorted_run(rows[rows["pack"] != number]) for _, rows in self._runs]
        (self.dir / f"{pack}.idx").unlink(missing_ok=True)

    def locate(self, hashes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """For each of ``hashes``: whether it is stored, and its row of _ROW
        (pack number, frame offset and length, start in frame, size)."""
        wanted = np.frombuffer(b"".join(hashes), dtype="<u8").reshape(-1, 4)
        keys = wanted[:, 0]
        found = np.zeros(len(hashes), bool)
        rows = np.zeros(len(hashes), _ROW)
        with self._lock:
            self._check_open()
            for run_keys, run in self._runs:
                if not len(run):
                    continue
                at = np.minimum(np.searchsorted(run_keys, keys), len(run) - 1)
                maybe = np.nonzero((run_keys[at] == keys) & ~found)[0]
                candidates = run[at[maybe]]
                same = (candidates["hash"] == wanted[maybe]).all(axis=1)
                rows[maybe[same]] = candidates[same]
                found[maybe[same]] = True
                # Two hashes with the same first 8 bytes: look past the first.
                for i in maybe[~same]:
                    j = at[i] + 1
                    while j < len(run) and run_keys[j] == keys[i]:
                        if (run["hash"][j] == wanted[i]).all():
                            rows[i], found[i] = run[j], True
                            break
                        j += 1
        return found, rows

    def pack_rows(self, pack: str) -> np.ndarray:
        """Every chunk of one pack (rows of _ROW)."""
        with self._lock:
            number = self._numbers.get(pack)
            parts = [rows[rows["pack"] == number] for _, rows in self._runs] if number is not None else []
        return np.concatenate(parts) if parts else np.zeros(0, _ROW)

    def close(self) -> None:
        # Under the lock: a snapshot still being stored when the server stops
        # may be looking up from a worker thread; it fails with a clear error.
        with self._lock:
            self._closed = True
            self._runs = []


_ROW = np.dtype(
    [
        ("key", "<u8"),
        ("hash", "<u8", (4,)),
        ("pack", "<i4"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("start", "<u4"),
        ("size", "<u4"),
    ]
)  # one chunk in the index: key is the hash's first 8 bytes


def _sorted_run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows[np.argsort(rows["key"], kind="stable")]
    return np.ascontiguousarray(rows["key"]), rows
