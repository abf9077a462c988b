"""Hibernation: a kernel put to disk, its processes stopped and their memory
freed, while the server keeps listing it (same id, same session). It is woken,
restored in place from its snapshot, when a client sends it a message, opens
its notebook (a websocket to it), or asks (POST .../wake).

The kernel's provisioner reports it alive while it is on disk, so the server
neither restarts nor forgets it; interrupt does nothing, shutdown removes it
without waking it, restart starts it afresh (provisioner.py). Hibernated
kernels are kept in a file of the store's state and listed again at the next
server start.

Messages that reach a hibernated, hibernating or waking kernel through the
server's websocket are held and sent once it runs again (WakeOnUse), so a cell
run against a hibernated kernel runs after the wake, with the state it had.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.utils import ensure_async

from .errors import (
    CheckpointError,
    KernelNotCheckpointable,
    KernelNotFound,
    OperationInProgress,
    RestoreFailed,
    WakeGaveWay,
)
from .flow import Flow, FlowParts
from .forknet import in_fork_network
from .provisioner import LaunchPlan
from .reconnect import client_connections, kernel_ports
from .records import SnapshotRecord
from .recovery import RunningKernels
from .restore import RestoreInPlace, RestoreOutcome
from .snapshots import SnapshotFlow

HIBERNATION_LABEL = "hibernated"


class KernelNotHibernated(OperationInProgress):
    """Wake was asked of a kernel that runs."""


class Hibernation(Flow):
    def __init__(
        self, parts: FlowParts, snapshots: SnapshotFlow, in_place: RestoreInPlace, listed: RunningKernels, outbound: str
    ):
        super().__init__(parts)
        self.snapshots, self.in_place, self.listed, self.outbound = snapshots, in_place, listed, outbound
        self._hibernating: set[str] = set()
        self._waking: dict[str, asyncio.Task] = {}
        self._held: dict[str, list[Callable[[], None]]] = {}  # messages to send once awake
        self._clients: dict[str, dict[int, int]] = {}  # the server's connections when it went to disk
        self.after_wake: Callable[[str], Awaitable[None]] | None = None  # the manager tracks it again

    # -- what the server asks -----------------------------------------------------------

    def _require_wakeable(self, kernel_id: str, snapshot_id: str) -> None:
        """A kernel goes to disk only if the engine would restore its snapshot
        (the helper's refusals: a named pipe, a file the user can no longer
        open), asked before its processes stop (blocking)."""
        kept = self.store.kept_images.latest(kernel_id)
        if kept is None or kept[0] != snapshot_id:
            return  # not kept (image_cache_bytes): the wake's own checks decide
        try:
            self.engine.check_restorable(kept[1])
        except CheckpointError as e:
            raise KernelNotCheckpointable(
                f"kernel {kernel_id} was not hibernated: it could not be woken from its snapshot ({e})"
            ) from None

    def snapshot_of(self, kernel_id: str) -> str | None:
        """The snapshot a hibernated kernel wakes from; None if it runs."""
        try:
            _, prov = self.kernels.require(kernel_id)
        except CheckpointError:
            return None
        return prov.hibernated

    def sleeper_on(self, snapshot_id: str) -> str | None:
        """The hibernated kernel that wakes from ``snapshot_id`` (this server's,
        or listed in the store's state by one that stopped), if any (blocking)."""
        for kernel_id, entry in self.listed.listed().items():
            if entry.get("snapshot_id") == snapshot_id:
                return kernel_id
        return None

    def holds_messages(self, kernel_id: str) -> bool:
        return (
            kernel_id in self._hibernating
            or kernel_id in self._waking
            or bool(self._held.get(kernel_id))
            or self.snapshot_of(kernel_id) is not None
        )

    def hold(self, kernel_id: str, send: Callable[[], None]) -> None:
        """Keep a client's message until the kernel runs; wake it if it is on disk."""
        self._held.setdefault(kernel_id, []).append(send)
        if kernel_id not in self._hibernating:
            self.wake_soon(kernel_id)

    def wake_soon(self, kernel_id: str) -> asyncio.Task:
        task = self._waking.get(kernel_id)
        if task is None or task.done():
            task = self._waking[kernel_id] = asyncio.ensure_future(self._wake(kernel_id))
        return task

    # -- to disk ------------------------------------------------------------------------

    async def hibernate(self, kernel_id: str) -> dict[str, Any]:
        """Snapshot the kernel, then stop its processes. Returns what it freed."""
        km, prov = self.kernels.require(kernel_id)
        if prov.hibernated:
            raise OperationInProgress(f"kernel {kernel_id} is hibernated already")
        if kernel_id in self._hibernating or kernel_id in self._waking:
            raise OperationInProgress(f"kernel {kernel_id} is being hibernated or woken")
        started = time.monotonic()
        self._hibernating.add(kernel_id)  # from now on, clients' messages wait for it to wake
        try:
            await self._until_idle(km, kernel_id)
        except BaseException:
            self._hibernating.discard(kernel_id)
            self._send_held(kernel_id)
            raise
        self.events.publish({"action": "hibernating", "kernel_id": kernel_id})
        try:
            record = await self.snapshots.wait(
                await self.snapshots.start(kernel_id, HIBERNATION_LABEL, trigger="hibernate")
            )
            async with self.claims.hold(kernel_id):
                if self.claims.lineage.get(kernel_id) != record.id:
                    raise OperationInProgress(f"kernel {kernel_id} was restored meanwhile; it was not hibernated")
                await asyncio.to_thread(self._require_wakeable, kernel_id, record.id)
                self._clients[kernel_id] = client_connections(km.ip, kernel_ports(km))
                assert prov.tree is not None
                # Measured now: after a lazy restore, its memory is all back only by the snapshot's end.
                memory = await asyncio.to_thread(tree_memory_bytes, prov.tree.init_pid)
                # Listed before its processes stop: a server that dies in between still finds it.
                entry = {"snapshot_id": record.id, "kernel_name": km.kernel_name, "path": record.path}
                await asyncio.to_thread(self.listed.mark, kernel_id, entry)
                try:
                    # Shielded: a server stopping meanwhile must not leave it half done.
                    await asyncio.shield(asyncio.to_thread(prov.hibernate, record.id))
                except Exception:
                    if not prov.hibernated:
                        await asyncio.to_thread(self.listed.mark, kernel_id, None)
                    raise
            if self.after_wake is not None:
                await self.after_wake(kernel_id)  # no process to find after a crash now
        except BaseException as e:
            self._hibernating.discard(kernel_id)
            if isinstance(e, Exception):
                self.events.publish({"action": "hibernate_failed", "kernel_id": kernel_id, "message": str(e)})
            if self._held.get(kernel_id):
                self._send_held(kernel_id)  # it runs on: what was held goes now
            raise
        self._hibernating.discard(kernel_id)
        outcome = {
            "kernel_id": kernel_id,
            "snapshot_id": record.id,
            "memory_freed_bytes": memory,
            "freeze_seconds": record.freeze_seconds,
            "total_seconds": round(time.monotonic() - started, 4),
        }
        self.log.info(
            "jupyter_ckpt: kernel %s hibernated in %.2f s (snapshot %s), %.1f MiB freed",
            kernel_id,
            outcome["total_seconds"],
            record.id,
            memory / 2**20,
        )
        if prov.hibernated == record.id:  # not if woken already (its events said so)
            self.events.publish(
                {
                    "action": "hibernated",
                    "kernel_id": kernel_id,
                    "snapshot_id": record.id,
                    "memory_bytes": memory,
                    "message": f"on disk; {memory / 2**20:.0f} MiB of memory freed",
                }
            )
        if self._held.get(kernel_id):
            self.wake_soon(kernel_id)  # a client sent it something meanwhile
        await self._drop_older_hibernations(kernel_id, record.id)
        return outcome

    async def _until_idle(self, km: Any, kernel_id: str, patience: float = 2.0) -> None:
        """OperationInProgress if the kernel runs a cell: a snapshot would catch
        it mid-cell, and what the cell did after it would be done again on
        waking. (Its idle status may reach the server a moment after the cell
        ended: wait that long.)"""
        deadline = time.monotonic() + patience
        while getattr(km, "execution_state", "") == "busy":
            if time.monotonic() > deadline:
                raise OperationInProgress(
                    f"kernel {kernel_id} is running a cell: hibernate it once the cell has ended "
                    "(or take a snapshot: that works mid-cell)"
                )
            await asyncio.sleep(0.05)

    async def _drop_older_hibernations(self, kernel_id: str, keep: str) -> None:
        """Each hibernation supersedes the kernel's previous one (unless a user
        relabelled it: then it is theirs to keep), unless a kernel wakes from it."""
        try:
            for record in await asyncio.to_thread(self.store.list, kernel_id):
                if record.trigger != "hibernate" or record.id == keep or record.label != HIBERNATION_LABEL:
                    continue
                if await asyncio.to_thread(self.sleeper_on, record.id) is None:
                    await asyncio.to_thread(self.store.delete, record.id)
        except Exception:  # the hibernation itself succeeded: old snapshots wait for the next one
            self.log.warning("jupyter_ckpt: older hibernation snapshots of %s not removed", kernel_id, exc_info=True)

    # -- back -------------------------------------------------------------------------

    async def wake(self, kernel_id: str) -> RestoreOutcome:
        """Restore a hibernated kernel now (once, however many ask)."""
        running = self._waking.get(kernel_id)
        if self.snapshot_of(kernel_id) is None and (running is None or running.done()):
            self.kernels.require(kernel_id)  # 404 for an unknown kernel
            raise KernelNotHibernated(f"kernel {kernel_id} is not hibernated")
        outcome = await asyncio.shield(self.wake_soon(kernel_id))
        if isinstance(outcome, CheckpointError):
            raise outcome
        if outcome is None:
            raise KernelNotHibernated(f"kernel {kernel_id} is not hibernated (it was woken, restarted or shut down)")
        return outcome

    async def _wake(self, kernel_id: str) -> RestoreOutcome | CheckpointError | None:
        """The outcome, the reason it failed, or None when there was nothing to wake."""
        try:
            return await self._wake_once(kernel_id)
        finally:
            if self._waking.get(kernel_id) is asyncio.current_task():
                self._waking.pop(kernel_id, None)

    async def _wake_once(self, kernel_id: str) -> RestoreOutcome | CheckpointError | None:
        try:
            _, prov = self.kernels.require(kernel_id)
            snapshot_id = prov.hibernated
            if snapshot_id is None:
                self._send_held(kernel_id)  # it runs (woken meanwhile): nothing to wait for
                return None
            self.events.publish({"action": "waking", "kernel_id": kernel_id, "snapshot_id": snapshot_id})
            record = await asyncio.to_thread(self.store.get, snapshot_id)
            outcome = await self.restore_into(kernel_id, record)
        except WakeGaveWay as e:  # shut down or restarted meanwhile: that wins
            self.log.info("jupyter_ckpt: waking kernel %s gave way: %s", kernel_id, e)
            self._drop_held(kernel_id)
            return e
        except OperationInProgress as e:
            # Another restore into it runs: it sends what is held when it ends.
            self.log.info("jupyter_ckpt: kernel %s is woken by another operation: %s", kernel_id, e)
            return e
        except Exception as e:
            message = f"waking kernel {kernel_id} failed, it stays on disk: {e}"
            self.log.error("jupyter_ckpt: %s", message)
            self.events.publish({"action": "wake_failed", "kernel_id": kernel_id, "message": message})
            self._drop_held(kernel_id)
            return e if isinstance(e, CheckpointError) else RestoreFailed(message)
        self.events.publish(
            {
                "action": "woken",
                "kernel_id": kernel_id,
                "snapshot_id": record.id,
                "message": f"running again after {outcome.total_seconds:.2f} s",
            }
        )
        return outcome

    async def restore_into(self, kernel_id: str, record: SnapshotRecord) -> RestoreOutcome:
        """Restore ``record`` into the hibernated kernel (its own snapshot, or
        another one asked for by a restore)."""
        clients = self._clients.get(kernel_id) or {}
        outcome = await self.in_place.restore(record, kernel_id, False, clients=clients, hibernated=True)
        self._clients.pop(kernel_id, None)
        await asyncio.to_thread(self.listed.mark, kernel_id, None)
        if self.after_wake is not None:
            await self.after_wake(kernel_id)
        self._send_held(kernel_id)
        return outcome

    def _send_held(self, kernel_id: str) -> None:
        for send in self._held.pop(kernel_id, []):
            try:
                send()
            except Exception:  # a client gone meanwhile
                self.log.debug("jupyter_ckpt: a held message could not be sent", exc_info=True)

    def _drop_held(self, kernel_id: str) -> None:
        self._held.pop(kernel_id, None)

    # -- across server restarts, shutdowns and restarts -------------------------------

    def forget(self, kernel_id: str) -> None:
        """Shut down or restarted: the kernel is no longer on disk."""
        self._clients.pop(kernel_id, None)
        self._drop_held(kernel_id)
        self.listed.mark(kernel_id, None)

    async def list_again(self) -> list[str]:
        """At start: each kernel hibernated when the server stopped is listed
        again under its id, with its notebook's session; it wakes when used."""
        listed = []
        for kernel_id, entry in (await asyncio.to_thread(self.listed.listed)).items():
            if kernel_id in self.kernels.ids():
                continue
            try:
                record = await asyncio.to_thread(self.store.get, entry.get("snapshot_id", ""))
                if not record.restorable or not record.connection:
                    raise KernelNotFound(f"its snapshot {record.id} is {record.status}")
                network = None
                if in_fork_network(record.connection):  # its namespace went with the server: a new one
                    network = await asyncio.to_thread(self.engine.create_network, self.outbound)
                plan = LaunchPlan(record.id, record.connection, network=network, hibernated=True)
                await self.kernels.start(kernel_id, record.kernel_name, record.path, plan)
                if record.path:
                    await self.kernels.attach_session(record.path, kernel_id)
            except Exception as e:
                self.log.warning("jupyter_ckpt: hibernated kernel %s cannot be listed again: %s", kernel_id, e)
                await asyncio.to_thread(self.listed.mark, kernel_id, None)
                continue
            listed.append(kernel_id)
            self.log.info("jupyter_ckpt: kernel %s is listed again, hibernated (snapshot %s)", kernel_id, record.id)
        return listed

    # -- idle kernels -----------------------------------------------------------------

    async def hibernate_idle(self, idle_seconds: float) -> list[str]:
        """Hibernate every kernel idle for ``idle_seconds`` (by the server's own
        last-activity clock), none of whose operations runs."""
        done = []
        for kernel_id in self.kernels.ids():
            if not self._may_hibernate(kernel_id) or not self._idle_for(kernel_id, idle_seconds):
                continue
            try:
                await self.hibernate(kernel_id)
                done.append(kernel_id)
            except CheckpointError as e:
                self.log.info("jupyter_ckpt: idle kernel %s not hibernated: %s", kernel_id, e)
        return done

    def _may_hibernate(self, kernel_id: str) -> bool:
        if self.claims.is_held(kernel_id) or kernel_id in self._hibernating or kernel_id in self._waking:
            return False
        try:
            _, prov = self.kernels.require(kernel_id)
        except CheckpointError:
            return False
        return not prov.hibernated

    def _idle_for(self, kernel_id: str, seconds: float, cull_busy: bool = False) -> bool:
        km = self.kernels.kernel_manager.get_kernel(kernel_id)
        last = getattr(km, "last_activity", None)
        if last is None or (not cull_busy and getattr(km, "execution_state", "") == "busy"):
            return False
        return utcnow() - last > timedelta(seconds=seconds)

    def culler(self, original: Callable[[str], Any]) -> Callable[[str], Any]:
        """jupyter_server's culling of one kernel, hibernating where it would
        shut down (same criteria: idle time, busy, connections), for kernels
        that can be snapshotted; others are culled as before."""
        mapping = self.kernels.kernel_manager

        async def cull_kernel_if_idle(kernel_id: str) -> None:
            km = mapping.get_kernel(kernel_id)
            if self.snapshot_of(kernel_id) is not None:
                return  # on disk: nothing to free
            if self.claims.is_held(kernel_id) or kernel_id in self._hibernating or kernel_id in self._waking:
                return  # a snapshot, restore, hibernation or wake runs: look again at the next round
            if not self._may_hibernate(kernel_id) or getattr(km, "execution_state", None) == "dead":
                await ensure_async(original(kernel_id))  # cannot be snapshotted (or dead): culled as before
                return
            timeout = km.kernel_spec.metadata.get("cull_idle_timeout", mapping.cull_idle_timeout)
            connected = mapping._kernel_connections.get(kernel_id, 0)
            if self._idle_for(kernel_id, timeout, mapping.cull_busy) and (mapping.cull_connected or not connected):
                self.log.info("jupyter_ckpt: hibernating idle kernel %s instead of culling it", kernel_id)
                try:
                    await self.hibernate(kernel_id)
                except OperationInProgress as e:
                    self.log.info("jupyter_ckpt: idle kernel %s not hibernated now: %s", kernel_id, e)
                except CheckpointError as e:
                    self.log.warning("jupyter_ckpt: idle kernel %s not hibernated (%s); culling it", kernel_id, e)
                    await ensure_async(original(kernel_id))

        return cull_kernel_if_idle


def tree_memory_bytes(init_pid: int) -> int:
    """Memory the processes of a kernel's tree hold (their proportional set
    size: shared pages split among their sharers), 0 when none runs."""
    total, pending, seen = 0, [init_pid], set()
    while pending:
        pid = pending.pop()
        if pid <= 0 or pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pending.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total
