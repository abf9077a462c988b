"""Snapshot records and their images on local disk.

Layout under the store root (every directory 0700, every file 0600: a snapshot
holds all of a kernel's memory, secrets included)::

    snapshots/<id>/snapshot.json   the record (written atomically)
    snapshots/<id>/images/         CRIU's image files
    tmp/                           scratch directories (CRIU logs of restores, ...)

Usable without a server: the CLI and tests open a store on a directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .errors import InvalidRequest, SnapshotNotFound

RECORD = "snapshot.json"
IMAGES = "images"

# Crockford's base32: ids sort by creation time as plain strings (ULID layout:
# 48 bits of milliseconds, then 80 random bits).
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")

STATUSES = ("pending", "dumping", "storing", "complete", "failed")


def new_snapshot_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    return "".join(_B32[(value >> shift) & 31] for shift in range(125, -1, -5))


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class SnapshotRecord:
    """One snapshot of one kernel, as listed and returned by the API."""

    id: str
    kernel_id: str
    kernel_name: str = ""
    path: str | None = None  # notebook path, when the server knows it
    label: str = ""
    trigger: str = "manual"  # manual, magic or auto
    parent_id: str | None = None
    created: str = field(default_factory=_now_iso)
    status: str = "pending"
    error: str | None = None
    memory_bytes: int = 0
    stored_bytes: int = 0
    freeze_seconds: float | None = None
    total_seconds: float | None = None
    execution_count: int | None = None
    criu_version: str | None = None
    # Engine data needed to restore: CRIU's names of the pipes that carried the
    # kernel's stdout/stderr, re-attached to fresh pipes on restore.
    stdio_keys: dict[str, str] = field(default_factory=dict)

    @property
    def restorable(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SnapshotRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class LocalSnapshotStore:
    """A directory per snapshot on local disk."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._snapshots = self.root / "snapshots"
        self._tmp = self.root / "tmp"
        for d in (self.root, self._snapshots, self._tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    # -- paths --------------------------------------------------------------------

    def _dir(self, snapshot_id: str) -> Path:
        # Ids come from URLs: never let one name a path outside the store.
        if not _ID.match(snapshot_id or ""):
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
        return self._snapshots / snapshot_id

    def images_dir(self, snapshot_id: str) -> Path:
        return self._dir(snapshot_id) / IMAGES

    # -- records ------------------------------------------------------------------

    def create(self, record: SnapshotRecord) -> Path:
        """Register a new snapshot; returns the empty directory CRIU dumps into."""
        d = self._dir(record.id)
        d.mkdir(mode=0o700)
        (d / IMAGES).mkdir(mode=0o700)
        self.save(record)
        return d / IMAGES

    def save(self, record: SnapshotRecord) -> None:
        """Write the record atomically: readers see the old or the new one, whole."""
        d = self._dir(record.id)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".record-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record.to_json(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / RECORD)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(d)

    def get(self, snapshot_id: str) -> SnapshotRecord:
        path = self._dir(snapshot_id) / RECORD
        try:
            return SnapshotRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}") from None

    def list(self, kernel_id: str | None = None, path: str | None = None) -> list[SnapshotRecord]:
        """Newest first."""
        out = []
        for d in sorted(self._snapshots.iterdir(), reverse=True):
            try:
                rec = self.get(d.name)
            except (SnapshotNotFound, ValueError):
                continue  # a directory being created, or not ours
            if kernel_id and rec.kernel_id != kernel_id:
                continue
            if path and rec.path != path:
                continue
            out.append(rec)
        return out

    def seal(self, snapshot_id: str) -> int:
        """Make every image file private; returns the bytes the images take."""
        total = 0
        for p in self.images_dir(snapshot_id).rglob("*"):
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
            if p.is_file():
                total += p.stat().st_size
        return total

    def discard_images(self, snapshot_id: str) -> None:
        """Drop the images of a failed snapshot; its record stays, with the reason."""
        shutil.rmtree(self.images_dir(snapshot_id), ignore_errors=True)

    def delete(self, snapshot_id: str) -> None:
        d = self._dir(snapshot_id)
        if not d.exists():
            raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
        shutil.rmtree(d)

    @contextmanager
    def scratch_dir(self, prefix: str = "op-") -> Iterator[Path]:
        """A private directory under the store, removed afterwards."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=self._tmp))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)


def validate_label(label: Any) -> str:
    if label is None:
        return ""
    if not isinstance(label, str) or len(label) > 200 or any(c in label for c in "\n\r\0"):
        raise InvalidRequest("label must be a single line of at most 200 characters")
    return label.strip()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
