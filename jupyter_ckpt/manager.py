"""The one facade over snapshots and restores: what handlers, the scheduler and
the CLI call. Knows nothing of HTTP.

It wires the flows (snapshots.py, restore.py, fork.py) to the engine, the
store and the server's kernels, and runs every call that reads or writes the
store in a worker thread, so the event loop never waits on a disk or S3.
Without a kernel manager (the CLI) only the store-level calls work.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from . import bundle
from .activity import ActivityTracker, KernelActivity
from .claims import KernelClaims
from .engine import CriuEngine
from .errors import (
    CheckpointError,
    InvalidRequest,
    KernelNotCheckpointable,
    OperationInProgress,
    SnapshotNotRestorable,
)
from .events import SnapshotEvents
from .flow import FlowParts
from .fork import Fork
from .forknet import in_fork_network
from .hibernation import Hibernation, tree_memory_bytes
from .kernels import ServerKernels, connection_info
from .provisioner import ZMQ_PORTS, CheckpointableProvisioner
from .records import SnapshotRecord
from .recovery import OperationJournal, PreviousRun, RunningKernels, start_time
from .restore import RestoreInPlace, RestoreOutcome
from .snapshots import SnapshotFlow
from .store import SnapshotStore

RESTORE_MODES = ("replace", "new")


class CheckpointManager:
    def __init__(
        self,
        kernel_manager: Any,
        engine: CriuEngine,
        store: SnapshotStore,
        session_manager: Any = None,
        log: logging.Logger | None = None,
        emit: Callable[[dict[str, Any]], None] | None = None,
        contents_manager: Any = None,
        fork_outbound: str = "nat",
        lazy_restore: bool = True,
        incremental_snapshots: bool = True,
        max_import_bytes: int = bundle.DEFAULT_MAX_IMPORT_BYTES,
        live_documents: Callable[[], Any] | None = None,
    ):
        self.engine = engine
        self.max_import_bytes = max_import_bytes
        self.store = store
        self.lazy_restore = lazy_restore
        self.log = log or logging.getLogger(__name__)
        self.kernels = ServerKernels(kernel_manager, session_manager, contents_manager, self.log, live_documents)
        self.activity = ActivityTracker(kernel_manager, self.log)
        self.claims = KernelClaims()
        self.events = SnapshotEvents(emit, self.log)
        self.running_kernels = RunningKernels(store.state / "running-kernels.json")
        self.journal = OperationJournal(store.state / "operations")
        self.mender = PreviousRun(engine, store)
        self.previous_run: list[dict[str, Any]] | None = None  # what mend_previous_run found, once done
        self._gc_task: asyncio.Task | None = None
        self._gc_wanted = False
        parts = FlowParts(self.kernels, engine, store, self.claims, self.events, self.journal, self.log)
        self.snapshots = SnapshotFlow(parts, self.activity, incremental=incremental_snapshots)
        self.in_place = RestoreInPlace(parts, lazy_restore=lazy_restore)
        self.forks = Fork(parts, outbound=fork_outbound)
        hibernated = RunningKernels(store.state / "hibernated-kernels.json")
        self.hibernation = Hibernation(parts, self.snapshots, self.in_place, hibernated, fork_outbound)
        self.hibernation.after_wake = self.track
        self.stopping = False  # the server is stopping: its shutdowns keep hibernated kernels listed

    # -- the server and its kernels ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        health = self.engine.health()
        return {
            "previous_run": self.previous_run,
            "criu": {"available": health.available, "version": health.version, "reason": health.reason},
            "store": {"backend": self.store.backend},
            # What the next snapshots use to save only the pages written since the last.
            "dirty_tracking": health.dirty_tracking if self.snapshots.incremental else "off",
            "features": {
                "snapshot": health.available,
                "restore_replace": health.available,
                "restore_new": health.available,
                "lazy_restore": health.available and health.lazy_pages and self.lazy_restore,
            },
        }

    def kernel_ids(self) -> list[str]:
        return self.kernels.ids()

    def require_kernel(self, kernel_id: str) -> tuple[Any, CheckpointableProvisioner]:
        return self.kernels.require(kernel_id)

    async def kernel_info(self, kernel_id: str) -> dict[str, Any]:
        """Can the kernel be snapshotted (and why not), is an operation on it
        running, which snapshot it was restored from."""
        try:
            self.kernels.require(kernel_id)
            checkpointable, reason = True, ""
        except KernelNotCheckpointable as e:
            checkpointable, reason = False, str(e)
        hibernated = self.hibernation.snapshot_of(kernel_id)
        _, prov = self.kernels.require(kernel_id) if checkpointable else (None, None)
        pid = prov.tree.init_pid if prov and prov.tree and not hibernated else 0
        return {
            "id": kernel_id,
            "checkpointable": checkpointable,
            "reason": reason,
            "busy": self.is_busy(kernel_id),
            "restored_from": self.restored_from(kernel_id),
            "hibernated": hibernated is not None,
            "hibernated_snapshot": hibernated,
            "memory_bytes": await asyncio.to_thread(tree_memory_bytes, pid) if pid > 0 else 0,
        }

    def activity_of(self, kernel_id: str) -> KernelActivity:
        return self.activity.get(kernel_id)

    def is_busy(self, kernel_id: str) -> bool:
        return self.claims.is_held(kernel_id)

    def settled(self, kernel_id: str) -> bool:
        return self.claims.settled(kernel_id)

    def restored_from(self, kernel_id: str) -> str | None:
        return self.kernels.restored_from(kernel_id)

    async def kernel_action(self, kernel_id: str, action: str) -> None:
        """The server started, restarted or shut down a kernel."""
        if action in ("start", "restart"):
            await self.track(kernel_id)
        elif action == "shutdown":
            self.running_kernels.mark(kernel_id, None)
        if action in ("shutdown", "restart") and not self.stopping:
            self.hibernation.forget(kernel_id)
        if action == "start":
            try:
                self.activity.watch(kernel_id)
            except KeyError:
                pass  # already gone
        elif action in ("shutdown", "restart"):
            self.claims.forget(kernel_id)  # a fresh process, or none: from no snapshot
            if action == "shutdown":
                self.activity.forget(kernel_id)

    async def track(self, kernel_id: str) -> None:
        """Remember a kernel's processes, for the next start if this server dies."""
        try:
            km, prov = self.kernels.require(kernel_id)
        except CheckpointError:
            return
        assert prov.tree is not None
        if prov.hibernated:  # no process: hibernation.py keeps it listed
            await asyncio.to_thread(self.running_kernels.mark, kernel_id, None)
            return
        pid = prov.tree.init_pid
        info = {
            "pid": pid,
            "started": start_time(pid),
            "kernel_name": km.kernel_name,
            "path": await self.kernels.notebook_path(kernel_id),
            "connection": connection_info(km),
        }
        await asyncio.to_thread(self.running_kernels.mark, kernel_id, info)

    def publish(self, data: dict[str, Any]) -> None:
        self.events.publish(data)

    # -- snapshots --------------------------------------------------------------------

    async def start_snapshot(
        self, kernel_id: str, label: str | None = "", trigger: str = "manual", notebook: Any = None
    ) -> SnapshotRecord:
        return await self.snapshots.start(kernel_id, label, trigger, notebook)

    async def snapshot(
        self, kernel_id: str, label: str | None = "", trigger: str = "manual", notebook: Any = None
    ) -> SnapshotRecord:
        """Take a snapshot and return once it is stored (or raise DumpFailed)."""
        return await self.snapshots.wait(await self.snapshots.start(kernel_id, label, trigger, notebook))

    async def notebook(self, snapshot_id: str) -> bytes:
        """The notebook document stored with a snapshot (nbformat JSON)."""
        return await asyncio.to_thread(self.store.notebook, snapshot_id)

    async def get(self, snapshot_id: str) -> SnapshotRecord:
        return await self.snapshots.get(snapshot_id)

    async def list_snapshots(self, kernel_id: str | None = None, path: str | None = None) -> list[SnapshotRecord]:
        return await asyncio.to_thread(self.store.list, kernel_id, path)

    async def relabel(self, snapshot_id: str, label: str | None) -> SnapshotRecord:
        return await self.snapshots.relabel(snapshot_id, label)

    async def delete(self, snapshot_id: str) -> None:
        sleeper = await asyncio.to_thread(self.hibernation.sleeper_on, snapshot_id)
        if sleeper is not None:
            raise OperationInProgress(
                f"snapshot {snapshot_id} holds hibernated kernel {sleeper}: wake it (or shut it down) first"
            )
        await self.snapshots.delete(snapshot_id)
        self.collect_garbage_soon()

    async def prune(
        self, kernel_id: str | None = None, path: str | None = None, keep_auto: int = 10, byte_budget: int | None = None
    ) -> list[str]:
        pruned = await asyncio.to_thread(self.store.prune, kernel_id, path, keep_auto, byte_budget)
        if pruned:
            self.collect_garbage_soon()
        return pruned

    def collect_garbage_soon(self) -> None:
        """Reclaim deleted snapshots' chunks in the background (on disk and in
        the chunk index), on a server's local store: gc must not run while
        another server stores into the same store, which a shared remote
        store allows (there, `jupyter ckpt gc` when none does)."""
        if self.kernels.kernel_manager is None or self.store.backend != "local":
            return
        self._gc_wanted = True
        if self._gc_task is None or self._gc_task.done():
            self._gc_task = asyncio.ensure_future(self._collect_garbage())

    def _gc_and_trim(self) -> tuple[int, int]:
        result = self.store.gc()
        # Copying live chunks takes frames in and out of memory; glibc keeps
        # what was freed in its heap unless asked to give it back.
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc
        return result

    async def _collect_garbage(self) -> None:
        while self._gc_wanted:
            self._gc_wanted = False
            try:
                deleted, freed = await asyncio.to_thread(self._gc_and_trim)
            except Exception:  # a full disk, a store closing: the next delete tries again
                self.log.warning("jupyter_ckpt: collecting deleted snapshots' chunks failed", exc_info=True)
                return
            if deleted:
                self.log.info("jupyter_ckpt: reclaimed %d objects, %.1f MiB", deleted, freed / 2**20)

    async def gc(self) -> tuple[int, int]:
        return await asyncio.to_thread(self.store.gc)

    # -- bundles ----------------------------------------------------------------------

    async def export_bundle(self, snapshot_id: str, out: BinaryIO) -> int:
        record = await self.get(snapshot_id)
        if not record.restorable:
            raise SnapshotNotRestorable(f"snapshot {snapshot_id} is {record.status}")
        return await asyncio.to_thread(bundle.export_bundle, self.store, snapshot_id, out)

    async def require_room(self) -> None:
        """QuotaExceeded if the store holds its quota already."""
        await asyncio.to_thread(self.store.require_room)

    async def import_bundle(self, src: BinaryIO, trust: bool = False) -> SnapshotRecord:
        running = set(self.kernels.ids())
        await self.require_room()
        return await asyncio.to_thread(bundle.import_bundle, self.store, src, trust, self.max_import_bytes, running)

    @contextmanager
    def scratch_dir(self, prefix: str) -> Iterator[Path]:
        """A private local directory for an upload or a download, removed afterwards."""
        with self.store.scratch_dir(prefix) as d:
            yield d

    # -- restore ----------------------------------------------------------------------

    async def restore(
        self,
        snapshot_id: str,
        kernel_id: str | None = None,
        mode: str = "replace",
        path: str | None = None,
        copy_notebook: bool = False,
        notebook: bool = False,
    ) -> RestoreOutcome:
        """Restore a snapshot.

        ``replace``: the kernel's processes are replaced, its id stays. A failed
        restore brings the kernel back as it was just before. With ``notebook``,
        the snapshot's notebook document replaces the kernel's notebook file
        too (its current content kept as the file's checkpoint).

        ``new``: the snapshot becomes a new kernel (a fork) beside the running
        one, attached to the notebook ``path``, or to a copy of the snapshot's
        notebook with ``copy_notebook``.
        """
        if mode not in RESTORE_MODES:
            raise InvalidRequest("mode must be 'replace' or 'new'")
        if kernel_id is not None and not isinstance(kernel_id, str):
            raise InvalidRequest("kernel_id must be a string")
        if path is not None and not isinstance(path, str):
            raise InvalidRequest("path must be a string (a notebook's path)")
        record = await asyncio.to_thread(self.store.get, snapshot_id)
        if not record.restorable:
            why = f": {record.error}" if record.error else ""
            raise SnapshotNotRestorable(f"snapshot {snapshot_id} is {record.status}{why}")
        self.engine.require()
        if mode == "new" and kernel_id:
            raise InvalidRequest("a restore as a new kernel gets a new kernel id: do not give one")
        if mode == "replace" and (path or copy_notebook):
            raise InvalidRequest("'path' and 'copy' go with mode 'new'")
        if not isinstance(notebook, bool) or (notebook and mode != "replace"):
            raise InvalidRequest(
                "'notebook' is true or false, and goes with mode 'replace' (a fork copies it with 'copy')"
            )
        if notebook and not record.notebook:
            raise InvalidRequest(f"snapshot {snapshot_id} holds no notebook to restore")
        if mode == "replace" and kernel_id and kernel_id != record.kernel_id:
            # Its processes keep the message key of the kernel they were: no
            # client of another kernel could talk to them.
            raise InvalidRequest(
                f"snapshot {snapshot_id} was taken from kernel {record.kernel_id}: it restores in place only into "
                "that kernel (started again if it is gone); to run it beside another, restore it as a new kernel "
                "(mode 'new', with 'path' to attach it to a notebook)"
            )
        # The document is read (and verified) before the kernel is touched.
        document = await self.notebook(snapshot_id) if notebook else None
        outcome = await self._restore(record, kernel_id, mode, path, copy_notebook)
        await self.track(outcome.kernel_id)  # its processes are new
        if document is not None:
            await self._put_notebook_back(record, outcome, document)
        return outcome

    async def _put_notebook_back(self, record: SnapshotRecord, outcome: RestoreOutcome, document: bytes) -> None:
        """After the kernel: the kernel's notebook (where it is now) becomes the snapshot's."""
        target = await self.kernels.notebook_path(outcome.kernel_id) or record.path
        try:
            if not target:
                raise InvalidRequest("it has no notebook to put the document in")
            await self.kernels.notebooks.put_back(target, document)
        except CheckpointError as e:
            raise InvalidRequest(f"kernel {outcome.kernel_id} was restored, but not its notebook: {e}") from None
        outcome.path, outcome.notebook = target, True
        self.events.publish(
            {
                "action": "notebook_restored",
                "snapshot_id": record.id,
                "kernel_id": outcome.kernel_id,
                "path": target,
                "message": f"{target} is back as it was in snapshot {record.id}; its previous content is "
                "the file's checkpoint (File > Revert Notebook to Checkpoint)",
            }
        )

    async def _restore(
        self, record: SnapshotRecord, kernel_id: str | None, mode: str, path: str | None, copy_notebook: bool
    ) -> RestoreOutcome:
        if mode == "new":
            return await self.forks.fork(record, path=path, copy_notebook=copy_notebook)
        kernel_id = kernel_id or record.kernel_id
        if self.hibernation.snapshot_of(kernel_id) is not None:  # on disk: nothing to save first
            return await self.hibernation.restore_into(kernel_id, record)
        gone = kernel_id == record.kernel_id and kernel_id not in self.kernels.ids()
        if gone and (in_fork_network(record.connection) or ports_in_use(record.connection)):
            # A fork's namespace went with it; or another server's kernel (the
            # original, on this machine) holds the snapshot's ports: bring it
            # back in a network namespace of its own, under its own id.
            outcome = await self.forks.fork(record, path=record.path, kernel_id=kernel_id)
            outcome.mode = "replace"  # what was asked: the kernel is back under its id
            return outcome
        if gone:
            await self.in_place.start_again(record)  # e.g. after a server restart
        try:
            return await self.in_place.restore(record, kernel_id, gone)
        except BaseException:
            if gone:  # a fresh kernel nobody asked for: do not leave it behind
                await self.kernels.shutdown(kernel_id)
            raise

    # -- across server restarts -------------------------------------------------------

    async def mend_previous_run(self) -> list[str]:
        """After a server that stopped without warning: save each of its kernels
        still running (orphaned) as a snapshot, then stop it; turn the state
        saved by a restore that was cut short into a snapshot; end forks cut
        short. Returns the kernels of the previous run not running here; what
        happened to each is in ``previous_run`` (the status API shows it)."""
        previous = await asyncio.to_thread(self.running_kernels.take)
        unfinished = await asyncio.to_thread(self.journal.take)
        saved: dict[str, str] = {}
        report: list[dict[str, Any]] = []
        for kernel_id, info in previous.items():
            if kernel_id in self.kernels.ids():
                continue
            outcome = await asyncio.to_thread(self.mender.save_orphan, kernel_id, info)
            if outcome.get("snapshot_id"):
                saved[kernel_id] = outcome["snapshot_id"]
            report.append(outcome)
        for entry in unfinished:
            outcome = await asyncio.to_thread(self.mender.mend_operation, entry, saved)
            if outcome is not None:
                report.append(outcome)
        await asyncio.to_thread(self.store.clear_scratch)
        kept = {r["kernel_id"] for r in report if not r["lost"]}
        self.previous_run = report = [r for r in report if not (r["lost"] and r["kernel_id"] in kept)]
        for outcome in report:
            log = self.log.warning if outcome.get("lost") else self.log.info
            log("jupyter_ckpt: kernel %s of the previous run: %s", outcome["kernel_id"], outcome["message"])
        running = set(self.kernels.ids())
        return [k for k in previous if k not in running]

    async def resume(self, kernel_ids: list[str]) -> list[str]:
        """Restore each kernel from its latest complete snapshot; returns the
        snapshot ids restored. A kernel without one, or that fails, is logged."""
        restored = []
        for kernel_id in kernel_ids:
            latest = [r for r in await self.list_snapshots(kernel_id=kernel_id) if r.restorable]
            if not latest:
                self.log.warning(
                    "jupyter_ckpt: kernel %s was running at shutdown but has no snapshot to resume", kernel_id
                )
                continue
            try:
                await self.restore(latest[0].id)
                restored.append(latest[0].id)
            except CheckpointError as e:
                self.log.warning("jupyter_ckpt: cannot resume kernel %s from %s: %s", kernel_id, latest[0].id, e)
        return restored

    # -- hibernation ------------------------------------------------------------------

    async def hibernate(self, kernel_id: str) -> dict[str, Any]:
        return await self.hibernation.hibernate(kernel_id)

    async def wake(self, kernel_id: str) -> RestoreOutcome:
        return await self.hibernation.wake(kernel_id)

    def is_hibernated(self, kernel_id: str) -> bool:
        return self.hibernation.snapshot_of(kernel_id) is not None

    async def stop(self) -> None:
        """Stop background snapshots (they are recorded failed) and release resources."""
        self.stopping = True
        await self.snapshots.stop()  # a snapshot stored meanwhile may start keeping its images
        await self.claims.holding_tasks_done()  # a kernel's memory is never left half back
        if self._gc_task is not None:
            self._gc_wanted = False
            await asyncio.gather(self._gc_task, return_exceptions=True)
        self.close()

    def close(self) -> None:
        self.activity.close()
        self.store.close()


def ports_in_use(connection: dict[str, Any]) -> bool:
    """Is any of a snapshot's ZMQ ports taken on this host (in this namespace)?"""
    if connection.get("transport", "tcp") != "tcp":
        return False
    for name in ZMQ_PORTS:
        port = connection.get(name)
        if not isinstance(port, int) or not port:
            continue
        with socket.socket() as probe:
            # As ZMQ binds: a port left in TIME-WAIT by a kernel gone is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((connection.get("ip", "127.0.0.1"), port))
            except OSError:
                return True
    return False
