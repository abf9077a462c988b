"""Follows each kernel's IOPub stream for what a snapshot record states about it.

The server's own activity watcher keeps busy/idle but not the execution count,
which a snapshot records (and auto-backup uses to skip unchanged kernels).
ZMQ reconnects these streams by itself after a restore.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session


@dataclass
class KernelActivity:
    execution_count: int | None = None
    execution_state: str = "starting"
    executions_seen: int = 0  # grows with every cell run; compares states cheaply


class ActivityTracker:
    def __init__(self, kernel_manager: Any, log: logging.Logger | None = None):
        self.kernel_manager = kernel_manager
        self.log = log or logging.getLogger(__name__)
        self._context = zmq.asyncio.Context.instance()
        self._tasks: dict[str, asyncio.Task] = {}
        self._activity: dict[str, KernelActivity] = {}

    def watch(self, kernel_id: str) -> None:
        """Start following a kernel (idempotent). Raises KeyError for an unknown kernel."""
        if kernel_id in self._tasks:
            return
        kernel = self.kernel_manager.get_kernel(kernel_id)
        info = kernel.get_connection_info(session=True)
        activity = self._activity.setdefault(kernel_id, KernelActivity())
        sock = self._context.socket(zmq.SUB)
        sock.linger = 0
        # Watching starts as the kernel starts: retry fast so that the first
        # cells of a fresh kernel are not missed while it binds its sockets.
        sock.setsockopt(zmq.RECONNECT_IVL, 10)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(_iopub_url(info))
        task = asyncio.ensure_future(self._follow(sock, info["session"], activity))
        self._tasks[kernel_id] = task

    async def _follow(self, sock: zmq.asyncio.Socket, session: Session, activity: KernelActivity) -> None:
        try:
            while True:
                msg_list = await sock.recv_multipart()
                try:
                    _, fed = session.feed_identities(msg_list)
                    head = session.deserialize(fed, content=False)
                    msg_type = head["header"]["msg_type"]
                    if msg_type not in ("execute_input", "execute_result", "error", "status"):
                        continue
                    content = session.deserialize(fed)["content"]
                except Exception:  # a malformed message must not stop the tracking
                    self.log.debug("jupyter_ckpt: unreadable iopub message", exc_info=True)
                    continue
                if msg_type == "execute_input":
                    activity.execution_count = content.get("execution_count", activity.execution_count)
                    activity.executions_seen += 1
                elif msg_type in ("execute_result", "error"):
                    activity.execution_count = content.get("execution_count") or activity.execution_count
                else:
                    activity.execution_state = content.get("execution_state", activity.execution_state)
        finally:
            sock.close()

    def get(self, kernel_id: str) -> KernelActivity:
        return self._activity.get(kernel_id, KernelActivity())

    def forget(self, kernel_id: str) -> None:
        task = self._tasks.pop(kernel_id, None)
        if task is not None:
            task.cancel()
        self._activity.pop(kernel_id, None)

    def close(self) -> None:
        for kernel_id in list(self._tasks):
            self.forget(kernel_id)


def _iopub_url(info: dict[str, Any]) -> str:
    if info["transport"] == "ipc":
        return f"ipc://{info['ip']}-{info['iopub_port']}"
    return f"{info['transport']}://{info['ip']}:{info['iopub_port']}"
