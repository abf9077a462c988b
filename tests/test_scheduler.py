"""The auto-backup loop's decisions, tick by tick.

The loop is driven here by hand (``run_due``) against a stand-in for the
manager: which kernels exist, whether they are busy, and what a snapshot and
retention do. Real kernels, CRIU and the server's clock are in
tests/test_auto_backup.py; this file pins down each rule on its own, quickly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from jupyter_ckpt import scheduler
from jupyter_ckpt.errors import InvalidRequest, OperationInProgress
from jupyter_ckpt.scheduler import MAX_INTERVAL, MAX_KEEP, AutoBackup, Schedule


@dataclass
class Activity:
    execution_state: str = "idle"
    executions_seen: int = 0


@dataclass
class Record:
    id: str


@dataclass
class StandInManager:
    """What AutoBackup asks of the manager, with what it was asked recorded."""

    kernels: dict[str, Activity] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # a snapshot or restore holds it
    hibernated: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    taken: list[str] = field(default_factory=list)
    pruned: list[tuple[str, int]] = field(default_factory=list)
    prune_answer: list[str] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    gate: asyncio.Event | None = None  # snapshots wait on it when set
    running: int = 0
    most_running: int = 0

    def kernel_ids(self):
        return list(self.kernels)

    def require_kernel(self, kernel_id):
        if kernel_id not in self.kernels:
            raise KeyError(kernel_id)

    def is_hibernated(self, kernel_id):
        return kernel_id in self.hibernated

    def is_busy(self, kernel_id):
        return kernel_id in self.busy

    def activity_of(self, kernel_id):
        return self.kernels[kernel_id]

    async def snapshot(self, kernel_id, trigger):
        assert trigger == "auto"
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if kernel_id in self.fail:
                raise OperationInProgress(f"kernel {kernel_id} is busy")
            self.taken.append(kernel_id)
            return Record(f"snap-{len(self.taken)}")
        finally:
            self.running -= 1

    async def prune(self, kernel_id, keep_auto):
        self.pruned.append((kernel_id, keep_auto))
        return list(self.prune_answer)

    def publish(self, event):
        self.events.append(event)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(scheduler, "monotonic", clock)  # the loop's own clock, not asyncio's
    return clock


DEFAULT = Schedule(enabled=True, interval_seconds=60.0, keep=3)


async def settle(loop: AutoBackup) -> None:
    """Until the jobs the last tick started have ended."""
    while loop._jobs:
        await asyncio.gather(*list(loop._jobs))


async def tick(loop: AutoBackup) -> None:
    loop.run_due()
    await settle(loop)


# -- the schedule a PUT may set ---------------------------------------------------


def test_a_schedule_merges_what_is_given_with_the_current_one():
    assert Schedule.parse({}, DEFAULT) == DEFAULT
    assert Schedule.parse({"enabled": False}, DEFAULT) == Schedule(False, 60.0, 3)
    assert Schedule.parse({"interval_seconds": 1, "keep": 1}, DEFAULT) == Schedule(True, 1.0, 1)
    limits = Schedule.parse({"interval_seconds": MAX_INTERVAL, "keep": MAX_KEEP}, DEFAULT)
    assert limits == Schedule(True, MAX_INTERVAL, MAX_KEEP)
    parsed = Schedule.parse({"interval_seconds": 90}, DEFAULT)
    assert type(parsed.interval_seconds) is float and parsed.to_json() == {
        "enabled": True,
        "interval_seconds": 90.0,
        "keep": 3,
    }


@pytest.mark.parametrize(
    "body, message",
    [
        ({"colour": 1, "every": 2}, "unknown schedule fields: colour, every"),
        ({"enabled": 1}, "enabled must be true or false"),
        ({"enabled": None}, "enabled must be true or false"),
        ({"interval_seconds": True}, "interval_seconds must be a number from 1 to 3.16224e+07"),
        ({"interval_seconds": "60"}, "interval_seconds must be a number from 1"),
        ({"interval_seconds": 0.999}, "interval_seconds must be a number from 1"),
        ({"interval_seconds": MAX_INTERVAL * 1.001}, "interval_seconds must be a number from 1"),
        ({"interval_seconds": float("nan")}, "interval_seconds must be a number from 1"),
        ({"keep": 0}, f"keep must be a whole number from 1 to {MAX_KEEP}"),
        ({"keep": MAX_KEEP + 1}, "keep must be a whole number from 1"),
        ({"keep": 2.0}, "keep must be a whole number from 1"),
        ({"keep": True}, "keep must be a whole number from 1"),
    ],
)
def test_a_bad_schedule_is_refused_with_its_reason(body, message):
    with pytest.raises(InvalidRequest) as e:
        Schedule.parse(body, DEFAULT)
    assert str(e.value) == message or str(e.value).startswith(message)


async def test_set_keeps_the_schedule_per_kernel_and_says_so():
    manager = StandInManager(kernels={"a": Activity(), "b": Activity()})
    loop = AutoBackup(manager, DEFAULT)
    assert loop.get("a") == DEFAULT
    assert loop.set("a", {"enabled": False, "keep": 7}) == Schedule(False, 60.0, 7)
    assert loop.get("a") == Schedule(False, 60.0, 7) and loop.get("b") == DEFAULT
    assert manager.events == [
        {"action": "schedule_changed", "kernel_id": "a", "message": "enabled=False every 60 s, keep 7"}
    ]
    with pytest.raises(InvalidRequest):
        loop.set("a", {"keep": 0})
    assert loop.get("a") == Schedule(False, 60.0, 7)  # a refused change changes nothing
    with pytest.raises(KeyError):
        loop.get("gone")
    loop.forget("a")
    assert loop.get("a") == DEFAULT


# -- which kernels a tick snapshots -----------------------------------------------


async def test_a_kernel_is_taken_once_per_interval(clock):
    manager = StandInManager(kernels={"a": Activity("busy")})
    loop = AutoBackup(manager, DEFAULT)
    await tick(loop)  # first seen: its interval starts now
    assert manager.taken == []
    clock.now += 59.9
    await tick(loop)
    assert manager.taken == []
    clock.now += 0.1  # exactly one interval
    await tick(loop)
    assert manager.taken == ["a"]
    clock.now += 30
    await tick(loop)
    assert manager.taken == ["a"]
    clock.now += 30
    await tick(loop)
    assert manager.taken == ["a", "a"]
    assert manager.pruned == [("a", 3), ("a", 3)]  # retention after each, with the schedule's keep


async def test_disabled_hibernated_and_held_kernels_are_not_taken(clock):
    manager = StandInManager(kernels={k: Activity("busy") for k in ("off", "asleep", "held", "on")})
    manager.hibernated.add("asleep")
    manager.busy.add("held")
    loop = AutoBackup(manager, DEFAULT)
    loop.set("off", {"enabled": False})
    await tick(loop)
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["on"]
    manager.busy.clear()  # the snapshot that held it ended: taken at the next tick
    await tick(loop)
    assert manager.taken == ["on", "held"]


async def test_an_idle_kernel_is_skipped_until_a_cell_runs(clock):
    activity = Activity("idle", executions_seen=4)
    manager = StandInManager(kernels={"a": activity})
    loop = AutoBackup(manager, DEFAULT)
    await tick(loop)
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["a"]  # the first: nothing says it is unchanged
    for _ in range(3):
        clock.now += 60
        await tick(loop)
    assert manager.taken == ["a"]  # idle then and now, no cell since
    activity.executions_seen = 5  # a cell ran (and ended)
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["a", "a"]
    activity.execution_state = "busy"
    clock.now += 60
    await tick(loop)
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["a", "a", "a", "a"]  # busy: always taken
    activity.execution_state = "idle"
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["a", "a", "a", "a", "a"]  # was busy at the last one: taken once more
    clock.now += 60
    await tick(loop)
    assert len(manager.taken) == 5


async def test_a_skipped_kernel_waits_a_whole_interval_again(clock):
    activity = Activity("idle", executions_seen=1)
    manager = StandInManager(kernels={"a": activity})
    loop = AutoBackup(manager, DEFAULT)
    await tick(loop)
    clock.now += 60
    await tick(loop)  # taken
    clock.now += 60
    await tick(loop)  # skipped: unchanged
    activity.executions_seen = 2
    clock.now += 30  # half an interval after the skip
    await tick(loop)
    assert manager.taken == ["a"]
    clock.now += 30
    await tick(loop)
    assert manager.taken == ["a", "a"]


async def test_a_failed_snapshot_is_not_counted_and_nothing_is_pruned(clock):
    activity = Activity("idle", executions_seen=1)
    manager = StandInManager(kernels={"a": activity}, fail={"a"})
    loop = AutoBackup(manager, DEFAULT)
    await tick(loop)
    clock.now += 60
    await tick(loop)
    assert manager.taken == [] and manager.pruned == []
    manager.fail.clear()
    clock.now += 60
    await tick(loop)  # not skipped as unchanged: the failed one saved nothing
    assert manager.taken == ["a"]


async def test_pruned_snapshots_are_published():
    manager = StandInManager(kernels={"a": Activity("busy")}, prune_answer=["old-1", "old-2"])
    loop = AutoBackup(manager, Schedule(True, 1.0, 2))
    await loop._backup("a", loop.get("a"), scheduler._KernelState(0.0), False, 0)
    assert manager.pruned == [("a", 2)]
    assert manager.events == [
        {"action": "pruned", "snapshot_id": "old-1", "kernel_id": "a"},
        {"action": "pruned", "snapshot_id": "old-2", "kernel_id": "a"},
    ]


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_at_most_concurrency_snapshots_run_at_once(clock, concurrency):
    manager = StandInManager(kernels={k: Activity("busy") for k in "abcd"}, gate=asyncio.Event())
    loop = AutoBackup(manager, DEFAULT, concurrency=concurrency)
    loop.run_due()
    clock.now += 60
    loop.run_due()  # all four due
    for _ in range(10):
        await asyncio.sleep(0)
    assert manager.running == concurrency
    manager.gate.set()
    await settle(loop)
    assert sorted(manager.taken) == ["a", "b", "c", "d"] and manager.most_running == concurrency


async def test_the_loop_runs_every_tick_and_survives_a_bad_one(clock):
    manager = StandInManager(kernels={"a": Activity("busy")})
    loop = AutoBackup(manager, Schedule(True, 1.0, 3), tick=0.01)
    ticks = 0
    real_run_due = loop.run_due

    def counting_run_due():
        nonlocal ticks
        ticks += 1
        clock.now += 1
        if ticks == 2:
            raise RuntimeError("one bad tick")
        real_run_due()

    loop.run_due = counting_run_due
    loop.start()
    loop.start()  # idempotent: one loop
    deadline = asyncio.get_running_loop().time() + 30
    while len(manager.taken) < 3:
        assert asyncio.get_running_loop().time() < deadline, "the loop stopped"
        await asyncio.sleep(0.01)
    await loop.stop()
    assert loop._loop_task is None and not loop._jobs
    after = ticks
    await asyncio.sleep(0.05)
    assert ticks == after  # stopped


async def test_a_schedule_set_before_the_first_tick_starts_the_interval(clock):
    manager = StandInManager(kernels={"a": Activity("busy"), "b": Activity("busy")})
    loop = AutoBackup(manager, DEFAULT)
    loop.set("a", {"interval_seconds": 10})
    clock.now += 5
    await tick(loop)  # b first seen now; a's interval began at the PUT
    clock.now += 5
    await tick(loop)
    assert manager.taken == ["a"]
    clock.now += 50
    await tick(loop)
    assert manager.taken == ["a", "a"]  # b: 55 s since it was first seen
    clock.now += 5
    await tick(loop)
    assert manager.taken == ["a", "a", "b"]  # b: one default interval after it was first seen


async def test_forget_drops_the_schedule_and_the_interval(clock):
    manager = StandInManager(kernels={"a": Activity("busy")})
    loop = AutoBackup(manager, DEFAULT)
    loop.forget("never-seen")  # nothing to forget: no error
    loop.set("a", {"interval_seconds": 10})
    loop.forget("a")
    assert loop.get("a") == DEFAULT
    clock.now += 30
    await tick(loop)  # seen afresh: its interval starts now, not at the forgotten PUT
    assert manager.taken == []
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["a"]


async def test_one_kernel_skipped_does_not_end_the_tick_for_the_others(clock):
    """Kernels skipped for each reason come first; the last one is still taken."""
    kernels = {
        "idle": Activity("idle", executions_seen=1),
        "asleep": Activity("busy"),
        "held": Activity("busy"),
        "off": Activity("busy"),
        "due": Activity("busy"),
    }
    manager = StandInManager(kernels=kernels, hibernated={"asleep"}, busy={"held"})
    loop = AutoBackup(manager, DEFAULT)
    loop.set("off", {"enabled": False})
    await tick(loop)
    clock.now += 60
    manager.busy.clear()
    await tick(loop)  # the idle one taken once (nothing said it was unchanged)
    manager.busy.add("held")
    manager.taken.clear()
    clock.now += 60
    await tick(loop)
    assert manager.taken == ["due"]


async def test_stop_ends_the_snapshots_in_flight(clock):
    manager = StandInManager(kernels={"a": Activity("busy")}, gate=asyncio.Event())
    loop = AutoBackup(manager, DEFAULT)
    loop.run_due()
    clock.now += 60
    loop.run_due()
    [job] = list(loop._jobs)
    await asyncio.sleep(0)
    assert manager.running == 1
    await loop.stop()
    assert job.done() and job.cancelled() and not loop._jobs
