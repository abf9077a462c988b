"""Taking a snapshot of a running kernel: claimed, dumped (the kernel frozen),
then stored while the kernel runs on. Also relabelling and deleting."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

from .activity import ActivityTracker
from .claims import Claim
from .dirty_tracking import DirtyTracking, IncrementalDump, WholePages, plan_whole, untracked_writer
from .errors import CheckpointError, DumpFailed, InvalidRequest, KernelNotFound, OperationInProgress
from .flow import Flow, FlowParts
from .kernel_tree import KernelTree
from .kernels import connection_info
from .notebooks import document_bytes
from .records import TRIGGERS, SnapshotRecord, new_snapshot_id, validate_label


class SnapshotFlow(Flow):
    def __init__(self, parts: FlowParts, activity: ActivityTracker, incremental: bool = True):
        super().__init__(parts)
        self.activity = activity
        self.incremental = incremental  # dump only what changed since the last snapshot (dirty_tracking.py)
        self.running: dict[str, SnapshotRecord] = {}  # snapshots being taken, by id
        self.tasks: dict[str, asyncio.Task] = {}  # their background tasks

    async def start(
        self, kernel_id: str, label: str | None = "", trigger: str = "manual", notebook: Any = None
    ) -> SnapshotRecord:
        """Begin a snapshot and return its record (status ``pending``) at once.

        What can be refused up front is (unknown kernel, CRIU missing, another
        operation running); the dump and the storing run in a background task,
        visible through the record's status and the events. ``notebook``: the
        document as the browser shows it; without it, the server's (notebooks.py)."""
        label = validate_label(label)
        document = await self._browser_document(kernel_id, notebook)
        if trigger not in TRIGGERS:
            raise InvalidRequest(f"trigger must be one of {', '.join(TRIGGERS)}")
        self.engine.require()
        await asyncio.to_thread(self.store.require_room)
        km, prov = self.kernels.require(kernel_id)
        if prov.hibernated and trigger != "hibernate":
            raise OperationInProgress(
                f"kernel {kernel_id} is hibernated: snapshot {prov.hibernated} holds it (wake it to take another)"
            )
        if await prov.poll() is not None:
            raise KernelNotFound(f"kernel {kernel_id} is not running (it exited)")
        self.activity.watch(kernel_id)
        async with self.claims.hold(kernel_id) as claim:
            assert prov.tree is not None
            record = SnapshotRecord(
                id=new_snapshot_id(),
                kernel_id=kernel_id,
                kernel_name=km.kernel_name,
                path=await self.kernels.notebook_path(kernel_id),
                label=label,
                trigger=trigger,
                parent_id=await self._parent_for(kernel_id),
                status="pending",
                execution_count=self.activity.get(kernel_id).execution_count,
                criu_version=self.engine.health().version,
                stdio_keys=dict(prov.tree.stdio.keys),
                connection=connection_info(km),
            )
            images = await asyncio.to_thread(self.store.create, record)
            self.running[record.id] = record
            task = asyncio.ensure_future(self._take(record, prov.tree, images, claim.hand_over(), document))
        self.tasks[record.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(record.id, None))
        return record

    async def _browser_document(self, kernel_id: str, notebook: Any) -> tuple[str, bytes] | None:
        """The document sent with the request. Not a notebook at all: refused.
        One nbformat does not accept, or too large: the snapshot is taken all
        the same, with the server's copy of the notebook (logged)."""
        if notebook is None:
            return None
        if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
            raise InvalidRequest("notebook must be a notebook document (nbformat 4 JSON, with its cells)")
        try:
            return "browser", await asyncio.to_thread(document_bytes, notebook)
        except InvalidRequest as e:
            self.log.warning("jupyter_ckpt: snapshot of %s: %s; keeping the server's copy instead", kernel_id, e)
            return None

    async def wait(self, record: SnapshotRecord) -> SnapshotRecord:
        """Until the snapshot is stored; DumpFailed if it failed."""
        await asyncio.shield(self.tasks.get(record.id) or asyncio.sleep(0))
        record = await asyncio.to_thread(self.store.get, record.id)
        if record.status != "complete":
            raise DumpFailed(f"snapshot failed, the kernel keeps running: {record.error}")
        return record

    async def _take(
        self, record: SnapshotRecord, tree: KernelTree, images: Path, claim: Claim, document: tuple[str, bytes] | None
    ) -> None:
        kernel_id = record.kernel_id
        started = time.monotonic()
        parent = None
        with claim:
            try:
                if document is None and record.path:
                    document = await self.kernels.notebooks.current(record.path)
                record.status = "dumping"
                await asyncio.to_thread(self.store.save, record)
                self.events.snapshot("started", record)
                tracking, parent, counted_from = await asyncio.to_thread(self._dump_base, kernel_id, tree)
                try:
                    result = await asyncio.to_thread(
                        self.engine.dump,
                        tree.init_pid,
                        images,
                        **({"tracking": tracking, "parent": parent} if tracking else {}),
                    )
                except Exception as e:
                    raise DumpFailed(str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}") from None
                # The kernel runs again: chunking, hashing, compressing and storing
                # happen while it does, not while it is frozen.
                incremental = None
                if parent is not None:
                    plans = await asyncio.to_thread(self._plan_whole, images, parent, tracking)
                    incremental = IncrementalDump(counted_from, parent, plans)  # type: ignore[arg-type]
                record.memory_bytes = result.memory_bytes + result.parent_bytes
                # None for a full dump (also one made instead: CriuEngine.dump)
                record.changed_bytes = result.memory_bytes if result.parent_bytes else None
                record.freeze_seconds = round(result.freeze_seconds, 4)
                if document is not None:
                    await asyncio.to_thread(self.store.stage_notebook, record, document[1])
                    record.notebook = document[0]
                record.status = "storing"
                await asyncio.to_thread(self.store.save, record)
                self.events.snapshot("storing", record)
                try:
                    done = await asyncio.to_thread(self.store.commit, record, started, incremental)
                except Exception as e:
                    raise DumpFailed(f"storing the snapshot failed: {e}") from None
                self.claims.lineage[kernel_id] = done.id
                self.running.pop(record.id, None)
                if self.store.waiting_to_keep(done.id):
                    # Stored; its whole pages files are written now, while the
                    # next snapshot or restore of the kernel waits for them.
                    claim.release_after(asyncio.ensure_future(self._keep_whole(done, tracking, parent)))
                    parent = None  # the task removes the links
                else:
                    if tracking is not None:  # the next dump builds on this one's kept images, if kept
                        await self._count_from_kept(done, tracking)
                    # Free the kernel before telling anyone the snapshot is complete.
                    claim.release()
                self.log.info(
                    "jupyter_ckpt: snapshot %s of kernel %s: %.1f MiB, frozen %.3f s, stored %.1f MiB in %.2f s",
                    done.id,
                    kernel_id,
                    done.memory_bytes / 2**20,
                    done.freeze_seconds,
                    done.stored_bytes / 2**20,
                    done.total_seconds,
                )
                self.events.snapshot("completed", done)
            except (Exception, asyncio.CancelledError) as e:
                reason = str(e) if isinstance(e, DumpFailed) else "the server stopped while taking it"
                await asyncio.to_thread(self.store.fail, record, reason)
                self.log.warning("jupyter_ckpt: snapshot of kernel %s failed: %s", kernel_id, reason)
                self.events.snapshot("failed", record, message=reason)
            finally:
                self.running.pop(record.id, None)
                if parent is not None:
                    _remove_soon(parent)

    async def _keep_whole(self, done: SnapshotRecord, tracking: DirtyTracking | None, parent: Path) -> None:
        """Write a stored incremental snapshot's whole pages files and keep its images."""
        try:
            if not await asyncio.to_thread(self.store.keep_whole, done):
                self.log.warning("jupyter_ckpt: snapshot %s is stored, its images not kept", done.id)
        except Exception as e:  # the snapshot is complete all the same: the next one is a full one
            self.log.warning("jupyter_ckpt: snapshot %s is stored, keeping its images failed: %s", done.id, e)
        finally:
            _remove_soon(parent)
            if tracking is not None:
                await self._count_from_kept(done, tracking)

    async def _count_from_kept(self, done: SnapshotRecord, tracking: DirtyTracking) -> None:
        kept = await asyncio.to_thread(self.store.kept_images.latest, done.kernel_id)
        tracking.counted_from = done.id if kept and kept[0] == done.id else None

    def _dump_base(self, kernel_id: str, tree: KernelTree) -> tuple[DirtyTracking | None, Path | None, str | None]:
        """The tracking to dump with, the images of the dump it counts from
        (links to them) if there are any to build on, and that dump's snapshot
        id (blocking)."""
        if not self.incremental or self.engine.health().dirty_tracking == "none":
            return None, None, None
        why = untracked_writer(tree.init_pid)
        if why is not None:
            tree.dirty.end()
            self.log.info("jupyter_ckpt: full snapshot of %s: its memory can change unseen (%s)", kernel_id, why)
            return None, None, None
        counted_from = tree.dirty.counted_from
        parent = self.store.link_kept(kernel_id, counted_from) if counted_from else None
        return tree.dirty, parent, counted_from

    @staticmethod
    def _plan_whole(images: Path, parent: Path, tracking: DirtyTracking) -> list[WholePages]:
        try:
            return plan_whole(images, parent)
        except Exception as e:  # ParentMismatch, OSError, a pagemap that cannot be read
            tracking.end()  # the next dump is a full one
            raise DumpFailed(f"the unchanged memory could not be taken from the previous snapshot: {e}") from None

    async def _parent_for(self, kernel_id: str) -> str | None:
        if kernel_id in self.claims.lineage:
            return self.claims.lineage[kernel_id]
        previous = [r for r in await asyncio.to_thread(self.store.list, kernel_id) if r.restorable]
        return previous[0].id if previous else None

    async def get(self, snapshot_id: str) -> SnapshotRecord:
        return self.running.get(snapshot_id) or await asyncio.to_thread(self.store.get, snapshot_id)

    async def relabel(self, snapshot_id: str, label: str | None) -> SnapshotRecord:
        label = validate_label(label)
        running = self.running.get(snapshot_id)
        if running is not None:
            running.label = label  # the background task saves it with the rest
            return running
        return await asyncio.to_thread(self.store.relabel, snapshot_id, label)

    async def delete(self, snapshot_id: str) -> None:
        if snapshot_id in self.running:
            raise OperationInProgress(f"snapshot {snapshot_id} is still being taken")
        record = await asyncio.to_thread(self.store.get, snapshot_id)
        await asyncio.to_thread(self.store.delete, snapshot_id)
        self.events.snapshot("deleted", record)

    async def stop(self) -> None:
        """Stop snapshots still running (they are recorded failed)."""
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def _remove_soon(links: Path) -> None:
    """Remove the links to a dump's parent images in a worker thread, not
    waited for: they may be the last ones to a GiB, which takes the file
    system most of a second to free (0.65-0.9 s measured), and nothing
    needs to wait for that, least of all the event loop or the kernel's claim."""
    asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, links, True)
