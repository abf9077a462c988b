"""What the REST handlers check of a request before the manager sees it: the
JSON body, yes/no query flags, and the HTTP status of each error. Kept apart
from the handlers so that it is tested (and mutation-tested) without a server."""

from __future__ import annotations

import json
from typing import Any

from tornado import web

from . import errors

STATUS_FOR_ERROR: dict[type[errors.CheckpointError], int] = {
    errors.InvalidRequest: 400,
    errors.NotPermitted: 403,
    errors.SnapshotNotFound: 404,
    errors.KernelNotFound: 404,
    errors.KernelNotCheckpointable: 409,
    errors.OperationInProgress: 409,
    errors.SnapshotNotRestorable: 409,
    errors.DumpFailed: 500,
    errors.RestoreFailed: 500,
    errors.NotSupported: 501,
    errors.CriuUnavailable: 503,
    errors.QuotaExceeded: 507,
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object ({} for none); 400 for anything else."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise web.HTTPError(400, f"the request body is not JSON (UTF-8) of a reasonable depth: {e}") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, "the request body must be a JSON object")
    return data


def status_for(error: errors.CheckpointError) -> int:
    """The HTTP status of an error (its class's, or the nearest base class's)."""
    return next((s for cls, s in STATUS_FOR_ERROR.items() if isinstance(error, cls)), 500)


def query_flag(value: str) -> bool:
    """A yes/no query argument (?trust=true)."""
    return value.lower() in ("1", "true", "yes")
