"""A kernel provisioner that starts kernels so that CRIU can dump and restore them.

Each kernel runs as::

    unshare --pid --fork --mount-proc  sh -c '<private /dev/shm>; exec setsid tini -g -- <kernel command>'

- its own pid namespace under an init (tini), so a restored tree gets a fresh
  namespace and never collides with a pid in use on the host;
- its own mount namespace whose /dev/shm is a tmpfs of its own: POSIX
  semaphores and shared memory (multiprocessing, joblib, SharedMemory) live
  there, so CRIU saves them with the tree (the tmpfs's files in the images,
  deleted ones as ghost files), a restore brings them back, and a fork gets its
  own copies instead of sharing the original's by name; its /proc shows its
  own pid namespace;
- ``setsid`` inside the namespace, since CRIU refuses a session leader that lives
  outside the dumped namespace;
- stdin from /dev/null (opened inside the mount namespace: CRIU can only
  restore files of mounts it sees there), stdout and stderr into pipes that the server reads and
  copies to its own output: CRIU cannot restore a regular file that grew since the
  dump, but it can re-attach a pipe (``--inherit-fd``), so kernel output keeps
  reaching the server log after a restore;
- no ``JPY_PARENT_PID``: ipykernel's parent poller would kill a restored kernel
  because its parent changed.

A kernel that comes from a snapshot (a fork, or a kernel started again after a
server restart to restore into) is started with ``start_kernel(ckpt_plan=
LaunchPlan(...))``. After a restore the kernel's root process is a child of the
server, adopted here through :meth:`adopt`, so interrupt, restart and shutdown
keep working exactly as before.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, List, Type, Unicode

from .credentials import KernelCredentials
from .errors import CheckpointError
from .forknet import ForkNetwork
from .kernel_tree import KernelStdio, KernelTree, ProcessOnDisk, RestoredProcess, RestoredTree

PLAN_ARGUMENT = "ckpt_plan"  # the start_kernel keyword that carries a LaunchPlan
ZMQ_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


@dataclass
class LaunchPlan:
    """How a kernel about to start comes from a snapshot.

    The kernel listens with the snapshot's ports and key (``connection``). With
    ``restore`` (a fork), the snapshot's tree is restored (blocking, in a worker
    thread) into ``network`` instead of launching the kernel's command; without
    it, the command is launched and the caller restores over it. A plan is used
    once: a later restart of the kernel starts it afresh.
    """

    snapshot_id: str
    connection: dict[str, Any]
    network: ForkNetwork | None = None
    restore: Callable[[], RestoredTree] | None = None
    used: bool = False
    hibernated: bool = False  # launch nothing: the kernel is on disk until it is woken (hibernation.py)


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
    private_shm = Bool(
        True,
        config=True,
        help="Give each kernel its own /dev/shm, saved and restored with it. Off: kernels share the host's "
        "/dev/shm, and a kernel with semaphores or shared memory there (worker pools) cannot be restored.",
    )
    helper_socket = Unicode(
        "",
        config=True,
        help="The jupyter-ckpt helper's socket, through which a server that is not root starts its kernels "
        "(set by the server extension).",
    )
    require_isolation = Bool(
        False,
        config=True,
        help="Fail to start a kernel when it cannot be isolated (unshare or tini missing), "
        "instead of starting it the stock way (then it cannot be snapshotted).",
    )

    server_url_file = Unicode(
        "",
        config=True,
        help="File holding the current URL of the server, for the magic in kernels (set by the server extension).",
    )
    credentials_secret_file = Unicode(
        "", config=True, help="The kernel credentials' secret (set by the server extension)."
    )
    credentials_class = Type(
        KernelCredentials, config=True, help="Issues the kernels' credentials (set by the server extension)."
    )

    tree: KernelTree | None = None
    not_checkpointable_reason: str = ""
    _swapping = False

    # -- launch -----------------------------------------------------------------

    _plan: LaunchPlan | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        plan = kwargs.pop(PLAN_ARGUMENT, None)
        self._plan = plan if plan is not None and not plan.used else None
        km = self.parent
        if self._plan is not None and km is not None:
            self._plan.used = True
            info = self._plan.connection
            # Listen where the snapshot's process listens, with its key: the
            # restored process replaces this one right after it starts.
            # (A fork listens elsewhere, at its namespace's address: launch_kernel
            # says so. jupyter_client only accepts local addresses here.)
            in_network = self._plan.restore or self._plan.network
            km.transport, km.ip = info["transport"], "127.0.0.1" if in_network else info["ip"]
            for name in ZMQ_PORTS:
                setattr(km, name, info[name])
            km.session.signature_scheme = info.get("signature_scheme", km.session.signature_scheme)
            km.session.key = info["key"].encode()
            self.ports_cached = True  # LocalProvisioner would pick new ports otherwise
        return await super().pre_launch(**kwargs)

    def _kernel_env(self, env: dict[str, str], kernel_id: str) -> dict[str, str]:
        """The variables through which the magic reaches this server as this kernel."""
        env = dict(env)
        env.pop("JPY_PARENT_PID", None)
        if self.server_url_file and self.credentials_secret_file and kernel_id:
            try:
                with open(self.server_url_file) as f:
                    url = f.read().strip()
            except OSError:
                url = ""
            credentials = self.credentials_class(self.credentials_secret_file)
            env.update(
                JUPYTER_CKPT_URL=url,
                JUPYTER_CKPT_URL_FILE=self.server_url_file,
                JUPYTER_CKPT_KERNEL_ID=kernel_id,
                JUPYTER_CKPT_KERNEL_TOKEN=credentials.token(kernel_id),
            )
        return env

    def _command_and_env(self, cmd: list[str], kwargs: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        """The kernel's command (with the magic for ipykernel) and environment."""
        kernel_id = kwargs.get("kernel_id") or getattr(self, "kernel_id", "")
        env = self._kernel_env(kwargs.get("env") or dict(os.environ), kernel_id)
        if "JUPYTER_CKPT_KERNEL_TOKEN" in env and any("ipykernel" in part for part in cmd):
            cmd = [*cmd, "--ext=jupyter_ckpt.magic"]
        return list(cmd), env

    def _isolation_commands(self) -> tuple[list[str] | None, str]:
        unshare, setsid, tini = shutil.which(self.unshare_path), shutil.which("setsid"), shutil.which(self.tini_path)
        missing = [n for n, p in (("unshare", unshare), ("setsid", setsid), ("tini", tini)) if not p]
        if missing:
            return None, f"the kernel was started without isolation: {', '.join(missing)} not found"
        init = [setsid, tini, *self.init_args, "--"]
        if not self.private_shm:
            return [unshare, "--pid", "--fork", *init], ""  # type:ignore[list-item]
        # sh is the namespace's pid 1 until it execs setsid, then tini.
        script = 'exec </dev/null && mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm && exec "$@"'
        # --mount-proc: a /proc of the kernel's own pid namespace, where
        # os.getpid() names the process itself (psutil, dask need that).
        isolate = [unshare, "--pid", "--fork", "--mount-proc", "--propagation", "private"]
        return [*isolate, "sh", "-c", script, "sh", *init], ""  # type:ignore[list-item]

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        plan, self._plan = self._plan, None
        if plan is not None and plan.restore is not None:
            return await self._launch_fork(plan, kwargs)
        if plan is not None and plan.hibernated:
            return self._list_hibernated(plan, kwargs)
        if self.helper_socket:
            return await self._launch_through_helper(cmd, kwargs)
        prefix, reason = self._isolation_commands()
        if prefix is None:
            if self.require_isolation:
                raise RuntimeError(reason)
            self.log.warning("jupyter_ckpt: %s; this kernel cannot be snapshotted", reason)
            self.not_checkpointable_reason = reason
            return await super().launch_kernel(cmd, **kwargs)

        cmd, env = self._command_and_env(cmd, kwargs)
        stdio = KernelStdio()
        # independent: jupyter_client then sets no JPY_PARENT_PID (see module doc).
        kwargs.update(
            env=env,
            independent=True,
            stdin=subprocess.DEVNULL,
            stdout=stdio.write_fds["stdout"],
            stderr=stdio.write_fds["stderr"],
        )
        try:
            info = await super().launch_kernel(prefix + list(cmd), **kwargs)
        finally:
            stdio.close_write_ends()
        self._set_tree(KernelTree(init_pid=await self._namespace_init(self.process.pid), stdio=stdio))
        return info

    async def _launch_through_helper(self, cmd: list[str], kwargs: dict[str, Any]) -> dict[str, Any]:
        """As this (not root) user, the helper makes the namespaces (helper.py)."""
        from .helper_client import HelperEngine

        cmd, env = self._command_and_env(cmd, kwargs)
        cwd = str(kwargs.get("cwd") or os.getcwd())
        if self.private_shm:
            # Temporary files and multiprocessing's sockets on the kernel's own tmpfs:
            # the helper restores those, not ones on the host's mounts (path_checks.py).
            env.setdefault("TMPDIR", "/dev/shm")
        stdio = KernelStdio()
        helper = HelperEngine(socket_path=self.helper_socket)
        try:
            pid = await asyncio.to_thread(
                helper.launch,
                list(cmd),
                env,
                cwd,
                stdio.write_fds["stdout"],
                stdio.write_fds["stderr"],
                self.private_shm,
            )
        except CheckpointError as e:
            # No helper (not running, not installed): the kernel still starts, the stock way.
            reason = f"the kernel was started without the helper, so it cannot be snapshotted: {e}"
            if self.require_isolation:
                raise RuntimeError(reason) from None
            self.log.warning("jupyter_ckpt: %s", reason)
            self.not_checkpointable_reason = reason
            return await super().launch_kernel(cmd, **kwargs)
        finally:
            stdio.close_write_ends()
        self.process = RestoredProcess(pid)
        self.pid = self.pgid = pid
        self.cwd = cwd
        self._set_tree(KernelTree(init_pid=pid, stdio=stdio))
        return self.connection_info

    async def _launch_fork(self, plan: LaunchPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Restore the snapshot's processes as this kernel's, in the fork's namespace."""
        assert plan.restore is not None and plan.network is not None
        tree = await asyncio.to_thread(plan.restore)
        self.adopt(tree.pid, tree.stdio, plan.snapshot_id, plan.network)
        self.cwd = kwargs.get("cwd") or os.getcwd()
        key = plan.connection["key"]
        return {**self.connection_info, **plan.connection, "ip": plan.network.kernel_address, "key": key.encode()}

    def _list_hibernated(self, plan: LaunchPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A hibernated kernel after a server restart: listed, with the
        snapshot's ports and key, but nothing runs until it is woken."""
        self.process = ProcessOnDisk()
        self.pid = self.pgid = 0
        self.cwd = kwargs.get("cwd") or os.getcwd()
        self._set_tree(KernelTree(init_pid=0, stdio=KernelStdio(pipes=False), restored_from=None, network=plan.network))
        self.hibernated = plan.snapshot_id
        info = {**self.connection_info, **plan.connection, "key": plan.connection["key"].encode()}
        if plan.network is not None:
            info["ip"] = plan.network.kernel_address
        return info

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
        if self._swapping or self.hibernated:
            return None  # being replaced by a restore, or on disk: not dead, whatever the old pid says
        return await super().poll()

    async def send_signal(self, signum: int) -> None:
        if self.hibernated:
            return  # nothing runs: an interrupt has nothing to stop
        if self.tree is None:
            return await super().send_signal(signum)
        if self.process is None or self.tree.init_pid <= 0:
            return  # no process (on disk): never a signal to a process group
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

    async def shutdown_requested(self, restart: bool = False) -> None:
        self.hibernated = None  # shut down or restarted without waking: its processes are gone already
        await super().shutdown_requested(restart=restart)

    async def kill(self, restart: bool = False) -> None:
        if self.hibernated:
            self.hibernated = None
            return
        await super().kill(restart=restart)

    async def terminate(self, restart: bool = False) -> None:
        if self.hibernated:
            self.hibernated = None
            return
        await super().terminate(restart=restart)

    # -- restore support (used by the checkpoint manager) -------------------------

    # The snapshot a hibernated kernel wakes from; its processes are gone and
    # the server sees it alive (hibernation.py).
    hibernated: str | None = None

    def _set_tree(self, tree: KernelTree) -> None:
        """The kernel's processes are now ``tree``'s: the tracking of the old
        ones' memory ends with them."""
        if self.tree is not None:
            self.tree.dirty.end()
        self.tree = tree

    def hibernate(self, snapshot_id: str) -> None:
        """Stop the kernel's processes (blocking), which ``snapshot_id`` holds."""
        assert self.tree is not None and not self.hibernated
        self.hibernated = snapshot_id  # first: the restarter must never see it dead
        self.kill_tree()
        self.reap_old()
        self.tree.init_pid = 0  # gone: its pid may be another process's from now on
        self.tree.dirty.end()

    def stop_processes(self) -> None:
        """Before a restore replaces them (blocking): none to stop if hibernated."""
        if not self.hibernated:
            self.kill_tree()
        self.reap_old()

    def kill_tree(self) -> None:
        # SIGKILL to pid 1 of the kernel's namespace ends every process in it.
        # Never 0 or less: those name process groups, the server's own among them.
        if self.tree is not None and self.tree.init_pid > 0:
            try:
                os.kill(self.tree.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # gone already (it died after its snapshot): what hibernation wants

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
        self._set_tree(KernelTree(init_pid=pid, stdio=stdio, restored_from=snapshot_id, network=network))
        self.hibernated = None

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
