"""Which kernels were running when the server stopped (a crash included), so
that the next start can restore them from their latest snapshots."""

from __future__ import annotations

import json
from pathlib import Path

from .private_files import write_private_atomic


class RunningKernels:
    """The ids of the server's running kernels, kept in a private file."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> set[str]:
        try:
            ids = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return set()
        return {k for k in ids if isinstance(k, str)} if isinstance(ids, list) else set()

    def mark(self, kernel_id: str, running: bool) -> None:
        ids = self._read()
        ids = ids | {kernel_id} if running else ids - {kernel_id}
        write_private_atomic(self.path, json.dumps(sorted(ids)).encode())

    def take(self) -> list[str]:
        """The kernels of the previous run, and forget them."""
        ids = sorted(self._read())
        write_private_atomic(self.path, b"[]")
        return ids
