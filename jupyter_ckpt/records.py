"""Snapshot records (what the API lists) and snapshot ids."""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidRequest, SnapshotNotFound

# Crockford's base32: ids sort by creation time as plain strings (ULID layout:
# 48 bits of milliseconds, then 80 random bits).
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
SNAPSHOT_ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
KERNEL_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

STATUSES = ("pending", "dumping", "storing", "complete", "failed")
TRIGGERS = ("manual", "magic", "auto", "hibernate")
# Where a snapshot's notebook came from: the browser's document (unsaved edits
# included), the live shared document (jupyter-collaboration), the saved file.
NOTEBOOK_SOURCES = ("browser", "live", "saved")
INTERNAL_FIELDS = ("stdio_keys", "connection")


def new_snapshot_id(now: float | None = None) -> str:
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    return "".join(_B32[(value >> shift) & 31] for shift in range(125, -1, -5))


def check_snapshot_id(snapshot_id: str) -> str:
    """Ids come from URLs and bundles: never let one name a path."""
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.match(snapshot_id):
        raise SnapshotNotFound(f"no snapshot with id {snapshot_id!r}")
    return snapshot_id


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
    trigger: str = "manual"  # manual, magic, auto or hibernate
    parent_id: str | None = None
    created: str = field(default_factory=_now_iso)
    status: str = "pending"
    error: str | None = None
    memory_bytes: int = 0
    # Of memory_bytes, what was written since the previous snapshot, the part
    # dumped while frozen (dirty_tracking.py); None for a full dump.
    changed_bytes: int | None = None
    stored_bytes: int = 0
    freeze_seconds: float | None = None
    total_seconds: float | None = None
    execution_count: int | None = None
    criu_version: str | None = None
    # Engine data needed to restore: CRIU's names of the pipes that carried the
    # kernel's stdout/stderr, re-attached to fresh pipes on restore.
    stdio_keys: dict[str, str] = field(default_factory=dict)
    # The kernel's ports and message key (secret: never in the API), so that a
    # kernel gone since can be started again with what the snapshot listens on.
    connection: dict[str, Any] = field(default_factory=dict)
    # Set when the snapshot came in a bundle: when, the fingerprint of the key
    # that signed it, and whether this store verified that signature (else it
    # was imported trusting its origin). See private_files.key_fingerprint.
    imported: dict[str, Any] | None = None
    # The notebook document stored with the snapshot: where it came from (one
    # of NOTEBOOK_SOURCES), None when the snapshot has none.
    notebook: str | None = None

    @property
    def restorable(self) -> bool:
        return self.status == "complete"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def public_json(self) -> dict[str, Any]:
        """The API's model: without the engine's data and the kernel's key."""
        data = self.to_json()
        for name in INTERNAL_FIELDS:
            data.pop(name, None)
        return data

    def as_kernel(self, kernel_id: str) -> SnapshotRecord:
        """The same snapshot, as restored into another kernel (for events)."""
        return SnapshotRecord(**{**self.to_json(), "kernel_id": kernel_id})

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_untrusted(cls, data: dict[str, Any]) -> SnapshotRecord:
        """A record from outside (a bundle), every field checked: ValueError
        names the first one that is not what this package writes."""
        check_snapshot_id_value(data.get("id"))
        for name, kinds, optional in _FIELD_KINDS:
            value = data.get(name)
            if name == "kernel_id" and not isinstance(value, str):
                raise ValueError(f"the record's kernel_id is {value!r}")  # the one field without a default
            if value is None and (optional or name not in data):
                continue
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ValueError(f"the record's {name} is {value!r}")
        if data.get("notebook") not in (None, *NOTEBOOK_SOURCES):
            raise ValueError(f"the record's notebook is {data.get('notebook')!r}")
        if data.get("trigger", "manual") not in TRIGGERS or data.get("status", "pending") not in STATUSES:
            raise ValueError("the record's trigger or status is not one this package uses")
        for name in ("stdio_keys", "connection"):
            if not all(
                isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in data.get(name, {}).items()
            ):
                raise ValueError(f"the record's {name} holds something other than names and plain values")
        return cls.from_json(data)


# Field, accepted types, may be null (from_untrusted).
_FIELD_KINDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("kernel_id", (str,), False),
    ("kernel_name", (str,), False),
    ("path", (str,), True),
    ("label", (str,), False),
    ("trigger", (str,), False),
    ("parent_id", (str,), True),
    ("created", (str,), False),
    ("status", (str,), False),
    ("error", (str,), True),
    ("memory_bytes", (int,), False),
    ("changed_bytes", (int,), True),
    ("stored_bytes", (int,), False),
    ("freeze_seconds", (int, float), True),
    ("total_seconds", (int, float), True),
    ("execution_count", (int,), True),
    ("criu_version", (str,), True),
    ("stdio_keys", (dict,), False),
    ("connection", (dict,), False),
    ("imported", (dict,), True),
    ("notebook", (str,), True),
)


def check_snapshot_id_value(snapshot_id: Any) -> str:
    if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.match(snapshot_id):
        raise ValueError(f"the record's id {snapshot_id!r} is not a snapshot id")
    return snapshot_id


def validate_label(label: Any) -> str:
    if label is None:
        return ""
    if not isinstance(label, str) or len(label) > 200 or any(c in label for c in "\n\r\0"):
        raise InvalidRequest("label must be a single line of at most 200 characters")
    return label.strip()
