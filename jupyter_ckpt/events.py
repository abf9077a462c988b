"""Snapshot events (schema jupyter_ckpt/snapshot/v1) on the server's event bus:
what the frontend listens to instead of polling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .records import SnapshotRecord

SCHEMA_ID = "https://events.jupyter.org/jupyter_ckpt/snapshot/v1"


class SnapshotEvents:
    def __init__(self, emit: Callable[[dict[str, Any]], None] | None, log: logging.Logger):
        self._emit, self.log = emit, log

    def publish(self, data: dict[str, Any]) -> None:
        """Publish one event; events inform, they never break an operation."""
        if self._emit is None:
            return
        try:
            self._emit(data)
        except Exception:
            self.log.debug("jupyter_ckpt: event not emitted", exc_info=True)

    def snapshot(self, action: str, record: SnapshotRecord, message: str | None = None) -> None:
        """An event about one snapshot: its status, sizes, freeze and reason."""
        data: dict[str, Any] = {
            "action": action,
            "snapshot_id": record.id,
            "kernel_id": record.kernel_id,
            "status": record.status,
        }
        for name in ("memory_bytes", "stored_bytes", "freeze_seconds"):
            if getattr(record, name):
                data[name] = getattr(record, name)
        if record.changed_bytes is not None:  # 0 too: an incremental snapshot of an unchanged kernel
            data["changed_bytes"] = record.changed_bytes
        if message or record.error:
            data["message"] = message or record.error
        self.publish(data)
