"""A kernel's process tree as the server holds it: its stdio pipes, its root
process (launched, or created by a CRIU restore), and restoring one.

After a restore the kernel's root process is a child of the server (CRIU's
``rst_sibling``); ``RestoredProcess`` stands in for ``subprocess.Popen`` so the
provisioner can wait for, signal and reap it like a launched one.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .dirty_tracking import DirtyTracking
from .engine import CriuEngine, LazyPages
from .forknet import ForkNetwork


def _copy_until_eof(src: int, dst: int) -> None:
    """Copy a kernel's output to the server's own fd, as a stock kernel writes there.

    Ends at EOF, when every process holding the pipe's write end is gone.
    """
    try:
        while chunk := os.read(src, 65536):
            try:
                while chunk:
                    chunk = chunk[os.write(dst, chunk) :]
            except OSError:
                pass  # the server's output is gone; keep draining so the kernel never blocks
    finally:
        os.close(src)


class KernelStdio:
    """Pipes for a kernel's stdout and stderr, copied to the server's own streams."""

    def __init__(self, pipes: bool = True) -> None:
        self.write_fds: dict[str, int] = {}
        self.keys: dict[str, str] = {}  # stream -> CRIU's name of the pipe
        for name, target_fd in (("stdout", 1), ("stderr", 2)) if pipes else ():
            r, w = os.pipe()
            self.write_fds[name] = w
            self.keys[name] = f"pipe:[{os.fstat(w).st_ino}]"
            threading.Thread(target=_copy_until_eof, args=(r, target_fd), daemon=True, name=f"kernel-{name}").start()

    def close_write_ends(self) -> None:
        """Once the kernel holds them, the server must not: EOF comes when it dies."""
        for fd in self.write_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.write_fds = {}

    @contextmanager
    def inheritable(self) -> Iterator[None]:
        """Make the write ends inheritable for the duration of a CRIU restore."""
        for fd in self.write_fds.values():
            os.set_inheritable(fd, True)
        try:
            yield
        finally:
            for fd in self.write_fds.values():
                os.set_inheritable(fd, False)


class RestoredProcess:
    """The subset of ``subprocess.Popen`` that the provisioner uses, for a kernel
    root this process did not launch: one CRIU restored as our child, or one
    the helper (helper.py) started or restored as its own child. A child is
    waited for; another process is watched through a pidfd, which no reuse of
    its pid can confuse (its exit status is then not known: -SIGKILL)."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = None
        if not _is_child(pid):
            try:
                self._pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                self.returncode = -signal.SIGKILL

    def _reap(self, flags: int) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], 0 if flags & os.WNOHANG else None)
            if ready:
                os.close(self._pidfd)
                self._pidfd = None
                self.returncode = -signal.SIGKILL
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            self.returncode = -signal.SIGKILL  # already reaped elsewhere
        else:
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int | None:
        return self._reap(0)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            else:
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ProcessOnDisk:
    """The subset of ``subprocess.Popen`` for a hibernated kernel listed again
    after a server restart: no process runs; it is restored when used."""

    stdin = stdout = stderr = None
    pid = 0  # never signalled: every method below does nothing
    returncode = -signal.SIGKILL

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        pass

    kill = terminate = lambda self: None


def _is_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


@dataclass
class KernelTree:
    """What CRIU needs to know of a running kernel."""

    init_pid: int  # host pid of the namespace's init: the root of the dump
    stdio: KernelStdio
    restored_from: str | None = None  # snapshot id, after a restore
    network: ForkNetwork | None = None  # a fork's own network namespace
    dirty: DirtyTracking = field(default_factory=DirtyTracking)  # pages written since its last snapshot


@dataclass
class RestoredTree:
    pid: int  # host pid of the restored root (the namespace's init)
    stdio: KernelStdio
    seconds: float  # CRIU's restore
    lazy_pages: LazyPages | None = None  # still bringing the memory back


def restore_tree(
    engine: CriuEngine,
    images: Path,
    work: Path,
    stdio_keys: dict[str, str],
    netns: Path | None = None,
    lazy: bool = False,
    listener_moves: dict[int, tuple[str, int]] | None = None,
    owner: tuple[int, int, list[int]] | None = None,
    page_server: int | None = None,
) -> RestoredTree:
    """Restore the tree dumped in ``images`` (blocking), its stdout and stderr
    re-attached to fresh pipes copied to the server's output. ``page_server``:
    where the lazy pages come from (store_page_server), not the images."""
    stdio = KernelStdio()
    try:
        inherit = {key: stdio.write_fds[name] for name, key in stdio_keys.items() if name in stdio.write_fds}
        with stdio.inheritable():
            result = engine.restore(
                images,
                work_dir=work,
                inherit_fds=inherit,
                netns=netns,
                lazy=lazy,
                listener_moves=listener_moves or {},
                **({"owner": owner} if owner is not None else {}),
                **({"page_server": page_server} if page_server is not None else {}),
            )
    finally:
        stdio.close_write_ends()
    return RestoredTree(result.pid, stdio, result.seconds, result.lazy_pages)
