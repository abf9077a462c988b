"""What the server knows of each kernel between operations: which kernel an
operation holds (one at a time), which restored kernel still waits for its
clients or its memory, and which snapshot each kernel last came from or saved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import OperationInProgress


class Claim:
    """One operation's hold on one kernel. Released at the end of the
    ``async with`` that took it, unless handed over to a task that outlives
    it (a snapshot being stored), which releases it at the end of its own
    ``with claim``, or on ``release_after`` when a task after it holds the
    kernel on (a lazy restore's memory transfer, a stored snapshot's images
    being kept)."""

    def __init__(self, claims: KernelClaims, kernel_id: str):
        self.claims, self.kernel_id = claims, kernel_id
        self.handed_over = False
        self.released = False
        self.held_by_task = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.claims._held.discard(self.kernel_id)

    def hand_over(self) -> Claim:
        """The caller's ``async with`` no longer releases it: the new owner does."""
        self.handed_over = True
        return self

    def release_after(self, task: asyncio.Task) -> None:
        """Hold the kernel until ``task`` ends (snapshots and restores of it
        wait for it), not until the end of a ``with`` that holds the claim."""
        self.hand_over()
        self.held_by_task = True
        self.claims._holding_tasks[self.kernel_id] = task

        def done(_: asyncio.Task) -> None:
            self.claims._holding_tasks.pop(self.kernel_id, None)
            self.release()

        task.add_done_callback(done)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.held_by_task:
            self.release()


class KernelClaims:
    def __init__(self) -> None:
        self._held: set[str] = set()
        # Kernels held by a task after their operation: a lazy restore until
        # the memory is back, a snapshot until its images are kept.
        self._holding_tasks: dict[str, asyncio.Task] = {}
        self._reconnecting: set[str] = set()  # restored kernels whose clients are not back yet
        self.lineage: dict[str, str] = {}  # kernel id -> snapshot it last came from or saved

    def is_held(self, kernel_id: str) -> bool:
        return kernel_id in self._held

    @asynccontextmanager
    async def hold(self, kernel_id: str) -> AsyncIterator[Claim]:
        """Claim a kernel for one operation, or raise OperationInProgress.

        A kernel still held by a task after its operation is waited for, not
        refused: CRIU cannot dump a kernel whose memory is still coming back
        after a lazy restore, and a snapshot's images are kept a little after
        it is complete."""
        holding = self._holding_tasks.get(kernel_id)
        if holding is not None:
            await asyncio.wait({holding})  # its end, not its outcome (that is its own to report)
        if kernel_id in self._held:
            raise OperationInProgress(f"a snapshot or restore of kernel {kernel_id} is already running")
        self._held.add(kernel_id)
        claim = Claim(self, kernel_id)
        try:
            yield claim
        finally:
            if not claim.handed_over:
                claim.release()

    async def holding_tasks_done(self) -> None:
        """Wait for every task that holds a kernel (never cut a lazy restore's memory transfer short)."""
        if self._holding_tasks:
            await asyncio.gather(*self._holding_tasks.values(), return_exceptions=True)

    # -- restored kernels waiting for their clients ---------------------------------

    def reconnecting(self, kernel_id: str) -> None:
        self._reconnecting.add(kernel_id)

    def reconnected(self, kernel_id: str) -> None:
        self._reconnecting.discard(kernel_id)

    def settled(self, kernel_id: str) -> bool:
        """False while a restore of the kernel waits for its clients to reconnect."""
        return kernel_id not in self._reconnecting

    def forget(self, kernel_id: str) -> None:
        """The kernel was shut down or restarted: it comes from no snapshot now."""
        self.lineage.pop(kernel_id, None)
