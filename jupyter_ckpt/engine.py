"""CRIU, driven through its RPC (``criu swrk``): pycriu's client, and a
connection of our own for dumps with dirty tracking, whose notifications
pycriu cannot answer.

Knows processes and image directories, nothing of Jupyter: the CLI and the tests
use it directly. Every call blocks; the server runs them in a worker thread.
"""

from __future__ import annotations

import array
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import refusals
from .criu_images import allow_resized_files, close_outside_connections, move_listeners, prune_absent_mounts
from .dirty_tracking import DirtyTracking
from .errors import CriuUnavailable, DumpFailed, DumpRefused, RestoreFailed
from .forknet import ForkNetwork
from .page_layout import PAGE

# Oldest CRIU known to work on current kernels: 3.17 cannot read the vDSO layout
# of Linux >= 6.16 and 4.1 fails on every TCP socket there.
MIN_CRIU_VERSION = (4, 2)

# Files a restored kernel may find grown: IPython's history database.
DEFAULT_RESIZABLE_FILES = ("*/history.sqlite", "*/history.sqlite-journal", "*/history.sqlite-wal")

DUMP_LOG = "dump.log"
DUMP_LOG_LEVEL = 3  # CRIU's info level: see CriuEngine.dump
# CRIU's key for a kernel's network namespace when it is not the server's (a
# fork's): dumped as external, handed back on restore as an open namespace file.
NETNS_KEY = "jupyter-ckpt-netns"
RESTORE_LOG = "restore.log"
GHOST_LIMIT = 0xFFFFFFFF  # the largest CRIU's RPC takes (4 GiB)
LAZY_PAGES_LOG = "lazy-pages.log"
LAZY_PAGES_SOCKET = "lazy-pages.socket"  # where `criu lazy-pages` waits for the restore, in the work dir

NO_ERROR_LINE = "CRIU failed without an error line in its log"
_ERROR_LINE = re.compile(r"Error \([^)]*\):\s*(.*)")
# Printed on every run where criu cannot raise its own fd limit: not a cause.
_HARMLESS = ("Can't setup RLIMIT_NOFILE",)


@dataclass
class CriuHealth:
    """Whether CRIU can be used here, and if not, why (shown to users as is)."""

    available: bool
    version: str | None = None
    path: str | None = None
    reason: str = ""
    lazy_pages: bool = False  # userfaultfd as CRIU's lazy restore needs it (uffd-noncoop)
    # What tells CRIU the pages written since the last dump (dirty_tracking.py):
    # "soft-dirty", "userfaultfd" (write-protect, our patch 0004) or "none".
    dirty_tracking: str = "none"


@dataclass
class DumpResult:
    freeze_seconds: float  # how long the process tree was frozen
    total_seconds: float  # the whole dump, freeze included
    memory_bytes: int  # memory pages written to the images
    parent_bytes: int = 0  # memory left in the parent images (not written since it was dumped)


@dataclass
class RestoreResult:
    pid: int  # host pid of the restored root process
    seconds: float
    lazy_pages: LazyPages | None = None  # still bringing the memory back


class LazyPages:
    """A `criu lazy-pages` daemon serving a restored tree's memory from the
    images: on first touch (userfaultfd) and in the background until all of it
    is back, when the daemon exits. The images must stay until then."""

    def __init__(
        self, criu_path: str, images_dir: Path, work_dir: Path, log_level: int, page_server: int | None = None
    ):
        """``page_server``: a connected socket to take the lazy pages from
        (store_page_server) instead of the images' pages files."""
        self.work_dir = work_dir
        remote = ["--page-server", "--ps-socket", str(page_server)] if page_server is not None else []
        self.process = subprocess.Popen(
            [
                criu_path,
                "lazy-pages",
                "-D",
                str(images_dir),
                "-W",
                str(work_dir),
                "-o",
                LAZY_PAGES_LOG,
                f"-v{log_level}",
                *remote,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=() if page_server is None else (page_server,),
            start_new_session=True,  # a server stopping with Ctrl-C must not cut a kernel's memory short
        )
        deadline = time.monotonic() + 10
        while not (work_dir / LAZY_PAGES_SOCKET).exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RestoreFailed(f"criu lazy-pages did not start: {errors_from_log(work_dir / LAZY_PAGES_LOG)}")
            time.sleep(0.01)

    def wait(self) -> None:
        """Until all of the memory is back; RestoreFailed if the daemon failed
        (the tree's memory is then incomplete)."""
        if self.process.wait() != 0:
            raise RestoreFailed(
                f"bringing back the kernel's memory failed: {errors_from_log(self.work_dir / LAZY_PAGES_LOG)}"
            )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def errors_from_log(log_path: Path, limit: int = 3) -> str:
    """CRIU's own reasons, from its log: pycriu only ever says 'Error(0): Unknown'."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return f"CRIU wrote no log at {log_path}"
    reasons: list[str] = []
    for line in lines:
        m = _ERROR_LINE.search(line)
        reason = m.group(1).strip() if m else ""
        if reason and reason not in reasons and not any(h in reason for h in _HARMLESS):
            reasons.append(reason)
    if not reasons:
        return NO_ERROR_LINE
    # The first errors are the cause; later ones are the unwinding.
    return "; ".join(reasons[:limit])


class CriuEngine:
    """Dump and restore process trees with CRIU.

    ``criu_path`` is the binary to run; by default the first ``criu`` on PATH or
    in /usr/local/sbin and /usr/sbin (where set-up installs it).
    """

    def __init__(
        self,
        criu_path: str | None = None,
        log_level: int = 4,
        resizable_files: tuple[str, ...] = DEFAULT_RESIZABLE_FILES,
        restore_no_symlinks: bool = False,
    ):
        self.criu_path = criu_path or _find_criu()
        # For images of a less privileged user (helper.py): CRIU opens restored
        # files without following symlinks (patches/criu/0002).
        self.restore_no_symlinks = restore_no_symlinks
        self.log_level = log_level
        self.resizable_files = tuple(resizable_files)
        self._health: CriuHealth | None = None

    # -- health -----------------------------------------------------------------

    def health(self, refresh: bool = False) -> CriuHealth:
        if self._health is None or refresh:
            self._health = self._check()
        return self._health

    def require(self) -> None:
        """Raise CriuUnavailable with the reason unless CRIU is usable."""
        h = self.health()
        if not h.available:
            raise CriuUnavailable(h.reason)

    def _check(self) -> CriuHealth:
        path = self.criu_path
        if not path or not os.path.exists(path):
            return CriuHealth(False, path=path, reason=f"CRIU is not installed (no criu binary at {path or 'PATH'})")
        try:
            import pycriu  # noqa: F401
        except ImportError as e:
            return CriuHealth(False, path=path, reason=f"pycriu cannot be imported: {e}")
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except OSError as e:
            return CriuHealth(False, path=path, reason=f"{path} cannot run: {e}")
        m = re.search(r"Version:\s*(\S+)", out.stdout)
        version = m.group(1) if m else None
        if not version or parse_version(version) < MIN_CRIU_VERSION:
            need = ".".join(map(str, MIN_CRIU_VERSION))
            return CriuHealth(
                False, version, path, f"CRIU {version or '?'} at {path} is too old; {need} or newer is needed"
            )
        if os.geteuid() != 0:
            return CriuHealth(False, version, path, "CRIU needs root: the Jupyter server is not running as root")
        chk = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
        if chk.returncode != 0:
            detail = (chk.stderr or chk.stdout).strip().splitlines()[-1:] or ["no output"]
            return CriuHealth(False, version, path, f"'criu check' fails: {detail[0]}")
        if self.restore_no_symlinks and not _has_restore_patches(path):
            return CriuHealth(
                False,
                version,
                path,
                f"{path} lacks our restore patches 0002 and 0003 (scripts/install-criu.sh adds them)",
            )

        def has(feature: str) -> bool:
            return (
                subprocess.run([path, "check", "--feature", feature], capture_output=True, timeout=60).returncode == 0
            )

        dirty = "soft-dirty" if has("mem_dirty_track") else "userfaultfd" if has("uffd_wp_dirty_track") else "none"
        if os.sysconf("SC_PAGE_SIZE") != PAGE:  # the store's page layout, and flatten's, are 4 KiB pages
            dirty = "none"
        return CriuHealth(True, version, path, lazy_pages=has("uffd-noncoop"), dirty_tracking=dirty)

    # -- dump and restore -------------------------------------------------------

    @contextmanager
    def _rpc(self, images_dir: Path, log_dir: Path, log_file: str, log_level: int | None = None) -> Iterator[Any]:
        """A CRIU RPC client with the images and log directories open for it."""
        import pycriu

        fds = [os.open(images_dir, os.O_DIRECTORY)]
        try:
            c = pycriu.criu()
            c.use_binary(self.criu_path)
            c.opts.images_dir_fd = fds[0]
            if log_dir != images_dir:
                fds.append(os.open(log_dir, os.O_DIRECTORY))
                c.opts.work_dir_fd = fds[1]
            c.opts.log_file = log_file
            c.opts.log_level = self.log_level if log_level is None else log_level
            yield c
        finally:
            for fd in fds:
                os.close(fd)

    def dump(
        self,
        pid: int,
        images_dir: Path,
        *,
        external: tuple[str, ...] = (),
        tracking: DirtyTracking | None = None,
        parent: Path | None = None,
    ) -> DumpResult:
        """Dump the process tree rooted at ``pid`` into ``images_dir``; the tree
        resumes afterwards, and also when the dump fails.

        ``tracking``: track the pages written from this dump on (and keep what
        CRIU hands over for it); with ``parent``, the images of the dump the
        tracking counts from, only the pages written since are saved, the rest
        left as holes in ``parent`` (dirty_tracking.flatten fills them).

        Always leave-running: a dump that kills its tree keeps CRIU's nftables
        lock on the tree's TCP connections (it expects a restore of the same
        images to lift it), so their peers, the server's ZMQ sockets among them,
        would never see them close. To stop a tree, dump it, then kill it.
        """
        # CRIU's debug lines (one for every run of pages) are written while the
        # tree is frozen: a dump logs at most CRIU's info level, and one CRIU
        # refused is run again with them, to explain it (a transient refusal
        # then passes). Not one whose criu died (killed, out of memory): that
        # fails as it is. Some processes' tracking may have been reset by the
        # first run and others not: the second is a full dump.
        quiet = min(self.log_level, DUMP_LOG_LEVEL)
        if tracking is not None:
            tracking.counted_from = None  # from now on it counts from this dump, which its caller names
        try:
            return self._dump(pid, images_dir, external, tracking, parent, quiet)
        except DumpRefused:
            if quiet >= self.log_level:
                raise
        for image in images_dir.iterdir():
            image.unlink()
        return self._dump(pid, images_dir, external, tracking, None, self.log_level)

    def _dump(
        self,
        pid: int,
        images_dir: Path,
        external: tuple[str, ...],
        tracking: DirtyTracking | None,
        parent: Path | None,
        log_level: int,
    ) -> DumpResult:
        import pycriu

        self.require()
        started = time.monotonic()
        with self._rpc(images_dir, images_dir, DUMP_LOG, log_level) as c:
            c.opts.pid = pid
            c.opts.leave_running = True
            # The server's ZMQ connections to the kernel: dumped, then closed on
            # restore, after which ZMQ reconnects by itself.
            c.opts.tcp_established = True
            c.opts.network_lock = pycriu.rpc.NFTABLES  # no iptables binary on Debian 12+
            # A connection still in a listener's accept queue (user code's
            # server, say) is dropped; its client sees a reset and retries.
            c.opts.tcp_skip_in_flight = True
            c.opts.external.extend(external)
            # Worker pools (multiprocessing, joblib) keep semaphores whose name
            # glibc removed while another name of the same file lives on: CRIU
            # links such a file back under a temporary name for the dump. The
            # tree's own /dev/shm (see provisioner) is saved with the tree; the
            # other mounts of its namespace are the host's, named as external.
            c.opts.link_remap = True
            c.opts.auto_ext_mnt = True
            # Deleted files still open or mapped (unlinked shared memory) are
            # copied into the images; CRIU's default stops at 1 MiB.
            c.opts.ghost_limit = GHOST_LIMIT
            # Processes holding file locks (dask's worker directories, sqlite)
            # can be dumped; their locks are not taken again on restore.
            c.opts.file_locks = True
            netns = _foreign_netns(pid)
            if netns is not None:
                c.opts.external.append(f"net[{netns}]:{NETNS_KEY}")
            if tracking is not None and self.health().dirty_tracking != "none":
                c.opts.track_mem = True
                if parent is not None:
                    c.opts.parent_img = str(parent)
            try:
                if c.opts.track_mem:
                    self._dump_tracking(c.opts, tracking)
                else:
                    c.dump()
            except BaseException as e:
                # A criu that died half-way (killed, out of memory) leaves its
                # network lock: the kernel's connections would hang for good.
                remove_network_lock(images_dir / DUMP_LOG, pid)
                if not isinstance(e, Exception):
                    raise
                reason = errors_from_log(images_dir / DUMP_LOG)
                failure: type[DumpFailed] = DumpFailed
                if reason == NO_ERROR_LINE or not isinstance(e, pycriu.CRIUException):
                    reason = f"criu stopped during the dump without saying why (was it killed?): {type(e).__name__} {e}"
                else:
                    # The tree runs on after a refused dump: the process that holds
                    # what CRIU refused can be named.
                    failure = DumpRefused
                    log_text = (images_dir / DUMP_LOG).read_text(errors="replace")
                    explained = refusals.explain(log_text, pid)
                    if explained:
                        reason = f"{explained} (CRIU: {reason})"
                if _nearly_full(images_dir):
                    # CRIU's own log is on that disk too: its words may be cut short.
                    reason = f"no space left on the disk of {images_dir} ({reason})"
                    failure = DumpFailed
                raise failure(reason) from None
        allow_resized_files(images_dir, self.resizable_files)
        total = time.monotonic() - started
        stats = _load_stats(images_dir / "stats-dump", "dump")
        freeze = (stats.get("freezing_time", 0) + stats.get("frozen_time", 0)) / 1e6
        page = os.sysconf("SC_PAGE_SIZE")
        return DumpResult(
            freeze_seconds=freeze or total,
            total_seconds=total,
            memory_bytes=stats.get("pages_written", 0) * page,
            parent_bytes=stats.get("pages_skipped_parent", 0) * page,
        )

    def _dump_tracking(self, opts: Any, tracking: DirtyTracking) -> None:
        """A dump with dirty tracking, over a ``criu swrk`` of our own: CRIU
        notifies its action scripts (pycriu cannot answer those) and hands over
        each process's userfaultfd in a "dirty-track" notification; the ones
        kept from the previous dump go back to it as inherit fds."""
        import pycriu

        req = pycriu.rpc.criu_req(type=pycriu.rpc.DUMP)
        req.opts.MergeFrom(opts)
        req.opts.notify_scripts = True
        kept = tracking.pass_back()  # copies, closed below
        for pid, fd in kept.items():
            req.opts.inherit_fd.add(key=f"uffd-wp[{pid}]", fd=fd)
        ours, criu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        resp, data, swrk = pycriu.rpc.criu_resp(), b"", None
        try:
            with criu_end:
                swrk = subprocess.Popen(
                    [self.criu_path or "criu", "swrk", str(criu_end.fileno())],
                    pass_fds=[criu_end.fileno(), *kept.values()],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            ours.send(req.SerializeToString())
            while True:
                data, fds = _receive(ours)
                resp = pycriu.rpc.criu_resp()
                resp.ParseFromString(data)
                if resp.type != pycriu.rpc.NOTIFY:
                    break
                if resp.notify.script == "dirty-track" and fds:
                    tracking.take(resp.notify.pid, fds.pop(0))
                for fd in fds:
                    os.close(fd)
                ours.send(pycriu.rpc.criu_req(type=pycriu.rpc.NOTIFY, notify_success=True).SerializeToString())
        except OSError as e:
            raise pycriu.CRIUExceptionInternal(pycriu.rpc.DUMP, str(e)) from None
        finally:
            # Closed before waiting: a criu still waiting for an answer (we
            # failed half-way) then fails its dump, and lets the tree go on.
            ours.close()
            if swrk is not None:
                swrk.wait()
            for fd in kept.values():
                os.close(fd)
        if not data:  # criu died (killed, out of memory) before it answered
            raise pycriu.CRIUExceptionInternal(pycriu.rpc.DUMP, "criu closed its connection")
        if not resp.success:
            raise pycriu.CRIUExceptionExternal(pycriu.rpc.DUMP, resp.type, resp.cr_errno)
        tracking.prune(set(refusals.tree_pids(opts.pid)))  # the processes that exited since

    def remove_network_lock(self, dump_log: Path, pid: int | None = None) -> bool:
        """Lift the network lock of a dump whose criu died (see the function)."""
        return remove_network_lock(dump_log, pid)

    def create_network(self, outbound: str = "nat") -> ForkNetwork:
        """A network namespace for a fork (forknet)."""
        return ForkNetwork.create(outbound)

    def remove_network(self, name: str) -> bool:
        """End a fork namespace's processes and remove it; False if ``name`` is not one."""
        return ForkNetwork.remove(name)

    def check_restorable(self, images_dir: Path) -> None:
        """Raise what would refuse a restore of ``images_dir`` before anything
        is touched. As root, CRIU restores whatever its images hold: nothing
        to check beyond the store's verification and the machine's files."""

    def restore(
        self,
        images_dir: Path,
        *,
        work_dir: Path,
        inherit_fds: Mapping[str, int] = {},
        netns: Path | None = None,
        lazy: bool = False,
        listener_moves: Mapping[int, tuple[str, int]] = {},
        owner: tuple[int, int, list[int]] | None = None,
        page_server: int | None = None,
    ) -> RestoreResult:
        """Restore the tree dumped in ``images_dir`` as a child of this process.

        ``inherit_fds`` maps CRIU's name of an external resource (``pipe:[1234]``,
        ``socket:[5678]``) to an inheritable fd of this process that takes its place.
        ``netns`` is a network namespace file to restore the tree into; without
        it, the tree lands in this process's namespace. The log goes to ``work_dir``.
        ``listener_moves``: TCP listeners to rebind elsewhere (move_listeners).
        ``owner`` (uid, gid, groups; with restore_no_symlinks): CRIU opens the
        restored files with these file-system credentials (patches/criu/0003).
        ``lazy`` (where health().lazy_pages): the tree runs before its memory is
        all back; the result's ``lazy_pages`` brings in the rest, and the
        images must stay until its ``wait()`` returns. ``page_server`` (with
        ``lazy``): a socket the lazy pages come from (store_page_server).
        """
        import pycriu

        self.require()
        started = time.monotonic()
        lazy_pages = LazyPages(self.criu_path, images_dir, work_dir, self.log_level, page_server) if lazy else None
        with self._rpc(images_dir, work_dir, RESTORE_LOG) as c:
            c.opts.lazy_pages = lazy
            # Connections inside the tree come back established; those to
            # outside it were turned into closed sockets (criu_images).
            c.opts.tcp_established = True
            c.opts.network_lock = pycriu.rpc.NFTABLES
            # File locks are not taken again (no file_locks here): CRIU would
            # wait without end for a lock another process took since the dump,
            # with the kernel already stopped.
            if self.restore_no_symlinks:
                c.opts.restore_no_symlinks = True
                if owner is not None:
                    c.opts.restore_fs_uid, c.opts.restore_fs_gid = owner[0], owner[1]
                    c.opts.restore_fs_groups.extend(owner[2])
            close_outside_connections(images_dir)
            if listener_moves:
                move_listeners(images_dir, listener_moves)
            # The restored root becomes our child, so we can wait for it and
            # reap it like any kernel we launched.
            c.opts.rst_sibling = True
            if carries_mount_namespace(images_dir):
                # The tree had its own mount namespace (a private /dev/shm):
                # CRIU rebuilds it over this machine's root, the host's mounts
                # bound back as the external mounts they were dumped as.
                c.opts.root = "/"
                c.opts.auto_ext_mnt = True
                prune_absent_mounts(images_dir)
            netns_fd = None
            if netns is not None:
                # Join it whether the images name the namespace as external (a
                # dumped fork) or do not mention it (a kernel of the server's).
                netns_fd = os.open(netns, os.O_RDONLY)
                os.set_inheritable(netns_fd, True)
                inherit_fds = {**inherit_fds, NETNS_KEY: netns_fd}
                join = c.opts.join_ns.add()
                join.ns = "net"
                join.ns_file = str(netns)
            for key, fd in inherit_fds.items():
                entry = c.opts.inherit_fd.add()
                entry.key = key
                entry.fd = fd
            try:
                resp = c.restore()
            except pycriu.CRIUException as e:
                if lazy_pages is not None:
                    lazy_pages.kill()
                reason = errors_from_log(work_dir / RESTORE_LOG)
                if reason == NO_ERROR_LINE:
                    reason = f"criu stopped during the restore without saying why (was it killed?): {e}"
                raise RestoreFailed(reason) from None
            finally:
                if netns_fd is not None:
                    os.close(netns_fd)
        return RestoreResult(pid=resp.pid, seconds=time.monotonic() - started, lazy_pages=lazy_pages)


def _nearly_full(path: Path, margin: int = 4 << 20) -> bool:
    """Whether the filesystem of ``path`` has less than ``margin`` bytes free."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def _has_restore_patches(path: str) -> bool:
    """Whether this CRIU (and its pycriu) carry patches/criu/0002 and 0003."""
    import pycriu

    fields = pycriu.rpc.criu_opts.DESCRIPTOR.fields_by_name
    help_text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    return "--restore-no-symlinks" in help_text and "restore_fs_uid" in fields


def carries_mount_namespace(images_dir: Path) -> bool:
    """Whether a dump holds a mount namespace of the tree's own."""
    return any(images_dir.glob("mountpoints-*.img"))


_RUN_ID = re.compile(r"CRIU run id = ([0-9a-f-]{36})")


def remove_network_lock(log_path: Path, pid: int | None = None) -> bool:
    """Remove the nftables table a criu run locked the network with, if it is
    still there (criu removes it itself unless it dies first). The run is
    named in its log; ``pid``, if alive, tells the network namespace."""
    try:
        # criu swrk logs its process's run id, then the one of the request:
        # the table is named by the last.
        match = ([None] + list(_RUN_ID.finditer(log_path.read_text(errors="replace"))))[-1]
    except OSError:
        return False
    if not match:
        return False
    # CRIU writes "inet CRIU-<run id>" into 32 bytes: the name is cut short.
    table = f"inet CRIU-{match.group(1)}"[:31].split()[1]
    command = ["nft", "delete", "table", "inet", table]
    if pid is not None and _foreign_netns(pid) is not None:
        command = ["nsenter", f"--net=/proc/{pid}/ns/net", *command]
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _foreign_netns(pid: int) -> int | None:
    """The inode of ``pid``'s network namespace if it is not this process's."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
        ours = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return theirs if theirs != ours else None


def _find_criu() -> str | None:
    found = shutil.which("criu")
    if found:
        return found
    for candidate in ("/usr/local/sbin/criu", "/usr/sbin/criu"):
        if os.path.exists(candidate):
            return candidate
    return None


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message of CRIU's and the fds it carries (close-on-exec)."""
    size = len(sock.recv(1, socket.MSG_PEEK | socket.MSG_TRUNC))
    data, ancillary, _, _ = sock.recvmsg(max(size, 1), socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _load_stats(path: Path, kind: str) -> dict:
    import pycriu

    try:
        with open(path, "rb") as f:
            return pycriu.images.load(f)["entries"][0][kind]
    except Exception:  # stats are informative; a missing one must not fail a dump
        return {}
