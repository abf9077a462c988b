"""REST API under /api/ckpt: translates HTTP into CheckpointManager calls.

Authorization: a snapshot holds a kernel's whole memory and a restore runs code
as that kernel, so every endpoint is authorized as the ``kernels`` resource:
reading lists needs ``read``, creating, restoring and deleting need ``write``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import ensure_async, url_path_join
from tornado import web

from . import errors
from ._version import __version__
from .manager import CheckpointManager
from .records import SnapshotRecord
from .request_checks import parse_json_body, query_flag, status_for


# The one place where the package's errors become HTTP statuses.
def translate_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def wrapper(self: APIHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except errors.CheckpointError as e:
            raise web.HTTPError(status_for(e), str(e)) from None

    return wrapper


def snapshot_model(record: SnapshotRecord) -> dict[str, Any]:
    return record.public_json()


class CheckpointHandler(APIHandler):
    auth_resource = "kernels"

    @property
    def manager(self) -> CheckpointManager:
        return self.settings["ckpt_manager"]

    @property
    def auto_backup(self):
        return self.settings["ckpt_auto_backup"]

    def body(self) -> dict[str, Any]:
        return parse_json_body(self.request.body)

    async def require_contents(self, action: str) -> None:
        """Notebooks kept with snapshots are contents too: reading one needs
        ``contents`` read, writing one back needs ``contents`` write."""
        allowed = await ensure_async(self.authorizer.is_authorized(self, self.current_user, action, "contents"))
        if not allowed:
            raise web.HTTPError(403, f"not authorized to {action} notebooks")

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))


class StatusHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json({"version": __version__, **self.manager.status()})


class SnapshotListHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        kernel_id = self.get_query_argument("kernel_id", None)
        path = self.get_query_argument("path", None)
        records = await self.manager.list_snapshots(kernel_id=kernel_id, path=path)
        self.write_json([snapshot_model(r) for r in records])


class KernelHandler(CheckpointHandler):
    """A kernel as jupyter-ckpt sees it: can it be snapshotted, and which
    snapshot its processes were restored from (what the notebook shows)."""

    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.write_json(await self.manager.kernel_info(kernel_id))


class HibernateHandler(CheckpointHandler):
    """POST: snapshot the kernel and stop its processes (it stays listed)."""

    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, kernel_id: str) -> None:
        self.write_json(await self.manager.hibernate(kernel_id))


class WakeHandler(CheckpointHandler):
    """POST: restore a hibernated kernel now."""

    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, kernel_id: str) -> None:
        self.write_json((await self.manager.wake(kernel_id)).to_json())


class KernelSnapshotsHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.manager.require_kernel(kernel_id)  # 404 for an unknown kernel
        self.write_json([snapshot_model(r) for r in await self.manager.list_snapshots(kernel_id=kernel_id)])

    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, kernel_id: str) -> None:
        """Starts a snapshot: 202, the snapshot (status pending) and its Location.
        Its progress shows in GET of that location and in the event stream."""
        body = self.body()
        record = await self.manager.start_snapshot(
            kernel_id, label=body.get("label", ""), notebook=body.get("notebook")
        )
        self.set_header("Location", url_path_join(self.base_url, "api/ckpt/snapshots", record.id))
        self.write_json(snapshot_model(record), status=202)


class SnapshotHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, snapshot_id: str) -> None:
        self.write_json(snapshot_model(await self.manager.get(snapshot_id)))

    @web.authenticated
    @authorized
    @translate_errors
    async def patch(self, snapshot_id: str) -> None:
        body = self.body()
        if set(body) - {"label"}:
            raise errors.InvalidRequest("only the label of a snapshot can be changed")
        self.write_json(snapshot_model(await self.manager.relabel(snapshot_id, body.get("label"))))

    @web.authenticated
    @authorized
    @translate_errors
    async def delete(self, snapshot_id: str) -> None:
        await self.manager.delete(snapshot_id)
        self.set_status(204)
        self.finish()


class SnapshotNotebookHandler(CheckpointHandler):
    """GET: the notebook document stored with the snapshot (nbformat JSON)."""

    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, snapshot_id: str) -> None:
        await self.require_contents("read")
        document = await self.manager.notebook(snapshot_id)
        self.set_header("Content-Type", "application/x-ipynb+json")
        self.finish(document)


class BundleHandler(CheckpointHandler):
    """GET: the snapshot as one self-contained file, streamed."""

    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, snapshot_id: str) -> None:
        with self.manager.scratch_dir("bundle-") as tmp:
            path = tmp / "bundle.jckpt"  # never a name from the URL
            with open(path, "wb") as out:
                await self.manager.export_bundle(snapshot_id, out)  # 404 or 409 for a bad id
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Disposition", f'attachment; filename="{snapshot_id}.jckpt"')
            self.set_header("Content-Length", str(path.stat().st_size))
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.write(chunk)
                    await self.flush()
        self.finish()


@web.stream_request_body
class BundleUploadHandler(CheckpointHandler):
    """POST a bundle (the raw file as the body); ?trust=true accepts one signed
    with another store's key. Streamed to disk, never held in memory."""

    _scratch = None

    async def prepare(self) -> None:  # type:ignore[override]
        # The body streams in before the verb runs: refuse anyone who may not
        # upload before a byte of it is written to disk.
        await super().prepare()
        if not self.current_user:
            raise web.HTTPError(403)
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "write", self.auth_resource)
        )
        if not allowed:
            raise web.HTTPError(403, "not authorized to upload snapshots")
        try:
            await self.manager.require_room()
        except errors.QuotaExceeded as e:
            raise web.HTTPError(507, str(e)) from None
        self._scratch = self.manager.scratch_dir("upload-")
        self._dir = self._scratch.__enter__()
        self._upload = open(self._dir / "bundle.jckpt", "wb")
        if self.request.connection is not None:
            self.request.connection.set_max_body_size(self.settings.get("ckpt_max_bundle_bytes", 1 << 40))

    def data_received(self, chunk: bytes) -> None:
        self._upload.write(chunk)

    def on_finish(self) -> None:
        if self._scratch is not None:
            self._upload.close()
            self._scratch.__exit__(None, None, None)

    @web.authenticated
    @authorized
    @translate_errors
    async def post(self) -> None:
        self._upload.close()
        trust = query_flag(self.get_query_argument("trust", "false"))
        with open(self._dir / "bundle.jckpt", "rb") as src:
            record = await self.manager.import_bundle(src, trust)
        self.set_header("Location", url_path_join(self.base_url, "api/ckpt/snapshots", record.id))
        self.write_json(snapshot_model(record), status=201)


class RestoreHandler(CheckpointHandler):
    @web.authenticated
    @authorized
    @translate_errors
    async def post(self, snapshot_id: str) -> None:
        body = self.body()
        if body.get("notebook") or body.get("copy"):
            await self.require_contents("write")
        outcome = await self.manager.restore(
            snapshot_id,
            kernel_id=body.get("kernel_id"),
            mode=body.get("mode", "replace"),
            path=body.get("path"),
            copy_notebook=bool(body.get("copy", False)),
            notebook=body.get("notebook", False),
        )
        if outcome.mode == "new":
            self.set_header("Location", url_path_join(self.base_url, "api/kernels", outcome.kernel_id))
            self.write_json(outcome.to_json(), status=201)
        else:
            self.write_json(outcome.to_json())


class ScheduleHandler(CheckpointHandler):
    """A kernel's auto-backup schedule: {"enabled", "interval_seconds", "keep"}."""

    @web.authenticated
    @authorized
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.write_json(self.auto_backup.get(kernel_id).to_json())

    @web.authenticated
    @authorized
    @translate_errors
    async def put(self, kernel_id: str) -> None:
        self.write_json(self.auto_backup.set(kernel_id, self.body()).to_json())


class KernelSelfHandler(CheckpointHandler):
    """What a kernel may do about itself (the %checkpoint magic), with the
    credential its provisioner gave it: ``Authorization: ckpt-kernel <token>``.
    That token is good for this kernel's own snapshots and schedule only."""

    def check_xsrf_cookie(self) -> None:
        # Authenticated by a header, never by a cookie: no cross-site forgery.
        return None

    async def prepare(self) -> None:  # type:ignore[override]
        await super().prepare()
        kernel_id = self.path_kwargs.get("kernel_id", "")
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        credentials = self.settings["ckpt_kernel_credentials"]
        if scheme != "ckpt-kernel" or not credentials.verify(kernel_id, token):
            raise web.HTTPError(403, "a kernel credential for this kernel is required")

    async def own(self, kernel_id: str, snapshot_id: str) -> SnapshotRecord:
        record = await self.manager.get(snapshot_id)
        if record.kernel_id != kernel_id:
            raise errors.SnapshotNotFound(f"no snapshot with id {snapshot_id!r} of this kernel")
        return record


class KernelSelfInfoHandler(KernelSelfHandler):
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.manager.require_kernel(kernel_id)
        self.write_json(
            {
                "kernel_id": kernel_id,
                "restored_from": self.manager.restored_from(kernel_id),
                "settled": self.manager.settled(kernel_id),
            }
        )


class KernelSelfSnapshotsHandler(KernelSelfHandler):
    @translate_errors
    async def get(self, kernel_id: str) -> None:
        self.write_json([snapshot_model(r) for r in await self.manager.list_snapshots(kernel_id=kernel_id)])

    @translate_errors
    async def post(self, kernel_id: str) -> None:
        record = await self.manager.start_snapshot(kernel_id, label=self.body().get("label", ""), trigger="magic")
        self.write_json(snapshot_model(record), status=202)


class KernelSelfSnapshotHandler(KernelSelfHandler):
    @translate_errors
    async def get(self, kernel_id: str, snapshot_id: str) -> None:
        self.write_json(snapshot_model(await self.own(kernel_id, snapshot_id)))


class KernelSelfScheduleHandler(KernelSelfHandler):
    @translate_errors
    async def put(self, kernel_id: str) -> None:
        self.write_json(self.auto_backup.set(kernel_id, self.body()).to_json())


_kernel_id = r"(?P<kernel_id>[\w-]+)"
_snapshot_id = r"(?P<snapshot_id>[^/]+)"

default_handlers = [
    (r"/api/ckpt/status", StatusHandler),
    (r"/api/ckpt/snapshots", SnapshotListHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}", SnapshotHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}/restore", RestoreHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}/bundle", BundleHandler),
    (rf"/api/ckpt/snapshots/{_snapshot_id}/notebook", SnapshotNotebookHandler),
    (r"/api/ckpt/bundles", BundleUploadHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}", KernelHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}/snapshots", KernelSnapshotsHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}/schedule", ScheduleHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}/hibernate", HibernateHandler),
    (rf"/api/ckpt/kernels/{_kernel_id}/wake", WakeHandler),
    (rf"/api/ckpt/self/{_kernel_id}", KernelSelfInfoHandler),
    (rf"/api/ckpt/self/{_kernel_id}/snapshots", KernelSelfSnapshotsHandler),
    (rf"/api/ckpt/self/{_kernel_id}/snapshots/{_snapshot_id}", KernelSelfSnapshotHandler),
    (rf"/api/ckpt/self/{_kernel_id}/schedule", KernelSelfScheduleHandler),
]
