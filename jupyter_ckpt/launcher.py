"""Start a kernel for an ordinary user the way the provisioner starts one as
root (a pid namespace under tini, a mount namespace with its own /proc and
/dev/shm), then become that user before running anything of theirs.

Run by the helper as root: ``python -m jupyter_ckpt.launcher``, the request on
stdin as JSON: ``uid``, ``gid``, ``groups``, ``cmd``, ``env``, ``cwd``,
``private_shm``, ``tini``, ``cgroup`` (the caller's, joined first), and the fds ``stdout``, ``stderr``, ``report``
(where the host pid of the namespace's init is written). It stays as the
namespace's parent and exits with the init's status, as ``unshare --fork`` does.

Only the namespace set-up runs as root, with root's environment: the user's
environment and working directory are taken on after the credentials are
dropped, so nothing of the user's (LD_PRELOAD, PATH) reaches a root process.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def become_init(spec: dict) -> None:
    """In the new pid namespace, as its pid 1: mounts, stdio, credentials, exec."""
    _mount(None, "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if spec.get("private_shm", True):
        _mount("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(spec["stdout"], 1)
    os.dup2(spec["stderr"], 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the report pipe and the originals of the above
    os.setsid()  # CRIU refuses a session leader outside the dumped namespace
    os.setgroups(spec["groups"])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    os.chdir(spec["cwd"])  # as the user: only a folder the user may enter
    tini = spec["tini"]
    os.execve(tini, [tini, "-g", "--", *spec["cmd"]], spec["env"])


def join_cgroup(path: str) -> None:
    """Into the caller's cgroup (v2), so the kernel counts against the user's
    limits (a systemd user slice, a spawner's unit) and not the helper's."""
    if not path:
        return
    try:
        with open(f"/sys/fs/cgroup{path}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        os.write(2, f"jupyter-ckpt launcher: the kernel stays in the helper's cgroup ({e})\n".encode())


def main() -> None:
    spec = json.loads(sys.stdin.read())
    join_cgroup(spec.get("cgroup", ""))
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare")
    # Mounts made in the kernel's namespace stay there.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    pid = os.fork()
    if pid == 0:
        try:
            become_init(spec)
        except BaseException as e:
            os.write(2, f"jupyter-ckpt launcher: cannot start the kernel: {e}\n".encode())
        os._exit(127)
    os.write(spec["report"], f"{pid}\n".encode())
    os.close(spec["report"])
    for fd in (spec["stdout"], spec["stderr"]):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
