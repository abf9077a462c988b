"""What the snapshot and restore flows (snapshots.py, restore.py, fork.py)
work with: built once by the manager, shared by all of them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .claims import KernelClaims
from .engine import CriuEngine
from .events import SnapshotEvents
from .kernels import ServerKernels
from .recovery import OperationJournal
from .store import SnapshotStore


@dataclass
class FlowParts:
    kernels: ServerKernels
    engine: CriuEngine
    store: SnapshotStore
    claims: KernelClaims
    events: SnapshotEvents
    journal: OperationJournal
    log: logging.Logger


class Flow:
    """Base of the flows: their parts as attributes."""

    def __init__(self, parts: FlowParts):
        self.kernels, self.engine, self.store = parts.kernels, parts.engine, parts.store
        self.claims, self.events, self.journal, self.log = parts.claims, parts.events, parts.journal, parts.log
