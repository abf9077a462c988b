"""Exceptions raised by the engine, the store and the checkpoint manager.

Each names what went wrong in words a notebook user can act on. The server layer
maps them to HTTP statuses in one place (handlers.py); the CLI to exit codes.
"""


class CheckpointError(Exception):
    """Base class of every error this package raises on purpose."""


class CriuUnavailable(CheckpointError):
    """CRIU is missing or unusable on this machine (binary, pycriu, privileges)."""


class DumpFailed(CheckpointError):
    """CRIU refused or failed to dump a kernel. The kernel keeps running."""


class DumpRefused(DumpFailed):
    """CRIU refused to dump a kernel, and its log says why."""


class RestoreFailed(CheckpointError):
    """CRIU failed to restore a snapshot."""


class SnapshotNotFound(CheckpointError):
    """No snapshot has this id."""


class SnapshotNotRestorable(CheckpointError):
    """The snapshot exists but cannot be restored (failed, incomplete, damaged)."""


class SnapshotIncompatible(SnapshotNotRestorable):
    """Files the snapshot's processes need are missing or differ on this machine."""

    SHOWN = 10  # a snapshot from another machine can differ in hundreds of libraries

    def __init__(self, snapshot_id: str, differences: list[str]):
        self.differences = differences
        more = len(differences) - self.SHOWN
        super().__init__(
            f"snapshot {snapshot_id} cannot be restored here: {len(differences)} "
            f"file{'s' if len(differences) != 1 else ''} it needs differ from the machine it was taken on "
            "(restore it where the same environment is installed at the same paths): "
            + "; ".join(differences[: self.SHOWN])
            + (f"; and {more} more" if more > 0 else "")
        )


class KernelNotFound(CheckpointError):
    """No running kernel has this id."""


class KernelNotCheckpointable(CheckpointError):
    """The kernel exists but was not started in a way CRIU can dump and restore."""


class OperationInProgress(CheckpointError):
    """Another snapshot or restore of the same kernel is running."""


class NotSupported(CheckpointError):
    """The request is valid but this server does not offer it (yet)."""


class WakeGaveWay(OperationInProgress):
    """A hibernated kernel was shut down or restarted while it was being woken."""


class InvalidRequest(CheckpointError):
    """The request itself is malformed (bad mode, bad label, ...)."""


class QuotaExceeded(CheckpointError):
    """The snapshot store holds as many bytes as its quota allows."""


class ImagesRefused(SnapshotNotRestorable):
    """The helper will not restore these images for this user (seal.py)."""


class NotPermitted(CheckpointError):
    """The helper refuses: what was asked is not the caller's (helper.py)."""
