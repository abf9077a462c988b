"""The server's kernels, sessions and notebooks, as the snapshot flows need them.

One seam over jupyter_server's kernel, session and contents managers: which
kernels can be snapshotted, which notebook a kernel belongs to, starting a
kernel from a plan, and the snapshot's connection details against a kernel's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .errors import KernelNotCheckpointable, KernelNotFound
from .notebooks import NotebookDocuments
from .provisioner import PLAN_ARGUMENT, ZMQ_PORTS, CheckpointableProvisioner, LaunchPlan


class ServerKernels:
    def __init__(
        self,
        kernel_manager: Any,
        session_manager: Any,
        contents_manager: Any,
        log: logging.Logger,
        live_documents: Callable[[], Any] | None = None,
    ):
        self.kernel_manager = kernel_manager
        self.session_manager = session_manager
        self.notebooks = NotebookDocuments(contents_manager, live_documents, log)
        self.log = log

    def ids(self) -> list[str]:
        return list(self.kernel_manager.list_kernel_ids()) if self.kernel_manager is not None else []

    def require(self, kernel_id: str) -> tuple[Any, CheckpointableProvisioner]:
        """The kernel's manager and provisioner, if CRIU can handle it."""
        if kernel_id not in self.ids():  # jupyter_server's get_kernel raises its own HTTP 404
            raise KernelNotFound(f"no running kernel with id {kernel_id!r}")
        km = self.kernel_manager.get_kernel(kernel_id)
        prov = km.provisioner
        if not isinstance(prov, CheckpointableProvisioner):
            raise KernelNotCheckpointable(
                f"kernel {kernel_id} was started by the {type(prov).__name__}, which CRIU cannot snapshot: "
                "start it with a kernelspec whose metadata names the 'ckpt-provisioner', or set "
                "CheckpointApp.use_provisioner_by_default = True and start a new kernel"
            )
        if not prov.checkpointable:
            raise KernelNotCheckpointable(f"kernel {kernel_id} cannot be snapshotted: {prov.not_checkpointable_reason}")
        return km, prov

    def restored_from(self, kernel_id: str) -> str | None:
        try:
            km = self.kernel_manager.get_kernel(kernel_id)
        except (KeyError, AttributeError):
            return None
        tree = getattr(km.provisioner, "tree", None)
        return tree.restored_from if tree else None

    async def start(self, kernel_id: str, kernel_name: str, notebook: str | None, plan: LaunchPlan) -> Any:
        """Start a kernel that comes from a snapshot (see LaunchPlan)."""
        try:
            await self.kernel_manager.start_kernel(
                kernel_id=kernel_id, kernel_name=kernel_name, path=folder_of(notebook), **{PLAN_ARGUMENT: plan}
            )
        except BaseException:
            # jupyter_client keeps a kernel whose start failed among its pending
            # ones, and its shutdown_all then fails on it: forget it.
            getattr(self.kernel_manager, "_pending_kernels", {}).pop(kernel_id, None)
            raise
        return self.kernel_manager.get_kernel(kernel_id)

    async def shutdown(self, kernel_id: str) -> None:
        if kernel_id in self.ids():
            await self.kernel_manager.shutdown_kernel(kernel_id, now=True)

    # -- notebooks --------------------------------------------------------------------

    async def notebook_path(self, kernel_id: str) -> str | None:
        if self.session_manager is None:
            return None
        try:
            sessions = [
                s for s in await self.session_manager.list_sessions() if s.get("kernel", {}).get("id") == kernel_id
            ]
            # A console opened for the notebook shares its kernel: the notebook's session first.
            sessions.sort(key=lambda s: s.get("type") != "notebook")
            if sessions:
                return sessions[0].get("path")
        except Exception:  # a broken session database must not block a snapshot
            self.log.debug("jupyter_ckpt: cannot list sessions", exc_info=True)
        return None

    async def attach_session(self, path: str, kernel_id: str) -> None:
        """Make ``kernel_id`` the kernel of notebook ``path``."""
        if self.session_manager is None:
            return
        for session in await self.session_manager.list_sessions():
            if session.get("path") == path:
                await self.session_manager.update_session(session["id"], kernel_id=kernel_id)
                return
        name = path.rsplit("/", 1)[-1]
        await self.session_manager.create_session(path=path, name=name, type="notebook", kernel_id=kernel_id)


def connection_info(km: Any) -> dict[str, Any]:
    """A kernel's ports, address and key, as kept in a snapshot's record."""
    info = dict(km.get_connection_info(session=False))
    key = info.get("key", b"")
    info["key"] = key.decode() if isinstance(key, bytes) else key
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}


def listener_moves(snapshot: dict[str, Any], here: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """For criu_images.move_listeners: each ZMQ listener of the snapshot's kernel
    whose address or port differs from where the kernel restored now listens."""
    return {
        snapshot[p]: (here["ip"], here[p])
        for p in ZMQ_PORTS
        if snapshot.get(p) and (snapshot[p], snapshot.get("ip")) != (here[p], here["ip"])
    }


def folder_of(path: str | None) -> str:
    """The folder of a notebook's API path ('' for the root)."""
    return path.rsplit("/", 1)[0] if path and "/" in path else ""
