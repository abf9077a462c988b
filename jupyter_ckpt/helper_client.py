"""The unprivileged side of the helper (helper.py): how a Jupyter server that
does not run as root launches, dumps and restores its kernels.

``HelperEngine`` has the engine's interface (CriuEngine), so the flows do not
know which one they drive. Each request is one connection to the helper's
unix socket: a JSON message, with open file descriptors beside it where the
helper needs one (the images directory, a kernel's stdout and stderr pipes),
and one JSON answer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import errors
from .engine import CriuHealth, DumpResult, RestoreResult
from .forknet import ForkNetwork

DEFAULT_SOCKET = "/run/jupyter-ckpt/helper.sock"
MAX_MESSAGE = 1 << 20
MAX_FDS = 16


def send(sock: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise errors.InvalidRequest("request too large for the helper")
    socket.send_fds(sock, [data], list(fds)) if fds else sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """One message and the fds that came with it (none is left open when the
    message is not a JSON object: any fds sent with garbage are closed)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    try:
        if not data:
            raise ConnectionError("the connection closed")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError
    except BaseException as e:
        for fd in fds:
            os.close(fd)
        if isinstance(e, (ValueError, RecursionError)):
            raise ConnectionError("not a JSON object") from None
        raise
    return message, fds


def request(path: str, op: str, fds: Sequence[int] = (), timeout: float | None = None, **args: Any) -> dict:
    """One request to the helper; its answer, or the error it names raised."""
    sock = open_request(path, op, fds, timeout, **args)
    try:
        return answer_of(sock)
    finally:
        sock.close()


def open_request(
    path: str, op: str, fds: Sequence[int] = (), timeout: float | None = None, **args: Any
) -> socket.socket:
    """Send a request; the connection, for its answers (answer_of)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise errors.CriuUnavailable(
                f"the jupyter-ckpt helper is not reachable at {path} ({e.strerror}): as a user other than root, "
                "snapshots need the helper running (jupyter-ckpt-helper, see 'Deploying for many users')"
            ) from None
        send(sock, {"op": op, **args}, fds)
    except BaseException:
        sock.close()
        raise
    return sock


def answer_of(sock: socket.socket) -> dict:
    """The next answer on a request's connection, or the error it names raised."""
    answer, extra = receive(sock)
    for fd in extra:
        os.close(fd)
    if answer.get("ok"):
        return answer
    kind = getattr(errors, str(answer.get("error_type")), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.CheckpointError)) or kind is errors.SnapshotIncompatible:
        kind = errors.CheckpointError
    raise kind(str(answer.get("error") or "the helper refused without a reason"))


class HelperLazyPages:
    """The memory of a tree the helper restored lazily, coming back: the
    helper's ``criu lazy-pages`` reports on the restore's connection when all
    of it is back (LazyPages' interface; there is no local process)."""

    process = None

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def wait(self) -> None:
        try:
            answer_of(self.sock)
        except (errors.CheckpointError, ConnectionError, OSError) as e:
            raise errors.RestoreFailed(f"bringing back the kernel's memory failed: {e}") from None
        finally:
            self.sock.close()

    def kill(self) -> None:
        self.sock.close()  # the helper stops its lazy-pages daemon when the connection ends


class HelperForkNetwork(ForkNetwork):
    """A fork's network namespace, made and removed by the helper for this user."""

    socket_path: str = DEFAULT_SOCKET

    def close(self) -> None:
        request(self.socket_path, "network_close", name=self.name)


class HelperEngine:
    """The engine for a server that is not root: every CRIU run, kernel launch
    and fork network goes through the helper, as this user."""

    def __init__(
        self,
        criu_path: str | None = None,
        log_level: int = 4,
        resizable_files: tuple[str, ...] = (),
        socket_path: str = DEFAULT_SOCKET,
    ):
        # CRIU's path, log level and resizable files are the helper's settings.
        self.socket_path = socket_path
        self._health: CriuHealth | None = None

    def health(self, refresh: bool = False) -> CriuHealth:
        if self._health is None or refresh:
            try:
                answer = request(self.socket_path, "hello", timeout=120)
            except errors.CheckpointError as e:
                self._health = CriuHealth(False, reason=str(e))
            else:
                self._health = CriuHealth(
                    bool(answer["available"]),
                    answer.get("version"),
                    answer.get("path"),
                    answer.get("reason", ""),
                    lazy_pages=bool(answer.get("lazy_pages")),
                )
        return self._health

    def require(self) -> None:
        h = self.health()
        if not h.available:
            raise errors.CriuUnavailable(h.reason)

    def dump(self, pid: int, images_dir: Path, *, external: tuple[str, ...] = ()) -> DumpResult:
        if external:
            raise errors.InvalidRequest("external resources are named by the helper")
        self.require()
        fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        try:
            answer = request(self.socket_path, "dump", [fd], pid=pid)
        finally:
            os.close(fd)
        return DumpResult(answer["freeze_seconds"], answer["total_seconds"], answer["memory_bytes"])

    def check_restorable(self, images_dir: Path) -> None:
        """The helper's checks of a restore (the seal, the credentials, what
        it would create by path, the files), run before the kernel is touched:
        its refusal then leaves the kernel as it is."""
        self.require()
        fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        try:
            request(self.socket_path, "check_restore", [fd])
        finally:
            os.close(fd)

    def restore(
        self,
        images_dir: Path,
        *,
        work_dir: Path,
        inherit_fds: Mapping[str, int] = {},
        netns: Path | None = None,
        lazy: bool = False,
        listener_moves: Mapping[int, tuple[str, int]] = {},
    ) -> RestoreResult:
        self.require()
        started = time.monotonic()
        keys = list(inherit_fds)
        fd = os.open(images_dir, os.O_DIRECTORY | os.O_RDONLY)
        try:
            sock = open_request(
                self.socket_path,
                "restore",
                [fd, *(inherit_fds[k] for k in keys)],
                inherit_keys=keys,
                netns=netns.name if netns is not None else None,
                listener_moves={str(port): list(to) for port, to in listener_moves.items()},
                lazy=lazy,
            )
        finally:
            os.close(fd)
        try:
            answer = answer_of(sock)
        except BaseException:
            sock.close()
            raise
        if not answer.get("lazy"):
            sock.close()
            return RestoreResult(pid=answer["pid"], seconds=time.monotonic() - started)
        return RestoreResult(answer["pid"], time.monotonic() - started, HelperLazyPages(sock))  # type: ignore[arg-type]

    def remove_network_lock(self, dump_log: Path, pid: int | None = None) -> bool:
        return False  # the helper lifts the lock of a dump that failed under it itself

    def create_network(self, outbound: str = "nat") -> ForkNetwork:
        answer = request(self.socket_path, "network_create", outbound=outbound)
        network = HelperForkNetwork(int(answer["index"]))
        network.socket_path = self.socket_path
        return network

    def remove_network(self, name: str) -> bool:
        try:
            request(self.socket_path, "network_close", name=name)
        except errors.CheckpointError:
            return False
        return True

    def launch(self, cmd: list[str], env: dict[str, str], cwd: str, stdout: int, stderr: int, private_shm: bool) -> int:
        """Start a kernel's command as this user in namespaces of its own (see
        the provisioner); the host pid of the namespace's init."""
        answer = request(
            self.socket_path, "launch", [stdout, stderr], cmd=cmd, env=env, cwd=cwd, private_shm=private_shm
        )
        return int(answer["pid"])
