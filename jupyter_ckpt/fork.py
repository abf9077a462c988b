"""Restoring a snapshot as a new kernel (a fork) beside the running one.

The fork lives in a network namespace of its own (forknet), so its listeners
(its ZMQ ports, and any the user's code opened) never collide with the
original's; its ZMQ listeners are moved in the images to the namespace's
address, where the server connects to them. The same snapshot can be forked
any number of times, at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from .errors import CheckpointError, InvalidRequest, RestoreFailed, SnapshotNotRestorable
from .flow import Flow, FlowParts
from .forknet import ForkNetwork
from .kernel_tree import RestoredTree, restore_tree
from .kernels import listener_moves
from .provisioner import LaunchPlan
from .reconnect import wait_until_answering
from .records import SnapshotRecord
from .restore import RestoreOutcome, verified_images


class Fork(Flow):
    def __init__(self, parts: FlowParts, outbound: str = "nat"):
        super().__init__(parts)
        self.outbound = outbound

    async def fork(
        self, record: SnapshotRecord, path: str | None = None, copy_notebook: bool = False, kernel_id: str | None = None
    ) -> RestoreOutcome:
        """Restore ``record`` as kernel ``kernel_id`` (new by default), attached
        to notebook ``path``, or to a new copy of the snapshot's notebook."""
        if not record.connection:
            raise SnapshotNotRestorable(f"snapshot {record.id} has no connection details to restore it as a new kernel")
        kernel_id = kernel_id or str(uuid.uuid4())
        target_path = await self._notebook(record, path, copy_notebook)
        started = time.monotonic()
        network: ForkNetwork | None = None
        restored: list[RestoredTree] = []
        async with self.claims.hold(kernel_id):
            try:
                with self.store.scratch_dir("fork-") as work:
                    images = await verified_images(self.store, record, work, self.engine)
                    prepared = time.monotonic() - started
                    network = await asyncio.to_thread(self.engine.create_network, self.outbound)
                    self.journal.begin("fork", kernel_id, snapshot_id=record.id, netns=network.name)
                    here = {**record.connection, "ip": network.kernel_address}
                    moves = listener_moves(record.connection, here)
                    netns = network.path

                    def restore() -> RestoredTree:
                        restored.append(restore_tree(self.engine, images, work, record.stdio_keys, netns, False, moves))
                        return restored[-1]

                    plan = LaunchPlan(record.id, record.connection, network, restore)
                    km = await self.kernels.start(kernel_id, record.kernel_name, target_path, plan)
            except BaseException as e:
                await self._undo(kernel_id, network, target_path if copy_notebook else None)
                self.journal.end("fork", kernel_id)
                if isinstance(e, CheckpointError):
                    self.events.snapshot("restore_failed", record, message=str(e))
                    raise
                if isinstance(e, Exception):
                    message = f"restoring snapshot {record.id} as a new kernel failed: {e}"
                    self.events.snapshot("restore_failed", record, message=message)
                    raise RestoreFailed(message) from None
                raise
            self.journal.end("fork", kernel_id)  # a kernel of the server's now (tracked as such)
            self.claims.lineage[kernel_id] = record.id
            await wait_until_answering(km, {}, self.log)
        if target_path:
            await self.kernels.attach_session(target_path, kernel_id)
        outcome = RestoreOutcome(
            record.id,
            kernel_id,
            "new",
            0.0,
            round(restored[-1].seconds, 4),
            round(time.monotonic() - started, 4),
            target_path,
            round(prepared, 4),
        )
        self.log.info(
            "jupyter_ckpt: snapshot %s restored as kernel %s in %.3f s", record.id, kernel_id, outcome.total_seconds
        )
        self.events.snapshot("restored", record.as_kernel(kernel_id))
        return outcome

    async def _undo(self, kernel_id: str, network: ForkNetwork | None, copy: str | None) -> None:
        """Leave nothing of a fork that never came: its kernel (whose shutdown
        closes the namespace), else its namespace, and the notebook copied for it."""
        if kernel_id in self.kernels.ids():
            await self.kernels.shutdown(kernel_id)
        elif network is not None:
            await asyncio.to_thread(network.close)
        if copy:
            await self.kernels.notebooks.delete(copy)

    async def _notebook(self, record: SnapshotRecord, path: str | None, copy_notebook: bool) -> str | None:
        """The notebook a fork is attached to: ``path``, or a new copy of the
        snapshot's notebook as it was then (as it is now for a snapshot stored
        without its notebook)."""
        if not copy_notebook:
            return path or None
        if not record.path:
            raise InvalidRequest(f"snapshot {record.id} belongs to no notebook, so there is none to copy")
        document = await asyncio.to_thread(self.store.notebook, record.id) if record.notebook else None
        return await self.kernels.notebooks.copy(record.path, document)
