"""Periodic auto-backup of running kernels, busy ones included, with retention.

One loop for the server. Every ``tick`` seconds it looks at each checkpointable
kernel whose schedule is enabled and due, and snapshots it unless its state
cannot have changed since its last snapshot (idle then and now, no cell run in
between). At most ``concurrency`` automatic snapshots run at once across the
server, never two of one kernel. After each one, retention keeps the kernel's
newest ``keep`` automatic snapshots.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from time import monotonic
from typing import Any

from .errors import CheckpointError, InvalidRequest
from .manager import CheckpointManager

MAX_INTERVAL = 366 * 86400.0  # a year: also keeps NaN and infinities out (they fail every comparison)
MAX_KEEP = 100_000


@dataclass
class Schedule:
    enabled: bool
    interval_seconds: float
    keep: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, body: dict[str, Any], current: Schedule) -> Schedule:
        unknown = set(body) - {"enabled", "interval_seconds", "keep"}
        if unknown:
            raise InvalidRequest(f"unknown schedule fields: {', '.join(sorted(unknown))}")
        merged = {**current.to_json(), **body}
        if not isinstance(merged["enabled"], bool):
            raise InvalidRequest("enabled must be true or false")
        interval = merged["interval_seconds"]
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 1 <= interval <= MAX_INTERVAL:
            raise InvalidRequest(f"interval_seconds must be a number from 1 to {MAX_INTERVAL:g}")
        if (
            isinstance(merged["keep"], bool)
            or not isinstance(merged["keep"], int)
            or not 1 <= merged["keep"] <= MAX_KEEP
        ):
            raise InvalidRequest(f"keep must be a whole number from 1 to {MAX_KEEP}")
        return cls(merged["enabled"], float(merged["interval_seconds"]), merged["keep"])


@dataclass
class _KernelState:
    last_time: float  # monotonic time of the last auto snapshot (or of watching start)
    executions_seen: int = -1  # at the last snapshot
    was_idle: bool = False  # at the last snapshot


class AutoBackup:
    def __init__(
        self,
        manager: CheckpointManager,
        default: Schedule,
        tick: float = 5.0,
        concurrency: int = 1,
        log: logging.Logger | None = None,
    ):
        self.manager = manager
        self.default = default
        self.tick = tick
        self.log = log or logging.getLogger(__name__)
        self._schedules: dict[str, Schedule] = {}
        self._state: dict[str, _KernelState] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._loop_task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()

    # -- schedules ------------------------------------------------------------------

    def get(self, kernel_id: str) -> Schedule:
        self.manager.require_kernel(kernel_id)  # 404 / 409 for kernels it cannot handle
        return self._schedules.get(kernel_id, self.default)

    def set(self, kernel_id: str, body: dict[str, Any]) -> Schedule:
        schedule = Schedule.parse(body, self.get(kernel_id))
        self._schedules[kernel_id] = schedule
        self._state.setdefault(kernel_id, _KernelState(monotonic()))
        self.manager.publish(
            {
                "action": "schedule_changed",
                "kernel_id": kernel_id,
                "message": f"enabled={schedule.enabled} every {schedule.interval_seconds:g} s, keep {schedule.keep}",
            }
        )
        return schedule

    def forget(self, kernel_id: str) -> None:
        self._schedules.pop(kernel_id, None)
        self._state.pop(kernel_id, None)

    # -- the loop -------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        tasks = [t for t in [self._loop_task, *self._jobs] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None

    async def _run(self) -> None:
        while True:
            try:
                self.run_due()
            except Exception:  # one bad tick must not end auto-backup for good
                self.log.exception("jupyter_ckpt: auto-backup tick failed")
            await asyncio.sleep(self.tick)

    def run_due(self) -> None:
        now = monotonic()
        for kernel_id in self.manager.kernel_ids():
            schedule = self._schedules.get(kernel_id, self.default)
            state = self._state.setdefault(kernel_id, _KernelState(now))
            if not schedule.enabled or now - state.last_time < schedule.interval_seconds:
                continue
            if self.manager.is_hibernated(kernel_id):
                continue  # on disk: its hibernation snapshot holds it
            activity = self.manager.activity_of(kernel_id)
            idle = activity.execution_state == "idle"
            if state.was_idle and idle and activity.executions_seen == state.executions_seen:
                state.last_time = now  # nothing can have changed: skip, look again next interval
                continue
            if self.manager.is_busy(kernel_id):
                continue
            state.last_time = now
            job = asyncio.ensure_future(self._backup(kernel_id, schedule, state, idle, activity.executions_seen))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    async def _backup(self, kernel_id: str, schedule: Schedule, state: _KernelState, idle: bool, seen: int) -> None:
        async with self._slots:
            try:
                record = await self.manager.snapshot(kernel_id, trigger="auto")
            except CheckpointError as e:
                self.log.info("jupyter_ckpt: auto-backup of kernel %s skipped: %s", kernel_id, e)
                return
            state.was_idle, state.executions_seen = idle, seen
            pruned = await self.manager.prune(kernel_id=kernel_id, keep_auto=schedule.keep)
            for snapshot_id in pruned:
                self.manager.publish({"action": "pruned", "snapshot_id": snapshot_id, "kernel_id": kernel_id})
            self.log.info("jupyter_ckpt: auto-backup %s of kernel %s (%d pruned)", record.id, kernel_id, len(pruned))
