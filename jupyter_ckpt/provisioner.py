"""A kernel provisioner that starts kernels so that CRIU can dump and restore them.

Each kernel runs as::

    unshare --pid --fork  setsid tini -g -- <kernel command>

- its own pid namespace under an init (tini), so a restored tree gets a fresh
  namespace and never collides with a pid in use on the host;
- ``setsid`` inside the namespace, since CRIU refuses a session leader that lives
  outside the dumped namespace;
- stdin from /dev/null, stdout and stderr into pipes that the server reads and
  copies to its own output: CRIU cannot restore a regular file that grew since the
  dump, but it can re-attach a pipe (``--inherit-fd``), so kernel output keeps
  reaching the server log after a restore;
- no ``JPY_PARENT_PID``: ipykernel's parent poller would kill a restored kernel
  because its parent changed.

After a restore the kernel's root process is a child of the server (CRIU's
``rst_sibling``), adopted here through :meth:`adopt`, so interrupt, restart and
shutdown keep working exactly as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, List, Unicode

from .forknet import ForkNetwork


def kernel_token(secret: bytes, kernel_id: str) -> str:
    """The credential of one kernel: valid for /api/ckpt/self/<that kernel> only."""
    return hmac.new(secret, f"jupyter-ckpt kernel {kernel_id}".encode(), hashlib.sha256).hexdigest()


def _copy_until_eof(src: int, dst: int) -> None:
    """Copy a kernel's output to the server's own fd, as a stock kernel writes there.

    Ends at EOF, when every process holding the pipe's write end is gone.
    """
    try:
        while chunk := os.read(src, 65536):
            try:
                while chunk:
                    chunk = chunk[os.write(dst, chunk):]
            except OSError:
                pass  # the server's output is gone; keep draining so the kernel never blocks
    finally:
        os.close(src)


class KernelStdio:
    """Pipes for a kernel's stdout and stderr, copied to the server's own streams."""

    def __init__(self) -> None:
        self.write_fds: dict[str, int] = {}
        self.keys: dict[str, str] = {}  # stream -> CRIU's name of the pipe
        for name, target_fd in (("stdout", 1), ("stderr", 2)):
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
    """The subset of ``subprocess.Popen`` that the provisioner uses, for a restored
    kernel: a child of this process that CRIU created, not ``Popen``."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
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
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


@dataclass
class KernelTree:
    """What CRIU needs to know of a running kernel."""

    init_pid: int  # host pid of the namespace's init: the root of the dump
    stdio: KernelStdio
    restored_from: str | None = None  # snapshot id, after a restore
    network: ForkNetwork | None = None  # a fork's own network namespace


@dataclass
class ForkPlan:
    """How to bring up a kernel from a snapshot instead of launching its command.

    ``restore`` (blocking, run in a worker thread) restores the snapshot's tree
    into ``network`` and returns its root pid and stdio; the kernel listens at
    ``network.kernel_address`` on the snapshot's ports, with the snapshot's key.
    """

    snapshot_id: str
    connection: dict[str, Any]
    network: ForkNetwork
    restore: Callable[[], tuple[int, KernelStdio]]


class CheckpointableProvisioner(LocalProvisioner):  # type:ignore[misc]
    """Starts kernels in their own pid namespace under tini, ready for CRIU."""

    unshare_path = Unicode("unshare", config=True, help="The util-linux unshare binary.")
    tini_path = Unicode("tini", config=True, help="The init that runs as pid 1 of each kernel's namespace.")
    init_args = List(
        Unicode(),
        ["-g"],
        config=True,
        help="Arguments to the init before '--'. '-g' forwards signals (interrupt) to the kernel's whole process group.",
    )
    require_isolation = Bool(
        False,
        config=True,
        help="Fail to start a kernel when it cannot be isolated (unshare or tini missing), "
        "instead of starting it the stock way (then it cannot be snapshotted).",
    )

    # Set by the server extension: where a kernel reaches its server, and the
    # secret its per-kernel credentials are derived from (see kernel_token).
    server_url: Any = staticmethod(lambda: "")  # read at each launch: the port may change at start-up
    server_url_file: str = ""  # where the current server's URL is kept, for kernels restored later
    token_secret: bytes = b""

    # kernel id -> connection info of a snapshot, for a kernel started again
    # to be restored into (recovery after a server restart).
    recovering: dict[str, dict[str, Any]] = {}
    # kernel id -> how to restore it, for a kernel that is a snapshot's fork.
    forking: dict[str, ForkPlan] = {}

    tree: KernelTree | None = None
    not_checkpointable_reason: str = ""
    _swapping = False

    # -- launch -----------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        fork = type(self).forking.get(self.kernel_id)
        info = fork.connection if fork else type(self).recovering.get(self.kernel_id)
        km = self.parent
        if info and km is not None:
            # Listen where the snapshot's process listens, with its key: the
            # restored process replaces this one right after it starts.
            # (A fork listens elsewhere, at its namespace's address: launch_kernel
            # says so. jupyter_client only accepts local addresses here.)
            km.transport, km.ip = info["transport"], "127.0.0.1" if fork else info["ip"]
            for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
                setattr(km, name, info[name])
            km.session.signature_scheme = info.get("signature_scheme", km.session.signature_scheme)
            km.session.key = info["key"].encode()
            self.ports_cached = True  # LocalProvisioner would pick new ports otherwise
        return await super().pre_launch(**kwargs)

    def _isolation_commands(self) -> tuple[list[str] | None, str]:
        unshare, setsid, tini = shutil.which(self.unshare_path), shutil.which("setsid"), shutil.which(self.tini_path)
        missing = [n for n, p in (("unshare", unshare), ("setsid", setsid), ("tini", tini)) if not p]
        if missing:
            return None, f"the kernel was started without isolation: {', '.join(missing)} not found"
        return [unshare, "--pid", "--fork", setsid, tini, *self.init_args, "--"], ""  # type:ignore[list-item]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        fork = type(self).forking.get(self.kernel_id)
        if fork is not None:
            return await self._launch_fork(fork, kwargs)
        prefix, reason = self._isolation_commands()
        if prefix is None:
            if self.require_isolation:
                raise RuntimeError(reason)
            self.log.warning("jupyter_ckpt: %s; this kernel cannot be snapshotted", reason)
            self.not_checkpointable_reason = reason
            return await super().launch_kernel(cmd, **kwargs)

        env = dict(kwargs.get("env") or os.environ)
        env.pop("JPY_PARENT_PID", None)
        kernel_id = kwargs.get("kernel_id") or getattr(self, "kernel_id", "")
        server_url = type(self).server_url()
        if server_url and self.token_secret and kernel_id:
            # A credential for this kernel's own snapshots only (the magic).
            env.update(
                JUPYTER_CKPT_URL=server_url,
                JUPYTER_CKPT_URL_FILE=self.server_url_file,
                JUPYTER_CKPT_KERNEL_ID=kernel_id,
                JUPYTER_CKPT_KERNEL_TOKEN=kernel_token(self.token_secret, kernel_id),
            )
            if any("ipykernel" in part for part in cmd):
                cmd = [*cmd, "--ext=jupyter_ckpt.magic"]
        stdio = KernelStdio()
        # independent: jupyter_client then sets no JPY_PARENT_PID (see module doc).
        kwargs.update(env=env, independent=True, stdin=subprocess.DEVNULL, stdout=stdio.write_fds["stdout"], stderr=stdio.write_fds["stderr"])
        try:
            info = await super().launch_kernel(prefix + list(cmd), **kwargs)
        finally:
            stdio.close_write_ends()
        self.tree = KernelTree(init_pid=await self._namespace_init(self.process.pid), stdio=stdio)
        return info

    async def _launch_fork(self, fork: ForkPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Restore the snapshot's processes as this kernel's, in the fork's namespace."""
        pid, stdio = await asyncio.to_thread(fork.restore)
        self.adopt(pid, stdio, fork.snapshot_id, fork.network)
        self.cwd = kwargs.get("cwd") or os.getcwd()
        key = fork.connection["key"]
        return {**self.connection_info, **fork.connection, "ip": fork.network.kernel_address, "key": key.encode()}

    async def _namespace_init(self, unshare_pid: int) -> int:
        """unshare forks the namespace's pid 1 (tini); that child is what CRIU dumps."""
        children = f"/proc/{unshare_pid}/task/{unshare_pid}/children"
        for _ in range(500):
            try:
                with open(children) as f:
                    pids = f.read().split()
            except OSError:
                pids = []
            if pids:
                return int(pids[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"kernel launcher exited with status {self.process.returncode}")
            await asyncio.sleep(0.01)
        raise RuntimeError("kernel launcher started no namespace init within 5 s")

    # -- process control ----------------------------------------------------------

    async def poll(self) -> int | None:
        if self._swapping:
            return None  # being replaced by a restore: not dead, whatever the old pid says
        return await super().poll()

    async def send_signal(self, signum: int) -> None:
        if self.tree is None:
            return await super().send_signal(signum)
        if self.process is None:
            return
        # tini (-g) forwards to the kernel's process group; SIGKILL to a
        # namespace's pid 1 ends every process in it.
        try:
            os.kill(self.tree.init_pid, signum)
        except ProcessLookupError:
            pass

    async def get_provisioner_info(self) -> dict:
        info = await super().get_provisioner_info()
        if self.tree is not None:
            info["init_pid"] = self.tree.init_pid
        return info

    # -- restore support (used by the checkpoint manager) -------------------------

    @property
    def checkpointable(self) -> bool:
        return self.tree is not None

    @contextmanager
    def swapping(self) -> Iterator[None]:
        """While the kernel's processes are being replaced, report it alive, so that
        the server's auto-restarter does not start a fresh kernel in between."""
        self._swapping = True
        try:
            yield
        finally:
            self._swapping = False

    def reap_old(self) -> None:
        """Wait (blocking) for the replaced processes to exit, so no zombie stays."""
        if self.process is not None:
            self.process.wait()

    def adopt(self, pid: int, stdio: KernelStdio, snapshot_id: str | None, network: ForkNetwork | None = None) -> None:
        """Take a restored tree (a child of this process) as this kernel's processes."""
        self.process = RestoredProcess(pid)
        self.pid = self.pgid = pid
        self.tree = KernelTree(init_pid=pid, stdio=stdio, restored_from=snapshot_id, network=network)

    @property
    def network(self) -> ForkNetwork | None:
        return self.tree.network if self.tree else None

    async def cleanup(self, restart: bool = False) -> None:
        # A fork's namespace ends with its processes; a restart launches the
        # kernel afresh, in the server's namespace.
        network = self.network
        if network is not None and self.tree is not None:
            self.tree.network = None
            await asyncio.to_thread(network.close)
            # The snapshot's ports were never taken from the port cache (the
            # original kernel holds them), and a restart needs fresh local ones.
            self.ports_cached = False
            km = self.parent
            if km is not None:
                km.ip = "127.0.0.1"
                km.cleanup_connection_file()
        await super().cleanup(restart=restart)
