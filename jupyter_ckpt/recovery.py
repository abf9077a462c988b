"""What a server that stops without warning (SIGKILL, a crash, the OOM killer)
leaves, and how the next start mends it.

- ``RunningKernels``: the server's kernels with their root pid, so that the next
  start finds the ones still running, orphaned (kernels outlive their server):
  each is snapshotted, then stopped, so that nothing it computed is lost.
- ``OperationJournal``: restores in place and forks in progress. A restore that
  was cut short has the kernel's previous state saved (it becomes a snapshot
  when no orphan is newer); a fork cut short leaves a network namespace whose
  processes are ended.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from .dirty_tracking import flatten
from .engine import CriuEngine
from .errors import CheckpointError
from .forknet import for_address
from .private_files import private_dir, write_private_atomic
from .records import SnapshotRecord, new_snapshot_id
from .store import SnapshotStore


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks after boot): tells a pid reused since."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int | None, started: int | None) -> bool:
    return bool(pid) and started is not None and start_time(pid) == started  # type: ignore[arg-type]


def stdio_keys(pid: int) -> dict[str, str]:
    """CRIU's names of the pipes a process writes its stdout and stderr to."""
    keys = {}
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:["):
            keys[name] = target
    return keys


def wait_untraced(pid: int, timeout: float = 120.0) -> bool:
    """Wait until no debugger holds the process: a criu still dumping it for the
    server that died finishes first (two dumps cannot seize one process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                tracer = next((line.split()[1] for line in f if line.startswith("TracerPid:")), "0")
        except OSError:
            return False
        if tracer == "0":
            return True
        time.sleep(0.05)
    return False


def find_kernel_init(kernel_id: str) -> int | None:
    """The pid 1 (tini) of a kernel's namespace, in this network namespace (a
    fork of the same kernel lives in its own), found by its command line."""
    wanted = f"kernel-{kernel_id}.json".encode()
    ours = os.stat("/proc/self/ns/net").st_ino
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            ours_too = os.stat(f"/proc/{entry}/ns/net").st_ino == ours
            if os.path.basename(argv[0]) == b"tini" and any(wanted in a for a in argv) and ours_too:
                return int(entry)
        except OSError:
            continue
    return None


def kill_and_wait(pid: int, started: int | None, timeout: float = 10.0) -> bool:
    """SIGKILL a process that is not our child (pid 1 of a kernel's namespace:
    the whole namespace goes) and wait until it is gone."""
    if not alive(pid, started):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid, started)


class RunningKernels:
    """kernel id -> what the next start needs of it (root pid and its start
    time, name, notebook, connection with its key: so the file is private)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()  # marks come from several worker threads

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if isinstance(data, list):  # written by an older version: ids only
            return {k: {} for k in data if isinstance(k, str)}
        return (
            {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)}
            if isinstance(data, dict)
            else {}
        )

    def mark(self, kernel_id: str, info: dict[str, Any] | None) -> None:
        """Remember a running kernel (``info``), or forget one (None)."""
        with self._lock:
            kernels = self._read()
            if info is None:
                kernels.pop(kernel_id, None)
            else:
                kernels[kernel_id] = info
            write_private_atomic(self.path, json.dumps(kernels).encode())

    def listed(self) -> dict[str, dict[str, Any]]:
        return self._read()

    def take(self) -> dict[str, dict[str, Any]]:
        """The kernels of the previous run, and forget them."""
        with self._lock:
            kernels = self._read()
            write_private_atomic(self.path, b"{}")
        return kernels


class OperationJournal:
    """One private file per restore or fork in progress, removed when it ends."""

    def __init__(self, directory: Path):
        self.dir = private_dir(directory)

    def _path(self, kind: str, kernel_id: str) -> Path:
        return self.dir / f"{kind}-{kernel_id}.json"

    def begin(self, kind: str, kernel_id: str, **entry: Any) -> None:
        write_private_atomic(
            self._path(kind, kernel_id), json.dumps({"kind": kind, "kernel_id": kernel_id, **entry}).encode()
        )

    def update(self, kind: str, kernel_id: str, **fields: Any) -> None:
        path = self._path(kind, kernel_id)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        write_private_atomic(path, json.dumps({**entry, **fields}).encode())

    def end(self, kind: str, kernel_id: str) -> None:
        self._path(kind, kernel_id).unlink(missing_ok=True)

    def take(self) -> list[dict[str, Any]]:
        """The operations a previous run left unfinished, and forget them."""
        entries = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            path.unlink(missing_ok=True)
        return entries


class PreviousRun:
    """Blocking steps of mending what a server that died left (the manager's
    ``mend_previous_run`` runs them in worker threads)."""

    def __init__(self, engine: CriuEngine, store: SnapshotStore):
        self.engine, self.store = engine, store

    def save_orphan(self, kernel_id: str, info: dict[str, Any]) -> dict[str, Any]:
        """Blocking. A kernel whose server died may still run: dump it into a
        snapshot of its own, then stop it (this server cannot reach it)."""
        pid, started = info.get("pid"), info.get("started")
        if not alive(pid, started):
            # Restored by a criu that finished after its server died: its pid
            # was never recorded. Its init names the kernel's connection file.
            pid = find_kernel_init(kernel_id)
            started = start_time(pid) if pid else None
        if not alive(pid, started):
            self._remove_fork_network(info)
            return {
                "kernel_id": kernel_id,
                "lost": True,
                "snapshot_id": None,
                "message": "it had stopped with the server; its latest snapshot, if any, is what remains",
            }
        record = SnapshotRecord(
            id=new_snapshot_id(),
            kernel_id=kernel_id,
            kernel_name=info.get("kernel_name", ""),
            path=info.get("path"),
            label="saved when the server restarted: it ran on after its server stopped",
            trigger="auto",
            status="dumping",
            stdio_keys=stdio_keys(pid),
            connection=info.get("connection") or {},
            criu_version=self.engine.health().version,
        )
        try:
            wait_untraced(pid)
            images = self.store.create(record)
            result = self.engine.dump(pid, images)
            record.memory_bytes, record.freeze_seconds = result.memory_bytes, round(result.freeze_seconds, 4)
            record = self.store.commit(record)
            outcome = {
                "kernel_id": kernel_id,
                "lost": False,
                "snapshot_id": record.id,
                "message": f"it ran on after its server stopped; saved as snapshot {record.id}, then stopped",
            }
        except CheckpointError as e:
            self.store.fail(record, str(e))
            outcome = {
                "kernel_id": kernel_id,
                "lost": True,
                "snapshot_id": None,
                "message": f"it ran on after its server stopped, and could not be saved ({e}); it was stopped",
            }
        kill_and_wait(pid, started)
        self._remove_fork_network(info)
        return outcome

    def _remove_fork_network(self, info: dict[str, Any]) -> None:
        """A fork's namespace ends with its kernel."""
        network = for_address((info.get("connection") or {}).get("ip", ""))
        if network is not None:
            self.engine.remove_network(network.name)

    def mend_operation(self, entry: dict[str, Any], saved: dict[str, str]) -> dict[str, Any] | None:
        """Blocking. One restore or fork the previous server did not finish."""
        kernel_id = entry.get("kernel_id", "")
        lazy = entry.get("lazy_pages") or {}
        kill_and_wait(lazy.get("pid"), lazy.get("started"))  # its kernel is saved or gone by now
        if entry.get("kind") == "fork":
            self.engine.remove_network(entry.get("netns", ""))
            return {
                "kernel_id": kernel_id,
                "lost": True,
                "snapshot_id": None,
                "message": f"restoring snapshot {entry.get('snapshot_id')} as this new kernel was cut short; removed",
            }
        if entry.get("kind") != "restore" or kernel_id in saved:
            return None  # the kernel itself was saved, newer than its state before the restore
        previous = Path(entry.get("previous_state") or "/nonexistent")
        if not (previous / "inventory.img").is_file() or not isinstance(entry.get("record"), dict):
            return None
        record = SnapshotRecord.from_json({**entry["record"], "id": new_snapshot_id(), "status": "dumping"})
        if (previous / "parent").is_symlink():  # saved as the pages written since a kept snapshot
            try:
                flatten(previous, (previous / "parent").resolve())
            except Exception as e:  # ParentMismatch, OSError, a pagemap that cannot be read
                return {
                    "kernel_id": kernel_id,
                    "lost": True,
                    "snapshot_id": None,
                    "message": f"restoring snapshot {entry.get('snapshot_id')} was cut short; its state before "
                    f"could not be made whole ({e})",
                }
        staging = self.store.create(record)
        staging.rmdir()
        previous.rename(staging)
        record = self.store.commit(record)
        return {
            "kernel_id": kernel_id,
            "lost": False,
            "snapshot_id": record.id,
            "message": f"restoring snapshot {entry.get('snapshot_id')} was cut short; its state before was saved as "
            f"snapshot {record.id}",
        }
