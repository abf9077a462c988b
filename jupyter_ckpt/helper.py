"""jupyter-ckpt-helper: the small root service through which Jupyter servers
that are not root launch, dump and restore their own kernels.

CRIU needs root to dump and restore, and a pid namespace needs root to make.
Rather than give users a CRIU they could point at anyone's process, one
daemon runs as root and listens on a unix socket that every local user may
connect to. It knows each caller by the kernel's word (``SO_PEERCRED``), and:

- launches a kernel command only as the caller, in a fresh pid and mount
  namespace (launcher.py);
- dumps a process tree only if every process in it runs as the caller (real,
  effective, saved and filesystem ids), and again checks the credentials CRIU
  wrote, since a process could have executed a setuid program meanwhile;
- writes the images into a directory the caller owns and passed to it open,
  sealed for the caller (seal.py);
- restores only images whose seal verifies for the caller, copied first where
  the caller cannot change them, whose credentials are the caller's, into the
  caller's own fork namespaces, with listeners moved only to unprivileged ports;
  CRIU opens the restored files as the caller, and what it would create by path
  as root on the host's mounts is refused (path_checks.py);
- makes and removes fork network namespaces, each for the user who asked.

Its modules: this one (the socket and the requests), helper_callers.py (who
calls, and what of theirs it may act on), helper_images.py (images between the
caller's folders and the helper's).

What it never does: act on a path the caller names (directories come as open
file descriptors), run anything of the caller's as root, or restore images it
did not seal with its key.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import seal as sealing
from .engine import CriuEngine
from .errors import CheckpointError, DumpFailed, InvalidRequest, RestoreFailed
from .errors import NotPermitted as Refused
from .forknet import ForkNetwork
from .helper_callers import Caller, cgroup_of, check_files, processes_not_of, require_same_namespaces
from .helper_client import DEFAULT_SOCKET, receive, send
from .helper_images import hand_over, require_own_directory, take_over
from .path_checks import unsafe_paths

log = logging.getLogger("jupyter_ckpt.helper")
DEFAULT_STATE_DIR = "/var/lib/jupyter-ckpt"


@dataclass
class HelperSettings:
    socket_path: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR  # the key and the work directories, root's only
    key_file: str = ""  # default: <state_dir>/helper.key, made on first start
    criu_path: str | None = None
    tini_path: str = "tini"
    socket_group: str = ""  # only this group may connect (default: every local user)
    requests_per_user: int = 4  # at once
    connections_per_user: int = 16  # open at once (requests waiting for a slot included)
    forks_per_user: int = 32  # fork network namespaces
    request_timeout: float = 30.0  # seconds a connection has to send its request


@dataclass
class Helper:
    settings: HelperSettings
    engine: CriuEngine = field(default_factory=CriuEngine)
    key: bytes = b""
    networks: dict[str, int] = field(default_factory=dict)  # fork namespace -> the uid it was made for
    busy: dict[int, int] = field(default_factory=dict)  # uid -> requests running
    connections: dict[int, int] = field(default_factory=dict)  # uid -> connections open
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        state = Path(self.settings.state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state, 0o700)
        (state / "work").mkdir(mode=0o700, exist_ok=True)
        key_path = Path(self.settings.key_file or state / "helper.key")
        if not key_path.exists():
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        if key_path.stat().st_mode & 0o077:
            raise SystemExit(f"jupyter-ckpt-helper: {key_path} must be readable by root only (chmod 600)")
        self.key = key_path.read_text().strip().encode()
        self.work = state / "work"
        self.state = state
        self._load_networks()
        for leftover in self.work.iterdir():  # a helper that stopped mid-request
            shutil.rmtree(leftover, ignore_errors=True)

    # -- serving ------------------------------------------------------------------

    def serve(self) -> None:
        path = Path(self.settings.socket_path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(str(path))
        if self.settings.socket_group:
            os.chown(path, 0, grp.getgrnam(self.settings.socket_group).gr_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o666)  # who the caller is comes from SO_PEERCRED, not the file's mode
        server.listen(64)
        log.info("jupyter-ckpt-helper: listening on %s (CRIU %s)", path, self.engine.health().version)
        while True:
            try:
                conn, _ = server.accept()
            except OSError as e:  # out of file descriptors, say: go on serving
                log.warning("jupyter-ckpt-helper: cannot accept a connection: %s", e)
                time.sleep(0.1)
                continue
            try:
                caller = Caller.of(conn)
            except OSError:
                conn.close()
                continue
            with self.lock:
                open_now = self.connections.get(caller.uid, 0)
                if open_now < self.settings.connections_per_user:
                    self.connections[caller.uid] = open_now + 1
            if open_now >= self.settings.connections_per_user:
                log.warning("jupyter-ckpt-helper: uid %d has %d connections open: refused", caller.uid, open_now)
                conn.close()
                continue
            threading.Thread(target=self.handle, args=(conn, caller), daemon=True).start()

    def handle(self, conn: socket.socket, caller: Caller) -> None:
        fds: list[int] = []
        try:
            # A request arrives at once; a connection that sends none must not hold a thread.
            conn.settimeout(self.settings.request_timeout)
            message, fds = receive(conn)
            conn.settimeout(None)
            op = str(message.get("op"))
            handler: Callable[..., dict] | None = getattr(self, f"op_{op}", None)
            started = time.monotonic()
            try:
                if handler is None:
                    raise InvalidRequest(f"the helper does not know the request {op!r}")
                require_same_namespaces(caller)
                with self._slot(caller):
                    answer = {"ok": True, **handler(caller, message, fds)}
            except CheckpointError as e:
                answer = {"ok": False, "error": str(e), "error_type": type(e).__name__}
            except Exception as e:  # a bug must not end the daemon, and the caller must hear of it
                log.exception("jupyter-ckpt-helper: %s for uid %d failed", op, caller.uid)
                answer = {"ok": False, "error": f"the helper failed: {type(e).__name__}: {e}"}
            log.info(
                "jupyter-ckpt-helper: uid %d pid %d %s: %s in %.3f s",
                caller.uid,
                caller.pid,
                op,
                "ok" if answer["ok"] else answer["error"],
                time.monotonic() - started,
            )
            then = answer.pop("then", None)  # what a request does after its first answer
            try:
                send(conn, answer)
            finally:
                if then is not None:
                    then(conn)
        except Exception as e:  # the caller's problem (a timeout, garbage, a hang-up), not the helper's
            log.info("jupyter-ckpt-helper: uid %d: a connection ended: %s", caller.uid, e)
        finally:
            close_all(fds)
            conn.close()
            with self.lock:
                self.connections[caller.uid] -= 1

    def _slot(self, caller: Caller) -> Any:
        helper = self

        class Slot:
            def __enter__(self) -> None:
                with helper.lock:
                    if helper.busy.get(caller.uid, 0) >= helper.settings.requests_per_user:
                        raise Refused("too many requests to the helper at once; try again when one has ended")
                    helper.busy[caller.uid] = helper.busy.get(caller.uid, 0) + 1

            def __exit__(self, *exc: object) -> None:
                with helper.lock:
                    helper.busy[caller.uid] -= 1

        return Slot()

    # -- requests -------------------------------------------------------------------

    def op_hello(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        h = self.engine.health()
        return {
            "available": h.available,
            "version": h.version,
            "path": h.path,
            "reason": h.reason,
            "lazy_pages": h.lazy_pages,
            "uid": caller.uid,
        }

    def op_launch(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        cmd, env, cwd = message.get("cmd"), message.get("env"), message.get("cwd")
        if not (isinstance(cmd, list) and cmd and all(isinstance(c, str) for c in cmd)):
            raise InvalidRequest("cmd must be a non-empty list of strings")
        if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise InvalidRequest("env must map strings to strings")
        if not isinstance(cwd, str) or len(fds) != 2:
            raise InvalidRequest("launch needs a working directory, and the stdout and stderr fds")
        tini = shutil.which(self.settings.tini_path)
        if tini is None:
            raise Refused(f"{self.settings.tini_path} is not installed where the helper runs")
        report_r, report_w = os.pipe()
        spec = {
            "uid": caller.uid,
            "gid": caller.gid,
            "groups": caller.groups,
            "cmd": cmd,
            "env": env,
            "cwd": cwd,
            "private_shm": bool(message.get("private_shm", True)),
            "tini": tini,
            "cgroup": cgroup_of(caller.pid),
            "stdout": fds[0],
            "stderr": fds[1],
            "report": report_w,
        }
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "jupyter_ckpt.launcher"],
                stdin=subprocess.PIPE,
                pass_fds=(fds[0], fds[1], report_w),
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
                cwd="/",
            )
        finally:
            os.close(report_w)
        try:
            assert launcher.stdin is not None
            launcher.stdin.write(json.dumps(spec).encode())
            launcher.stdin.close()
            with os.fdopen(report_r) as report:
                line = report.readline().strip()
        except BaseException:
            launcher.kill()
            raise
        threading.Thread(target=launcher.wait, daemon=True).start()
        if not line.isdigit():
            launcher.wait()
            raise Refused(f"the kernel could not be started in its namespaces (launcher status {launcher.returncode})")
        return {"pid": int(line)}

    def op_dump(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        pid = message.get("pid")
        if not isinstance(pid, int) or pid <= 1 or len(fds) != 1:
            raise InvalidRequest("dump needs a process id and the images directory, open")
        target = fds[0]
        require_own_directory(target, caller)
        wrong = processes_not_of(pid, caller)
        if wrong:
            raise Refused(f"the process tree of {pid} is not yours alone: {wrong}")
        with self._work_dir() as work:
            images = work / "images"
            images.mkdir(mode=0o700)
            result = self.engine.dump(pid, images)
            try:
                sealing.check_credentials(images, caller.uid, caller.groups)
            except sealing.ImagesRefused as e:
                raise DumpFailed(f"a process changed its credentials while it was dumped: {e}") from None
            sealing.seal(images, self.key, caller.uid)
            hand_over(images, target, caller)
        return {
            "freeze_seconds": result.freeze_seconds,
            "total_seconds": result.total_seconds,
            "memory_bytes": result.memory_bytes,
        }

    def op_restore(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        keys = message.get("inherit_keys") or []
        if not (fds and isinstance(keys, list) and len(keys) == len(fds) - 1 and all(isinstance(k, str) for k in keys)):
            raise InvalidRequest("restore needs the images directory, open, and one fd per inherited key")
        source = fds[0]
        require_own_directory(source, caller)
        moves = self._listener_moves(message.get("listener_moves") or {})
        netns = message.get("netns")
        network = ForkNetwork.from_name(str(netns)) if netns is not None else None
        if netns is not None:
            with self.lock:
                if network is None or self.networks.get(network.name) != caller.uid:
                    raise Refused(f"{netns} is not a fork namespace the helper made for you")
        lazy = bool(message.get("lazy")) and self.engine.health().lazy_pages
        started = time.monotonic()
        with contextlib.ExitStack() as keep:
            work = keep.enter_context(self._work_dir())
            images = work / "images"
            self._checked_copy(source, images, caller)
            checked = time.monotonic() - started
            result = self.engine.restore(
                images,
                work_dir=work,
                inherit_fds=dict(zip(keys, fds[1:], strict=True)),
                netns=network.path if network is not None else None,
                lazy=lazy,
                listener_moves=moves,
                # CRIU opens the files with the caller's own credentials: no
                # race between check_files and CRIU's open can be won.
                owner=(caller.uid, caller.gid, caller.groups),
            )
            # The restored tree is this process's child (CRIU's rst_sibling): reap it.
            threading.Thread(target=_reap, args=(result.pid,), daemon=True).start()
            log.info(
                "jupyter-ckpt-helper: uid %d: images checked in %.3f s, restored in %.3f s%s",
                caller.uid,
                checked,
                result.seconds,
                " (memory follows)" if result.lazy_pages else "",
            )
            answer: dict[str, Any] = {"pid": result.pid, "seconds": result.seconds, "check_seconds": checked}
            if result.lazy_pages is not None:
                # The images stay until criu lazy-pages has brought all of the memory back.
                answer.update(lazy=True, then=_memory_back(result.lazy_pages, keep.pop_all()))
            return answer

    def op_check_restore(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        """What op_restore checks, without restoring: a server asks before it
        stops the kernel that the restore would replace."""
        if len(fds) != 1:
            raise InvalidRequest("check_restore needs the images directory, open")
        require_own_directory(fds[0], caller)
        with self._work_dir() as work:
            self._checked_copy(fds[0], work / "images", caller)
        return {}

    def _checked_copy(self, source: int, images: Path, caller: Caller) -> None:
        """The images in the caller's folder ``source``, copied where the caller
        cannot change them and checked: the seal, every task's credentials,
        nothing CRIU would create by path as root, every file as the caller."""
        images.mkdir(mode=0o700)
        take_over(source, images, self.key, caller)
        sealing.check_credentials(images, caller.uid, caller.groups)
        unsafe = unsafe_paths(images, caller.uid)
        if unsafe:
            raise sealing.ImagesRefused(
                f"the snapshot holds what cannot be restored for you safely: {'; '.join(unsafe[:5])}"
                + (f"; and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
            )
        check_files(images, caller)

    def op_network_create(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        outbound = message.get("outbound", "nat")
        if outbound not in ("nat", "host"):
            raise InvalidRequest("outbound must be 'nat' or 'host'")
        with self.lock:
            if sum(uid == caller.uid for uid in self.networks.values()) >= self.settings.forks_per_user:
                raise Refused(
                    f"you have {self.settings.forks_per_user} forked kernels' namespaces already: "
                    "shut some forks down first"
                )
        network = ForkNetwork.create(outbound)
        with self.lock:
            self.networks[network.name] = caller.uid
            self._save_networks()
        return {"index": network.index, "name": network.name}

    def op_network_close(self, caller: Caller, message: dict, fds: list[int]) -> dict:
        name = str(message.get("name"))
        with self.lock:
            if self.networks.get(name) != caller.uid:
                raise Refused(f"{name} is not a fork namespace the helper made for you")
            del self.networks[name]
            self._save_networks()
        ForkNetwork.remove(name)
        return {}

    def _save_networks(self) -> None:
        """Who each fork namespace belongs to, kept across restarts of the helper."""
        tmp = self.state / "networks.json.tmp"
        tmp.write_text(json.dumps(self.networks))
        os.replace(tmp, self.state / "networks.json")

    def _load_networks(self) -> None:
        try:
            saved = json.loads((self.state / "networks.json").read_text())
        except (OSError, ValueError):
            return
        for name, uid in saved.items():
            network = ForkNetwork.from_name(name)
            if network is not None and network.path.exists() and isinstance(uid, int):
                self.networks[network.name] = uid

    # -- parts ----------------------------------------------------------------------

    def _work_dir(self) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def work_dir() -> Any:
            path = self.work / secrets.token_hex(8)
            path.mkdir(mode=0o700)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)

        return work_dir()

    @staticmethod
    def _listener_moves(raw: Any) -> dict[int, tuple[str, int]]:
        """Moves of the ZMQ listeners, to a port a user may bind anyway: root
        binds them during the restore."""
        try:
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
                first_free = int(f.read())
        except OSError:
            first_free = 1024
        moves: dict[int, tuple[str, int]] = {}
        if not isinstance(raw, dict):
            raise InvalidRequest("listener_moves must be an object")
        for port, target in raw.items():
            try:
                address, new_port = str(target[0]), int(target[1])
                old = int(port)
            except (ValueError, TypeError, IndexError):
                raise InvalidRequest("each listener move is [address, port]") from None
            if not first_free <= new_port < 65536:
                raise Refused(f"a listener cannot be moved to port {new_port}: ports below {first_free} are root's")
            moves[old] = (address, new_port)
        return moves


# -- checks on processes and files ---------------------------------------------------


def close_all(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _memory_back(lazy_pages: Any, keep: contextlib.ExitStack) -> Callable[[socket.socket], None]:
    """After a lazy restore's first answer: wait until criu lazy-pages has
    brought all of the memory back (also if the caller went away: the kernel
    needs it), then tell the caller, and remove the images."""

    def then(conn: socket.socket) -> None:
        with keep:
            try:
                lazy_pages.wait()
                final = {"ok": True, "memory_back": True}
            except RestoreFailed as e:
                final = {"ok": False, "error": str(e), "error_type": "RestoreFailed"}
            try:
                send(conn, final)
            except OSError:
                pass  # the caller is gone

    return then


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jupyter-ckpt-helper",
        description="The root service through which Jupyter servers that are not root snapshot their kernels.",
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the unix socket to listen on (%(default)s)")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the key and work files (%(default)s)")
    parser.add_argument("--key-file", default="", help="the sealing key (default: STATE_DIR/helper.key)")
    parser.add_argument("--criu", default=None, help="the criu binary (default: on PATH)")
    parser.add_argument("--tini", default="tini", help="the init of each kernel's pid namespace (%(default)s)")
    parser.add_argument("--socket-group", default="", help="only members of this group may connect")
    parser.add_argument("--requests-per-user", type=int, default=4, help="at once (%(default)s)")
    parser.add_argument("--connections-per-user", type=int, default=16, help="open at once (%(default)s)")
    parser.add_argument("--forks-per-user", type=int, default=32, help="fork namespaces (%(default)s)")
    parser.add_argument(
        "--request-timeout",
        type=_positive_seconds,
        default=30.0,
        help="seconds a connection has to send its request (%(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if os.geteuid() != 0:
        raise SystemExit("jupyter-ckpt-helper must run as root: it runs CRIU for the users who connect")
    settings = HelperSettings(
        args.socket,
        args.state_dir,
        args.key_file,
        args.criu,
        args.tini,
        args.socket_group,
        args.requests_per_user,
        args.connections_per_user,
        args.forks_per_user,
        args.request_timeout,
    )
    # Each connection and request holds descriptors: as many as the system allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        # Users could then link root's files into their folders, for a restore to open.
        raise SystemExit("jupyter-ckpt-helper: needs fs.protected_hardlinks = 1 (sysctl)")
    # CRIU opens restored files as the caller, without following symlinks (our patches to CRIU).
    helper = Helper(settings, CriuEngine(args.criu, restore_no_symlinks=True))
    health = helper.engine.health()
    if not health.available:
        log.warning("jupyter-ckpt-helper: CRIU cannot be used: %s", health.reason)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    helper.serve()


if __name__ == "__main__":
    main()
