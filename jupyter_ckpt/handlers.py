"""REST API under /api/ckpt: translates HTTP into CheckpointManager calls.

Authorization: a snapshot holds a kernel's whole memory and a restore runs code
as that kernel, so every endpoint is authorized as the ``kernels`` resource:
reading lists needs ``read``, creating, restoring and deleting need ``write``.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Awaitable, Callable

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from . import errors
from ._version import __version__
from .manager import CheckpointManager
from .store import SnapshotRecord

# The one place where the package's errors become HTTP statuses.
STATUS_FOR_ERROR: dict[type[errors.CheckpointError], int] = {
    errors.InvalidRequest: 400,
    errors.SnapshotNotFound: 404,
    errors.KernelNotFound: 404,
    errors.KernelNotCheckpointable: 409,
    errors.OperationInProgress: 409,
    errors.SnapshotNotRestorable: 409,
    errors.DumpFailed: 500,
    errors.RestoreFailed: 500,
    errors.NotSupported: 501,
    errors.CriuUnavailable: 503,
}

# Fields of a record that are engine internals, not part of the API's model.
_INTERNAL_FIELDS = ("stdio_keys",)


def translate_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(self: APIHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except errors.CheckpointError as e:
            status = next((s for cls, s in STATUS_FOR_ERROR.items() if isinstance(e, cls)), 500)
            raise web.HTTPError(status, str(e)) from None

    return wrapper


def snapshot_model(record: SnapshotRecord) -> dict[str, Any]:
    model = record.to_json()
    for name in _INTERNAL_FIELDS:
        model.pop(name, None)
    return model


class CheckpointHandler(APIHandler):
    auth_resource = "kernels"

    @property
    def manager(self) -> CheckpointManager:
        return self.settings["ckpt_manager"]

    def body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        data = self.get_json_body()
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return data

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


class StatusHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        health = self.manager.engine.health()
        self.write_json(
            {
                "version": __version__,
                "criu": {
                    "available": health.available,
                    "version": health.version,
                    "reason": health.reason,
                },
                "store": {"backend": self.manager.store.backend},
                "features": {
                    "snapshot": health.available,
                    "restore_replace": health.available,
                    "restore_new": False,
                },
            }
        )


class SnapshotListHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        kernel_id = self.get_query_argument("kernel_id", None)
        path = self.get_query_argument("path", None)
        records = self.manager.store.list(kernel_id=kernel_id, path=path)
        self.write_json([snapshot_model(r) for r in records])


class KernelSnapshotsHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.manager._kernel(kernel_id)  # 404 for an unknown kernel
        self.write_json([snapshot_model(r) for r in self.manager.store.list(kernel_id=kernel_id)])

    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        record = await self.manager.snapshot(kernel_id, label=body.get("label", ""))
        self.set_header("Location", url_path_join(self.base_url, "api/ckpt/snapshots", record.id))
        self.write_json(snapshot_model(record), status=201)


class SnapshotHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, snapshot_id: str) -> None:
        self.write_json(snapshot_model(self.manager.store.get(snapshot_id)))

    @web.authenticated
    @authorized
    @translate_errors
    async def delete(self, snapshot_id: str) -> None:
        self.manager.store.delete(snapshot_id)
        self.set_status(204)
        self.finish()


class RestoreHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, snapshot_id: str) -> None:
        body = self.body()
        outcome = await self.manager.restore(
            snapshot_id, kernel_id=body.get("kernel_id"), mode=body.get("mode", "replace")
        )
        self.write_json(outcome.to_json())


_kernel_id = r"(?P<kernel_id>[\w-]+)"
_snapshot_id = r"(?P<snapshot_id>[^/]+)"

default_handlers = [
    (r"/api/ckpt/status", StatusHandler),
    (r"/api/ckpt/snapshots", SnapshotListHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}", SnapshotHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}/restore", RestoreHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}/snapshots", KernelSnapshotsHandler),
]
