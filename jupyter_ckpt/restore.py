"""Restoring a snapshot in place: the kernel keeps its id, its processes are
replaced by the snapshot's. The current state is dumped first, so a restore
that fails puts the kernel back as it was; a kernel that is gone (a server
restart) is started again under its id and restored into."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .criu_images import differences
from .engine import CriuEngine, LazyPages
from .errors import (
    CheckpointError,
    DumpFailed,
    KernelNotCheckpointable,
    KernelNotFound,
    RestoreFailed,
    SnapshotIncompatible,
    WakeGaveWay,
)
from .flow import Flow, FlowParts
from .kernel_tree import KernelTree, restore_tree
from .kernels import connection_info, listener_moves
from .provisioner import CheckpointableProvisioner, LaunchPlan
from .reconnect import client_connections, kernel_ports, wait_until_answering
from .records import SnapshotRecord
from .recovery import start_time
from .store import SnapshotStore
from .store_page_server import ServingMemory


class KernelPutBack(RestoreFailed):
    """A restore failed and the kernel's previous state was restored instead."""


@dataclass
class PreviousState:
    """What a restore replaced, saved to be put back should it fail."""

    images: Path
    stdio_keys: dict[str, str]
    netns: Path | None
    restored_from: str | None
    network: Any
    lineage: str | None = None  # the snapshot the kernel last came from or saved (claims.lineage)


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
    notebook: bool = False  # the snapshot's notebook document was put back too (at ``path``)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def verified_images(store: SnapshotStore, record: SnapshotRecord, work: Path, engine: CriuEngine) -> Path:
    """The snapshot's images in ``work``, every byte verified, every file they
    need checked against this machine (SnapshotIncompatible if one differs),
    and what the engine would refuse refused now, before a kernel is touched."""
    images, _ = await _images(store, record, work, engine, serve_memory=False)
    return images


async def _images(
    store: SnapshotStore, record: SnapshotRecord, work: Path, engine: CriuEngine, serve_memory: bool
) -> tuple[Path, ServingMemory | None]:
    """``verified_images``; with ``serve_memory``, a snapshot with no kept
    images leaves its lazy pages in the store, served to CRIU as the kernel
    touches them (each checked then) instead of written out first."""
    images = work / "images"
    images.mkdir(mode=0o700)
    serving = None
    if serve_memory:
        serving = await asyncio.to_thread(store.materialize_serving_memory, record.id, images, work)
    else:
        await asyncio.to_thread(store.materialize, record.id, images)
    try:
        problems = await asyncio.to_thread(differences, images)
        if problems:
            raise SnapshotIncompatible(record.id, problems)
        await asyncio.to_thread(engine.check_restorable, images)
    except BaseException:
        if serving is not None:
            await asyncio.to_thread(serving.restored, None)
        raise
    return images, serving


class RestoreInPlace(Flow):
    def __init__(self, parts: FlowParts, lazy_restore: bool = True):
        super().__init__(parts)
        self.lazy_restore = lazy_restore

    async def start_again(self, record: SnapshotRecord) -> None:
        """Start a kernel with the snapshot's kernel id, ports and key (and its
        notebook's session), to restore the snapshot into: its kernel is gone."""
        if not record.connection:
            raise KernelNotFound(f"kernel {record.kernel_id} is gone, and snapshot {record.id} cannot start it again")
        async with self.claims.hold(record.kernel_id):
            try:
                await self.kernels.start(
                    record.kernel_id, record.kernel_name, record.path, LaunchPlan(record.id, record.connection)
                )
            except Exception as e:
                raise RestoreFailed(f"cannot start kernel {record.kernel_id} again to restore into: {e}") from None
        self.log.info("jupyter_ckpt: kernel %s started again for %s", record.kernel_id, record.path or "no notebook")

    async def restore(
        self,
        record: SnapshotRecord,
        kernel_id: str,
        started_again: bool,
        clients: dict[int, int] | None = None,
        hibernated: bool = False,
    ) -> RestoreOutcome:
        """``started_again``: the kernel has no state to keep (started just to
        be restored into). ``hibernated``: neither (its processes are on disk);
        its session stays as it is, and a shutdown or restart meanwhile wins.
        ``clients``: the server's connections to wait for afterwards, when not
        the ones it has now (a hibernated kernel's, when it went to disk)."""
        started_again = started_again or hibernated
        km, prov = self.kernels.require(kernel_id)
        lazy_pages: LazyPages | None = None
        serving: ServingMemory | None = None
        previous: PreviousState | None = None
        # What the kernel's state before the restore is, as a snapshot, should
        # the server die before the restore ends (see recovery.py).
        before = SnapshotRecord(
            id="",
            kernel_id=kernel_id,
            kernel_name=km.kernel_name,
            path=await self.kernels.notebook_path(kernel_id),
            label=f"the state before restoring {record.id}, saved when the server stopped during that restore",
            trigger="auto",
            parent_id=prov.tree.restored_from if prov.tree else None,
            stdio_keys=dict(prov.tree.stdio.keys) if prov.tree else {},
            connection=connection_info(km),
            criu_version=self.engine.health().version,
        )
        async with self.claims.hold(kernel_id) as claim:
            started = time.monotonic()
            work = self.store.new_scratch_dir("restore-")
            try:
                # Every byte is verified before the running kernel is touched;
                # or, memory served from the store, before it reaches the kernel
                # (a damaged chunk then puts the kernel back: _memory_back).
                serve_memory = (
                    not started_again
                    and self.lazy_restore
                    and isinstance(self.engine, CriuEngine)  # not yet through the helper
                    and self.engine.health().lazy_pages
                )
                _, serving = await _images(self.store, record, work, self.engine, serve_memory)
                prepared = time.monotonic() - started
                # The snapshot's listeners go where this kernel listens (a
                # fork's namespace address, or another kernel's ports).
                moves = listener_moves(record.connection, connection_info(km))
                if clients is None:
                    clients = client_connections(km.ip, kernel_ports(km))
                self.claims.reconnecting(kernel_id)
                try:
                    with prov.swapping():
                        saved_seconds, seconds, lazy_pages, previous = await asyncio.to_thread(
                            self._replace_processes,
                            prov,
                            record,
                            work,
                            None if started_again else before,
                            moves,
                            hibernated,
                            serving,
                        )
                except KernelPutBack as e:
                    await self._wait_until_answering(km, kernel_id, clients)
                    self.events.snapshot("restore_failed", record, message=str(e))
                    raise RestoreFailed(str(e)) from None
                except BaseException as e:
                    self.claims.reconnected(kernel_id)  # nothing was changed, or the kernel is gone
                    if isinstance(e, RestoreFailed):
                        self.events.snapshot("restore_failed", record, message=str(e))
                    raise
                self.claims.lineage[kernel_id] = record.id
                # Clients of a hibernated kernel may have gone meanwhile: wait less for them.
                await self._wait_until_answering(km, kernel_id, clients, 2.0 if hibernated else 10.0)
            finally:
                if lazy_pages is None:
                    if serving is not None:
                        await asyncio.to_thread(serving.stop)
                    self.journal.end("restore", kernel_id)
                    shutil.rmtree(work, ignore_errors=True)
                else:  # the kernel runs; its images and the kernel stay claimed until its memory is back
                    claim.release_after(
                        asyncio.create_task(
                            self._memory_back(kernel_id, prov, record, lazy_pages, work, started, serving, previous)
                        )
                    )
        outcome = RestoreOutcome(
            record.id,
            kernel_id,
            "replace",
            round(saved_seconds, 4),
            round(seconds, 4),
            round(time.monotonic() - started, 4),
            prepare_seconds=round(prepared, 4),
            lazy=lazy_pages is not None,
        )
        if started_again and not hibernated and record.path:
            await self.kernels.attach_session(record.path, kernel_id)  # only now: clients see the restored kernel only
        self.log.info("jupyter_ckpt: kernel %s restored from %s in %.3f s", kernel_id, record.id, outcome.total_seconds)
        self.events.snapshot("restored", record.as_kernel(kernel_id))
        return outcome

    async def _wait_until_answering(
        self, km: Any, kernel_id: str, before: dict[int, int], timeout: float = 10.0
    ) -> None:
        await wait_until_answering(
            km, before, self.log, reconnected=lambda: self.claims.reconnected(kernel_id), timeout=timeout
        )

    async def _memory_back(
        self,
        kernel_id: str,
        prov: CheckpointableProvisioner,
        record: SnapshotRecord,
        lazy_pages: LazyPages,
        work: Path,
        started: float,
        serving: ServingMemory | None = None,
        previous: PreviousState | None = None,
    ) -> None:
        """Wait until a lazily restored kernel has all of its memory back, then
        release its images (the caller's claim ends with this task). Memory
        served from the store that fails its check puts the kernel back as it
        was before the restore (``previous``)."""
        try:
            if serving is not None and not await asyncio.to_thread(serving.succeeded):
                assert previous is not None  # served only where the replaced state was saved
                await self._put_back(kernel_id, prov, record, serving, previous, work)
                return
            await asyncio.to_thread(lazy_pages.wait)
            self.log.info(
                "jupyter_ckpt: kernel %s has all its memory back, %.3f s after the restore began",
                kernel_id,
                time.monotonic() - started,
            )
        except RestoreFailed as e:
            # Memory that never came back must not be read: stop the kernel.
            prov.kill_tree()
            message = f"{e}. The kernel was stopped; restart it, or restore a snapshot again."
            self.log.error("jupyter_ckpt: kernel %s: %s", kernel_id, message)
            self.events.snapshot("restore_failed", record.as_kernel(kernel_id), message=message)
        finally:
            if serving is not None:
                await asyncio.to_thread(serving.stop)
            lazy_pages.kill()
            self.journal.end("restore", kernel_id)
            shutil.rmtree(work, ignore_errors=True)

    async def _put_back(
        self,
        kernel_id: str,
        prov: CheckpointableProvisioner,
        record: SnapshotRecord,
        serving: ServingMemory,
        previous: PreviousState,
        work: Path,
    ) -> None:
        """The restored tree waits, stopped, on a page that failed its check:
        replace it with the state it replaced."""
        reason = serving.reason()
        km, _ = self.kernels.require(kernel_id)
        clients = client_connections(km.ip, kernel_ports(km))
        self.claims.reconnecting(kernel_id)
        try:
            with prov.swapping():
                await asyncio.to_thread(self._swap_back, prov, serving, previous, work)
        except (CheckpointError, OSError) as e:
            self.claims.reconnected(kernel_id)
            message = (
                f"restoring snapshot {record.id} failed while its memory came back ({reason}), and so did "
                f"bringing back the kernel's previous state ({e}): the kernel has stopped"
            )
        else:
            if previous.lineage is None:
                self.claims.lineage.pop(kernel_id, None)
            else:
                self.claims.lineage[kernel_id] = previous.lineage
            await self._wait_until_answering(km, kernel_id, clients)
            message = (
                f"restoring snapshot {record.id} failed while its memory came back: {reason}. "
                "The kernel was put back as it was before the restore; this snapshot is damaged, "
                "restore another one"
            )
        finally:
            await asyncio.to_thread(serving.handled)  # (done already, unless stopping the tree failed)
        self.log.error("jupyter_ckpt: kernel %s: %s", kernel_id, message)
        self.events.snapshot("restore_failed", record.as_kernel(kernel_id), message=message)

    def _swap_back(
        self, prov: CheckpointableProvisioner, serving: ServingMemory, previous: PreviousState, work: Path
    ) -> None:
        prov.kill_tree()
        prov.reap_old()
        serving.handled()  # only once the tree that waited on it is gone
        self._bring_back(prov, previous, work)

    def _bring_back(self, prov: CheckpointableProvisioner, previous: PreviousState, work: Path) -> None:
        """Restore the state a restore replaced, as the kernel's processes (blocking)."""
        back = restore_tree(self.engine, previous.images, work, previous.stdio_keys, previous.netns)
        prov.adopt(back.pid, back.stdio, previous.restored_from, previous.network)

    def _previous_parent(self, kernel_id: str, tree: KernelTree, work: Path) -> Path | None:
        """Links to the kept images the kernel's dirty tracking counts from, in
        ``work``, if there are any: the state a restore replaces is then saved
        as the pages written since. Put back, it is restored through CRIU's
        link to its parent; recovery makes it whole before storing it."""
        if tree.dirty.counted_from is None or self.engine.health().dirty_tracking == "none":
            return None
        links = work / "previous-parent"
        links.mkdir(mode=0o700)
        if self.store.kept_images.link_all(kernel_id, tree.dirty.counted_from, links):
            return links
        shutil.rmtree(links, ignore_errors=True)
        return None

    def _replace_processes(
        self,
        prov: CheckpointableProvisioner,
        record: SnapshotRecord,
        work: Path,
        before: SnapshotRecord | None,
        moves: dict[int, tuple[str, int]],
        hibernated: bool = False,
        serving: ServingMemory | None = None,
    ) -> tuple[float, float, LazyPages | None, PreviousState | None]:
        """Blocking: runs in a worker thread while the provisioner reports 'alive'.
        ``work`` holds the snapshot's verified images in ``images/``; CRIU's logs
        and the replaced state go there too (unless ``before`` is None: a kernel
        started just to be restored into has no state to keep). Returns the
        seconds saving the current state and restoring took, for a lazy
        restore what brings the rest of the memory back, and the state saved.
        ``serving``: where the lazy pages come from, if not the images."""
        assert prov.tree is not None
        current = prov.tree
        kernel_id = prov.kernel_id
        rollback = work / "previous-state"
        started = time.monotonic()
        if before is not None:
            rollback.mkdir(mode=0o700)
            parent = self._previous_parent(kernel_id, current, work)
            try:
                self.engine.dump(
                    current.init_pid, rollback, **({"tracking": current.dirty, "parent": parent} if parent else {})
                )
            except DumpFailed as e:
                raise RestoreFailed(
                    f"nothing was changed: the kernel's current state could not be saved first ({e})"
                ) from None
            try:  # it is what comes back should the restore fail: it must be restorable
                self.engine.check_restorable(rollback)
            except CheckpointError as e:
                raise KernelNotCheckpointable(
                    "nothing was changed: the kernel's current state could not be brought back should the "
                    f"restore fail ({e}). Release what it names, or restore the snapshot as a new kernel"
                ) from None
        saved_seconds = time.monotonic() - started
        if hibernated and not prov.hibernated:
            raise WakeGaveWay("the kernel was shut down or restarted while it was being woken: the wake gave way")
        self.journal.begin(
            "restore",
            kernel_id,
            snapshot_id=record.id,
            previous_state=str(rollback) if before is not None else None,
            record=before.to_json() if before is not None else None,
        )
        prov.stop_processes()
        netns = current.network.path if current.network else None
        # Memory served from the store is only ever restored lazily: its pages files have holes.
        lazy = serving is not None or (self.lazy_restore and self.engine.health().lazy_pages)
        previous = (
            PreviousState(
                rollback,
                dict(current.stdio.keys),
                netns,
                current.restored_from,
                current.network,
                self.claims.lineage.get(kernel_id),
            )
            if before is not None
            else None
        )
        page_server = serving.page_server if serving is not None else None
        try:
            tree = restore_tree(
                self.engine, work / "images", work, record.stdio_keys, netns, lazy, moves, page_server=page_server
            )
        except (CheckpointError, OSError) as failure:  # CRIU's, a refusal of the helper's, or its connection
            if serving is not None:
                serving.restored(None)
            if before is None:
                raise RestoreFailed(f"restoring snapshot {record.id} failed: {failure}") from None
            assert previous is not None
            try:
                self._bring_back(prov, previous, work)
            except (CheckpointError, OSError) as second:
                raise RestoreFailed(
                    f"restoring snapshot {record.id} failed ({failure}), and so did bringing back the "
                    f"kernel's previous state ({second}): the kernel has stopped"
                ) from None
            raise KernelPutBack(
                f"restoring snapshot {record.id} failed: {failure}. The kernel was put back as it was before."
            ) from None
        if serving is not None:
            serving.restored(tree.pid)
        prov.adopt(tree.pid, tree.stdio, record.id, current.network)
        if tree.lazy_pages is not None and tree.lazy_pages.process is not None:  # the helper keeps its own
            daemon = tree.lazy_pages.process.pid
            self.journal.update("restore", kernel_id, lazy_pages={"pid": daemon, "started": start_time(daemon)})
        return saved_seconds, tree.seconds, tree.lazy_pages, previous
