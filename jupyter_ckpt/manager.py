"""Snapshots and restores of the kernels of a running server.

Glues the server's kernel manager (which kernel, which processes), the CRIU engine
and the store. Knows nothing of HTTP: handlers.py translates requests into these
calls. Blocking CRIU work runs in worker threads; one operation per kernel at a time.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jupyter_client.session import Session

from . import compat
from .activity import ActivityTracker
from .engine import CriuEngine, LazyPages, move_listeners
from .errors import (
    CheckpointError,
    DumpFailed,
    InvalidRequest,
    KernelNotCheckpointable,
    KernelNotFound,
    NotSupported,
    OperationInProgress,
    RestoreFailed,
    SnapshotIncompatible,
    SnapshotNotRestorable,
)
from .forknet import NETWORK as FORK_NETWORK
from .forknet import ForkNetwork
from .provisioner import CheckpointableProvisioner, ForkPlan, KernelStdio
from .chunks import write_private_atomic
from .store import SnapshotRecord, SnapshotStore, new_snapshot_id, validate_label

TRIGGERS = ("manual", "magic", "auto")
RESTORE_MODES = ("replace", "new")
ZMQ_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class KernelPutBack(RestoreFailed):
    """A restore failed and the kernel's previous state was restored instead."""


@dataclass
class RestoreOutcome:
    snapshot_id: str
    kernel_id: str
    mode: str
    save_previous_seconds: float  # dumping the replaced state, kept until the restore succeeded
    restore_seconds: float  # CRIU's restore of the snapshot
    total_seconds: float  # until the kernel answers again, everything included
    path: str | None = None  # the notebook the kernel is attached to (mode new)
    prepare_seconds: float = 0.0  # reading and verifying the images, checking the files they need
    lazy: bool = False  # the kernel answered before all of its memory was back (it follows in the background)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CheckpointManager:
    def __init__(
        self,
        kernel_manager: Any,
        engine: CriuEngine,
        store: SnapshotStore,
        session_manager: Any = None,
        log: logging.Logger | None = None,
        emit: Callable[..., None] | None = None,
        contents_manager: Any = None,
        fork_outbound: str = "nat",
        lazy_restore: bool = True,
    ):
        self.kernel_manager = kernel_manager
        self.lazy_restore = lazy_restore
        self.contents_manager = contents_manager
        self.fork_outbound = fork_outbound
        self.engine = engine
        self.store = store
        self.session_manager = session_manager
        self.log = log or logging.getLogger(__name__)
        self.activity = ActivityTracker(kernel_manager, self.log)
        self._busy: set[str] = set()  # kernel ids with an operation running
        self._lineage: dict[str, str] = {}  # kernel id -> snapshot it last came from or saved
        self._running: dict[str, SnapshotRecord] = {}  # snapshots being taken, by id
        self._restoring: set[str] = set()  # kernels restored, whose clients are not back yet
        self._tasks: dict[str, asyncio.Task] = {}  # their background tasks
        self._memory_loads: dict[str, asyncio.Task] = {}  # lazily restored kernels, until their memory is back
        self._emit_event = emit

    # -- kernels ------------------------------------------------------------------

    def require_kernel(self, kernel_id: str) -> tuple[Any, CheckpointableProvisioner]:
        try:
            km = self.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            raise KernelNotFound(f"no running kernel with id {kernel_id!r}") from None
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

    async def _notebook_path(self, kernel_id: str) -> str | None:
        if self.session_manager is None:
            return None
        try:
            for session in await self.session_manager.list_sessions():
                if session.get("kernel", {}).get("id") == kernel_id:
                    return session.get("path")
        except Exception:  # a broken session database must not block a snapshot
            self.log.debug("jupyter_ckpt: cannot list sessions", exc_info=True)
        return None

    def is_busy(self, kernel_id: str) -> bool:
        return kernel_id in self._busy

    def _claim(self, kernel_id: str) -> None:
        if kernel_id in self._busy:
            raise OperationInProgress(f"a snapshot or restore of kernel {kernel_id} is already running")
        self._busy.add(kernel_id)

    async def _memory_is_back(self, kernel_id: str) -> None:
        """Wait (seconds at most) while a lazily restored kernel's memory is
        still coming back: CRIU cannot dump it before."""
        loading = self._memory_loads.get(kernel_id)
        if loading is not None:
            await asyncio.shield(loading)

    # -- kernels running across server restarts -------------------------------------

    @property
    def _running_file(self) -> Path:
        return self.store.state / "running-kernels.json"

    def _remember_running(self, kernel_id: str, running: bool) -> None:
        try:
            ids = set(json.loads(self._running_file.read_text()))
        except (OSError, ValueError):
            ids = set()
        ids = ids | {kernel_id} if running else ids - {kernel_id}
        write_private_atomic(self._running_file, json.dumps(sorted(ids)).encode())

    def take_previous_run(self) -> list[str]:
        """Kernels that were running when the previous server stopped (cleared)."""
        try:
            ids = json.loads(self._running_file.read_text())
        except (OSError, ValueError):
            ids = []
        write_private_atomic(self._running_file, b"[]")
        return [k for k in ids if k not in self.kernel_manager.list_kernel_ids()]

    async def resume(self, kernel_ids: list[str]) -> list[str]:
        """Restore each kernel from its latest complete snapshot; returns the
        snapshot ids restored. A kernel without one, or that fails, is logged."""
        restored = []
        for kernel_id in kernel_ids:
            latest = [r for r in self.store.list(kernel_id=kernel_id) if r.restorable]
            if not latest:
                self.log.warning("jupyter_ckpt: kernel %s was running at shutdown but has no snapshot to resume", kernel_id)
                continue
            try:
                await self.restore(latest[0].id)
                restored.append(latest[0].id)
            except CheckpointError as e:
                self.log.warning("jupyter_ckpt: cannot resume kernel %s from %s: %s", kernel_id, latest[0].id, e)
        return restored

    def kernel_action(self, kernel_id: str, action: str) -> None:
        """The server started, restarted or shut down a kernel."""
        if action in ("start", "shutdown"):
            self._remember_running(kernel_id, action == "start")
        if action == "start":
            try:
                self.activity.watch(kernel_id)
            except KeyError:
                pass  # already gone
        elif action == "shutdown":
            self.activity.forget(kernel_id)
            self._lineage.pop(kernel_id, None)
        elif action == "restart":
            self._lineage.pop(kernel_id, None)  # a fresh process: no longer from any snapshot

    def restored_from(self, kernel_id: str) -> str | None:
        try:
            km = self.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            return None
        tree = getattr(km.provisioner, "tree", None)
        return tree.restored_from if tree else None

    # -- snapshot -------------------------------------------------------------------

    async def start_snapshot(self, kernel_id: str, label: str | None = "", trigger: str = "manual") -> SnapshotRecord:
        """Begin a snapshot and return its record (status ``pending``) at once.

        What can be refused up front is (unknown kernel, CRIU missing, another
        operation running); the dump and the storing run in a background task,
        visible through the record's status and the events."""
        label = validate_label(label)
        if trigger not in TRIGGERS:
            raise InvalidRequest(f"trigger must be one of {', '.join(TRIGGERS)}")
        self.engine.require()
        km, prov = self.require_kernel(kernel_id)
        if await prov.poll() is not None:
            raise KernelNotFound(f"kernel {kernel_id} is not running (it exited)")
        self.activity.watch(kernel_id)
        await self._memory_is_back(kernel_id)
        self._claim(kernel_id)
        try:
            assert prov.tree is not None
            record = SnapshotRecord(
                id=new_snapshot_id(),
                kernel_id=kernel_id,
                kernel_name=km.kernel_name,
                path=await self._notebook_path(kernel_id),
                label=label,
                trigger=trigger,
                parent_id=self._parent_for(kernel_id),
                status="pending",
                execution_count=self.activity.get(kernel_id).execution_count,
                criu_version=self.engine.health().version,
                stdio_keys=dict(prov.tree.stdio.keys),
                connection=_connection_info(km),
            )
            images = self.store.create(record)
        except BaseException:
            self._busy.discard(kernel_id)
            raise
        self._running[record.id] = record
        task = asyncio.ensure_future(self._take_snapshot(record, prov.tree.init_pid, images))
        self._tasks[record.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(record.id, None))
        return record

    async def snapshot(self, kernel_id: str, label: str | None = "", trigger: str = "manual") -> SnapshotRecord:
        """Take a snapshot and return once it is stored (or raise DumpFailed)."""
        record = await self.start_snapshot(kernel_id, label, trigger)
        await asyncio.shield(self._tasks.get(record.id) or asyncio.sleep(0))
        record = self.store.get(record.id)
        if record.status != "complete":
            raise DumpFailed(f"snapshot failed, the kernel keeps running: {record.error}")
        return record

    async def _take_snapshot(self, record: SnapshotRecord, pid: int, images: Path) -> None:
        kernel_id = record.kernel_id
        started = time.monotonic()
        try:
            record.status = "dumping"
            self.store.save(record)
            self._emit("started", record)
            try:
                result = await asyncio.to_thread(self.engine.dump, pid, images)
            except Exception as e:
                raise DumpFailed(str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}") from None
            # The kernel runs again: chunking, hashing, compressing and storing
            # happen while it does, not while it is frozen.
            record.memory_bytes = result.memory_bytes
            record.freeze_seconds = round(result.freeze_seconds, 4)
            record.status = "storing"
            self.store.save(record)
            self._emit("storing", record)
            try:
                done = await asyncio.to_thread(self.store.commit, record, started)
            except Exception as e:
                raise DumpFailed(f"storing the snapshot failed: {e}") from None
            self._lineage[kernel_id] = done.id
            # Free the kernel before telling anyone the snapshot is complete.
            self._running.pop(record.id, None)
            self._busy.discard(kernel_id)
            self.log.info(
                "jupyter_ckpt: snapshot %s of kernel %s: %.1f MiB, frozen %.3f s, stored %.1f MiB in %.2f s",
                done.id, kernel_id, done.memory_bytes / 2**20, done.freeze_seconds,
                done.stored_bytes / 2**20, done.total_seconds,
            )
            self._emit("completed", done)
        except (Exception, asyncio.CancelledError) as e:
            reason = str(e) if isinstance(e, DumpFailed) else "the server stopped while taking it"
            self.store.fail(record, reason)
            self.log.warning("jupyter_ckpt: snapshot of kernel %s failed: %s", kernel_id, reason)
            self._emit("failed", record, message=reason)
        finally:
            self._running.pop(record.id, None)
            self._busy.discard(kernel_id)

    def relabel(self, snapshot_id: str, label: str | None) -> SnapshotRecord:
        label = validate_label(label)
        running = self._running.get(snapshot_id)
        if running is not None:
            running.label = label  # the background task saves it with the rest
            return running
        record = self.store.get(snapshot_id)
        record.label = label
        self.store.save(record)
        return record

    def delete(self, snapshot_id: str) -> None:
        if snapshot_id in self._running:
            raise OperationInProgress(f"snapshot {snapshot_id} is still being taken")
        record = self.store.get(snapshot_id)
        self.store.delete(snapshot_id)
        self._emit("deleted", record)

    def get(self, snapshot_id: str) -> SnapshotRecord:
        return self._running.get(snapshot_id) or self.store.get(snapshot_id)

    def _parent_for(self, kernel_id: str) -> str | None:
        if kernel_id in self._lineage:
            return self._lineage[kernel_id]
        previous = [r for r in self.store.list(kernel_id=kernel_id) if r.restorable]
        return previous[0].id if previous else None

    # -- restore --------------------------------------------------------------------

    async def restore(
        self,
        snapshot_id: str,
        kernel_id: str | None = None,
        mode: str = "replace",
        path: str | None = None,
        copy_notebook: bool = False,
    ) -> RestoreOutcome:
        """Restore a snapshot.

        ``replace``: the kernel's processes are replaced, its id stays. A failed
        restore brings the kernel back as it was just before: its current state
        is dumped first and restored again if the snapshot fails.

        ``new``: the snapshot becomes a new kernel (a fork) beside the running
        one, attached to the notebook ``path``, or to a copy of the snapshot's
        notebook with ``copy_notebook``.
        """
        if mode not in RESTORE_MODES:
            raise InvalidRequest("mode must be 'replace' or 'new'")
        record = self.store.get(snapshot_id)
        if not record.restorable:
            why = f": {record.error}" if record.error else ""
            raise SnapshotNotRestorable(f"snapshot {snapshot_id} is {record.status}{why}")
        self.engine.require()
        if mode == "new":
            if kernel_id:
                raise InvalidRequest("a restore as a new kernel gets a new kernel id: do not give one")
            return await self.fork(record, path=path, copy_notebook=copy_notebook)
        if path or copy_notebook:
            raise InvalidRequest("'path' and 'copy' go with mode 'new'")
        kernel_id = kernel_id or record.kernel_id
        gone = kernel_id == record.kernel_id and kernel_id not in self.kernel_manager.list_kernel_ids()
        if gone and _is_fork(record):
            # Its namespace went with it: bring it back as a fork, under its own id.
            return await self.fork(record, path=record.path, kernel_id=kernel_id)
        if gone:
            await self._start_again(record)  # e.g. after a server restart
        try:
            return await self._restore_into(record, kernel_id, gone)
        except BaseException:
            if gone:  # a fresh kernel nobody asked for: do not leave it behind
                await self.kernel_manager.shutdown_kernel(kernel_id, now=True)
            raise

    async def fork(
        self, record: SnapshotRecord, path: str | None = None, copy_notebook: bool = False, kernel_id: str | None = None
    ) -> RestoreOutcome:
        """Restore a snapshot as a new kernel, in a network namespace of its own.

        The original kernel, if it runs, is not touched: the fork's listeners
        (its ZMQ ports, and any the user's code opened) live in the fork's
        namespace, so they never collide with the original's. The same snapshot
        can be forked any number of times, at once.
        """
        if not record.connection:
            raise SnapshotNotRestorable(f"snapshot {record.id} has no connection details to restore it as a new kernel")
        kernel_id = kernel_id or str(uuid.uuid4())
        target_path = await self._fork_notebook(record, path, copy_notebook)
        self._claim(kernel_id)
        started = time.monotonic()
        network: ForkNetwork | None = None
        restore_seconds = 0.0
        try:
            with self.store.scratch_dir("fork-") as work:
                images = await self._verified_images(record, work)
                prepared = time.monotonic() - started
                network = await asyncio.to_thread(ForkNetwork.create, self.fork_outbound)
                here = {**record.connection, "ip": network.kernel_address}
                await asyncio.to_thread(move_listeners, images, _listener_moves(record.connection, here))

                def restore() -> tuple[int, KernelStdio]:
                    nonlocal restore_seconds
                    assert network is not None
                    pid, stdio, restore_seconds, _ = self._restore_tree(images, work, record.stdio_keys, network.path)
                    return pid, stdio

                CheckpointableProvisioner.forking[kernel_id] = ForkPlan(record.id, record.connection, network, restore)
                try:
                    await self.kernel_manager.start_kernel(
                        kernel_id=kernel_id, kernel_name=record.kernel_name, path=_folder_of(target_path)
                    )
                finally:
                    CheckpointableProvisioner.forking.pop(kernel_id, None)
        except BaseException as e:
            if kernel_id in self.kernel_manager.list_kernel_ids():
                await self.kernel_manager.shutdown_kernel(kernel_id, now=True)  # closes the namespace too
            elif network is not None:
                await asyncio.to_thread(network.close)
            if copy_notebook and target_path:
                await _maybe_await(self.contents_manager.delete(target_path))  # a copy for a fork that never came
            self._busy.discard(kernel_id)
            if isinstance(e, CheckpointError):
                self._emit("restore_failed", record, message=str(e))
                raise
            if isinstance(e, Exception):
                message = f"restoring snapshot {record.id} as a new kernel failed: {e}"
                self._emit("restore_failed", record, message=message)
                raise RestoreFailed(message) from None
            raise
        km = self.kernel_manager.get_kernel(kernel_id)
        try:
            self._lineage[kernel_id] = record.id
            await self._wait_until_answering(km, kernel_id, {})
        finally:
            self._busy.discard(kernel_id)
        if target_path:
            await self._attach_session(target_path, kernel_id)
        outcome = RestoreOutcome(
            record.id, kernel_id, "new", 0.0, round(restore_seconds, 4), round(time.monotonic() - started, 4),
            target_path, round(prepared, 4),
        )
        self.log.info("jupyter_ckpt: snapshot %s restored as kernel %s in %.3f s", record.id, kernel_id, outcome.total_seconds)
        self._emit("restored", SnapshotRecord(**{**record.to_json(), "kernel_id": kernel_id}))
        return outcome

    async def _fork_notebook(self, record: SnapshotRecord, path: str | None, copy_notebook: bool) -> str | None:
        """The notebook a fork is attached to: ``path``, or a new copy of the snapshot's."""
        if not copy_notebook:
            return path or None
        if not record.path:
            raise InvalidRequest(f"snapshot {record.id} belongs to no notebook, so there is none to copy")
        if self.contents_manager is None:
            raise NotSupported("this server has no contents manager to copy the notebook with")
        try:
            model = await _maybe_await(self.contents_manager.copy(record.path, _folder_of(record.path)))
        except Exception as e:
            raise InvalidRequest(f"cannot copy notebook {record.path}: {e}") from None
        return model["path"]

    async def _verified_images(self, record: SnapshotRecord, work: Path) -> Path:
        """The snapshot's images in ``work``, every byte verified, and every file
        they need checked against this machine."""
        images = work / "images"
        images.mkdir(mode=0o700)
        await asyncio.to_thread(self.store.materialize, record.id, images)
        problems = await asyncio.to_thread(compat.differences, images)
        if problems:
            raise SnapshotIncompatible(record.id, problems)
        return images

    async def _restore_into(self, record: SnapshotRecord, kernel_id: str, started_again: bool) -> RestoreOutcome:
        snapshot_id = record.id
        km, prov = self.require_kernel(kernel_id)
        await self._memory_is_back(kernel_id)
        self._claim(kernel_id)
        work: Path | None = None
        lazy_pages: LazyPages | None = None
        try:
            started = time.monotonic()
            work = self.store.new_scratch_dir("restore-")
            # Every byte is verified before the running kernel is touched.
            images = await self._verified_images(record, work)
            prepared = time.monotonic() - started
            # The snapshot's listeners go where this kernel listens (a
            # fork's namespace address, or another kernel's ports).
            moves = _listener_moves(record.connection, _connection_info(km))
            if moves:
                await asyncio.to_thread(move_listeners, images, moves)
            before = client_connections(km.ip, kernel_ports(km))
            self._restoring.add(kernel_id)
            try:
                with prov.swapping():
                    saved_seconds, seconds, lazy_pages = await asyncio.to_thread(
                        self._replace_processes, prov, record, work
                    )
            except KernelPutBack as e:
                await self._wait_until_answering(km, kernel_id, before)
                self._emit("restore_failed", record, message=str(e))
                raise RestoreFailed(str(e)) from None
            except BaseException as e:
                self._restoring.discard(kernel_id)  # nothing was changed, or the kernel is gone
                if isinstance(e, RestoreFailed):
                    self._emit("restore_failed", record, message=str(e))
                raise
            self._lineage[kernel_id] = snapshot_id
            await self._wait_until_answering(km, kernel_id, before)
        finally:
            if lazy_pages is None:
                if work is not None:
                    shutil.rmtree(work, ignore_errors=True)
                self._busy.discard(kernel_id)
            else:  # the kernel runs; its images and the kernel stay claimed until its memory is back
                assert work is not None
                task = asyncio.create_task(self._memory_back(kernel_id, prov, record, lazy_pages, work, started))
                self._memory_loads[kernel_id] = task
                task.add_done_callback(lambda _: self._memory_loads.pop(kernel_id, None))
        outcome = RestoreOutcome(
            snapshot_id, kernel_id, "replace", round(saved_seconds, 4), round(seconds, 4),
            round(time.monotonic() - started, 4), prepare_seconds=round(prepared, 4), lazy=lazy_pages is not None,
        )
        if started_again and record.path:
            await self._attach_session(record.path, kernel_id)  # only now: clients see the restored kernel only
        self.log.info("jupyter_ckpt: kernel %s restored from %s in %.3f s", kernel_id, snapshot_id, outcome.total_seconds)
        self._emit("restored", SnapshotRecord(**{**record.to_json(), "kernel_id": kernel_id}))
        return outcome

    async def _memory_back(
        self,
        kernel_id: str,
        prov: CheckpointableProvisioner,
        record: SnapshotRecord,
        lazy_pages: LazyPages,
        work: Path,
        started: float,
    ) -> None:
        """Wait until a lazily restored kernel has all of its memory back, then
        release its images and the kernel (no snapshot of it until then)."""
        try:
            await asyncio.to_thread(lazy_pages.wait)
            self.log.info("jupyter_ckpt: kernel %s has all its memory back, %.3f s after the restore began",
                          kernel_id, time.monotonic() - started)
        except RestoreFailed as e:
            # Memory that never came back must not be read: stop the kernel.
            if prov.tree is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(prov.tree.init_pid, signal.SIGKILL)
            message = f"{e}. The kernel was stopped; restart it, or restore a snapshot again."
            self.log.error("jupyter_ckpt: kernel %s: %s", kernel_id, message)
            self._emit("restore_failed", SnapshotRecord(**{**record.to_json(), "kernel_id": kernel_id}), message=message)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            self._busy.discard(kernel_id)

    def _replace_processes(
        self, prov: CheckpointableProvisioner, record: SnapshotRecord, work: Path
    ) -> tuple[float, float, LazyPages | None]:
        """Blocking: runs in a worker thread while the provisioner reports 'alive'.
        ``work`` holds the snapshot's verified images in ``images/``; CRIU's logs
        and the replaced state go there too. Returns the seconds saving the
        current state and restoring took, and, for a lazy restore, what brings
        the rest of the memory back."""
        assert prov.tree is not None
        current = prov.tree
        rollback = work / "previous-state"
        rollback.mkdir(mode=0o700)
        started = time.monotonic()
        try:
            self.engine.dump(current.init_pid, rollback)
        except DumpFailed as e:
            raise RestoreFailed(f"nothing was changed: the kernel's current state could not be saved first ({e})") from None
        saved_seconds = time.monotonic() - started
        # SIGKILL to pid 1 of the kernel's namespace ends every process in it.
        os.kill(current.init_pid, signal.SIGKILL)
        prov.reap_old()
        netns = current.network.path if current.network else None
        lazy = self.lazy_restore and self.engine.health().lazy_pages
        try:
            pid, stdio, seconds, lazy_pages = self._restore_tree(work / "images", work, record.stdio_keys, netns, lazy)
        except RestoreFailed as failure:
            try:
                pid, stdio, _, _ = self._restore_tree(rollback, work, current.stdio.keys, netns)
            except RestoreFailed as second:
                raise RestoreFailed(
                    f"restoring snapshot {record.id} failed ({failure}), and so did bringing back the "
                    f"kernel's previous state ({second}): the kernel has stopped"
                ) from None
            prov.adopt(pid, stdio, current.restored_from, current.network)
            raise KernelPutBack(
                f"restoring snapshot {record.id} failed: {failure}. The kernel was put back as it was before."
            ) from None
        prov.adopt(pid, stdio, record.id, current.network)
        return saved_seconds, seconds, lazy_pages

    async def _wait_until_answering(self, km: Any, kernel_id: str, before: dict[int, int], timeout: float = 10.0) -> None:
        """Return once the restored kernel's clients are connected again, and
        (unless it is busy running a cell) it answers on shell and IOPub.

        The clients (the notebook's sockets, through the server) reconnect
        within ZMQ's retry interval. What the kernel sends before they are back
        is lost: a reply, output, the 'idle' status that ends a busy indicator.
        A kernel restored inside ``checkpoint()`` waits for this too (see
        ``settled``) before it goes on.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ports = list(before)
        try:
            while loop.time() < deadline:
                now = client_connections(km.ip, ports)
                if all(now[p] >= before[p] for p in ports):
                    break
                await asyncio.sleep(0.02)
            else:
                self.log.warning("jupyter_ckpt: not every client of kernel %s reconnected within %.0f s", kernel_id, timeout)
            await asyncio.sleep(0.05)  # their SUBSCRIBE and identity, sent right after connecting
        finally:
            self._restoring.discard(kernel_id)
        # A fresh subscriber seeing an answer also tells that IOPub publishes
        # again. A session of its own: km.client() would share the kernel
        # manager's ZMQ identity with other clients and take over their route.
        client = km.client(session=Session(config=km.session.config, key=km.session.key))
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        probe_end = loop.time() + 2.0
        try:
            while loop.time() < probe_end:
                # Not kernel_info: IPython's banner draws a random "tip" from the
                # user's global `random`, which would change the restored state.
                msg_id = client.comm_info()
                round_end = min(probe_end, loop.time() + 0.2)
                while loop.time() < round_end:
                    try:
                        msg = await client.get_iopub_msg(timeout=max(0.01, round_end - loop.time()))
                    except Exception:  # queue.Empty: this round's request went unseen
                        break
                    if msg.get("parent_header", {}).get("msg_id") == msg_id:
                        return
            # Busy running the cell it was restored in: it will answer after.
        finally:
            client.stop_channels()

    async def _start_again(self, record: SnapshotRecord) -> None:
        """Start a kernel with the snapshot's kernel id, ports and key (and its
        notebook's session), to restore the snapshot into: its kernel is gone."""
        if not record.connection:
            raise KernelNotFound(f"kernel {record.kernel_id} is gone, and snapshot {record.id} cannot start it again")
        self._claim(record.kernel_id)
        CheckpointableProvisioner.recovering[record.kernel_id] = record.connection
        try:
            await self.kernel_manager.start_kernel(
                kernel_id=record.kernel_id, kernel_name=record.kernel_name, path=_folder_of(record.path)
            )
        except Exception as e:
            raise RestoreFailed(f"cannot start kernel {record.kernel_id} again to restore into: {e}") from None
        finally:
            CheckpointableProvisioner.recovering.pop(record.kernel_id, None)
            self._busy.discard(record.kernel_id)
        self.log.info("jupyter_ckpt: kernel %s started again for %s", record.kernel_id, record.path or "no notebook")

    async def _attach_session(self, path: str, kernel_id: str) -> None:
        """Make ``kernel_id`` the kernel of notebook ``path``."""
        if self.session_manager is None:
            return
        for session in await self.session_manager.list_sessions():
            if session.get("path") == path:
                await self.session_manager.update_session(session["id"], kernel_id=kernel_id)
                return
        name = path.rsplit("/", 1)[-1]
        await self.session_manager.create_session(path=path, name=name, type="notebook", kernel_id=kernel_id)

    def settled(self, kernel_id: str) -> bool:
        """False while a restore of the kernel waits for its clients to reconnect."""
        return kernel_id not in self._restoring

    def _restore_tree(
        self, images: Path, work: Path, stdio_keys: dict[str, str], netns: Path | None = None, lazy: bool = False
    ) -> tuple[int, KernelStdio, float, LazyPages | None]:
        stdio = KernelStdio()
        try:
            inherit = {key: stdio.write_fds[name] for name, key in stdio_keys.items() if name in stdio.write_fds}
            with stdio.inheritable():
                result = self.engine.restore(images, work_dir=work, inherit_fds=inherit, netns=netns, lazy=lazy)
        finally:
            stdio.close_write_ends()
        return result.pid, stdio, result.seconds, result.lazy_pages

    def emit_plain(self, data: dict[str, Any]) -> None:
        """Publish an event (schema snapshot/v1)."""
        if self._emit_event is not None:
            try:
                self._emit_event(data)
            except Exception:  # events inform; they must never break an operation
                self.log.debug("jupyter_ckpt: event not emitted", exc_info=True)

    def _emit(self, action: str, record: SnapshotRecord, message: str | None = None) -> None:
        """Publish an event about one snapshot."""
        data: dict[str, Any] = {"action": action, "snapshot_id": record.id, "kernel_id": record.kernel_id, "status": record.status}
        for name in ("memory_bytes", "stored_bytes", "freeze_seconds"):
            if getattr(record, name):
                data[name] = getattr(record, name)
        if message or record.error:
            data["message"] = message or record.error
        self.emit_plain(data)

    async def stop(self) -> None:
        """Stop background snapshots (they are recorded failed) and release resources."""
        if self._memory_loads:  # not cancelled: a kernel's memory is never left half back
            await asyncio.gather(*self._memory_loads.values(), return_exceptions=True)
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self.close()

    def close(self) -> None:
        self.activity.close()
        self.store.close()


def _connection_info(km: Any) -> dict[str, Any]:
    info = dict(km.get_connection_info(session=False))
    key = info.get("key", b"")
    info["key"] = key.decode() if isinstance(key, bytes) else key
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}


def _listener_moves(snapshot: dict[str, Any], here: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """For engine.move_listeners: each ZMQ listener of the snapshot's kernel
    whose address or port differs from where the kernel restored now listens."""
    return {
        snapshot[p]: (here["ip"], here[p])
        for p in ZMQ_PORTS
        if snapshot.get(p) and (snapshot[p], snapshot.get("ip")) != (here[p], here["ip"])
    }


def _folder_of(path: str | None) -> str:
    """The folder of a notebook's API path ('' for the root)."""
    return path.rsplit("/", 1)[0] if path and "/" in path else ""


def client_connections(address: str, ports: list[int]) -> dict[int, int]:
    """Established TCP connections to each port of ``address`` (IPv4), counted
    from the clients' side, in this process's network namespace."""
    counts = dict.fromkeys(ports, 0)
    try:
        wanted = ipaddress.IPv4Address(address).packed[::-1].hex().upper()
    except ValueError:
        return counts
    for table in ("/proc/net/tcp",):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "01":
                        addr, port_hex = cols[2].split(":")
                        port = int(port_hex, 16)
                        if addr == wanted and port in counts:
                            counts[port] += 1
        except (OSError, StopIteration):
            pass
    return counts


def kernel_ports(km: Any) -> list[int]:
    if getattr(km, "transport", "tcp") != "tcp":
        return []
    return [p for p in (km.shell_port, km.iopub_port, km.stdin_port, km.control_port) if p]


def _is_fork(record: SnapshotRecord) -> bool:
    """Was the snapshot taken of a kernel living in a fork's namespace?"""
    try:
        return ipaddress.IPv4Address(record.connection.get("ip", "127.0.0.1")) in FORK_NETWORK
    except ValueError:
        return False


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
