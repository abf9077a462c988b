"""Who calls the helper (helper.py), and what of theirs it may act on: their
processes (every id theirs, no capabilities, in the helper's namespaces), the
files their images open (as they themselves may open them) and their cgroup."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from . import seal as sealing
from .criu_images import host_files
from .errors import NotPermitted


@dataclass
class Caller:
    pid: int
    uid: int
    gid: int  # the user's primary group
    groups: list[int]  # every group the user is in

    @classmethod
    def of(cls, sock: socket.socket) -> Caller:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        try:
            entry = pwd.getpwuid(uid)
            primary, groups = entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)
        except KeyError:  # a uid without a passwd entry (containers): its own group only
            primary, groups = gid, [gid]
        return cls(pid, uid, primary, sorted(set(groups)))


def _ids(pid: int) -> tuple[list[int], list[int], int] | None:
    """A process's uids, gids, and its capabilities (permitted, effective and ambient, or'ed)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        capabilities = 0
        for name in ("CapPrm", "CapEff", "CapAmb"):
            capabilities |= int(fields[name], 16)
        return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()], capabilities
    except (OSError, KeyError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def _namespace(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def processes_not_of(pid: int, caller: Caller) -> str:
    """'' if every process of the tree at ``pid`` runs as the caller; else the first that does not."""
    pending, seen = [pid], set()
    while pending:
        p = pending.pop()
        if p in seen:
            continue
        seen.add(p)
        ids = _ids(p)
        if ids is None:
            if p == pid:
                return f"no process {pid}"
            continue  # exited meanwhile
        uids, gids, capabilities = ids
        if any(u != caller.uid for u in uids) or any(g not in caller.groups for g in gids):
            return f"process {p} runs as uid {uids[1]}, gid {gids[1]}"
        if _namespace(p, "user") != _namespace(os.getpid(), "user"):
            # Inside one, the user could mount: CRIU would restore those mounts as root.
            return f"process {p} is in a user namespace of its own"
        if capabilities:
            return f"process {p} holds capabilities {capabilities:#x} (it ran a program with file capabilities)"
        # A process that ran a set-id program and dropped back stays undumpable
        # (its memory may hold what the caller may not read): the kernel gives
        # its /proc folder to root.
        try:
            if os.stat(f"/proc/{p}").st_uid != caller.uid:
                return f"process {p} is not dumpable by you (it ran a privileged program)"
        except OSError:
            continue
        pending += _children(p)
    return ""


def check_files(images: Path, caller: Caller) -> None:
    """Every file of this machine that the images open, the caller may open the
    same way: CRIU opens them as root. Tried in a child process that has taken
    the caller's credentials (ImagesRefused names the first refused). CRIU then
    opens the same paths without following symlinks (path_checks.py says why)."""
    wanted = [(name, reg.get("flags", 0) & os.O_ACCMODE) for name, reg, _role in host_files(images)]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only system calls from here: other threads' locks may be held
        try:
            os.close(read_end)
            os.setgroups(caller.groups)
            os.setresgid(caller.gid, caller.gid, caller.gid)
            os.setresuid(caller.uid, caller.uid, caller.uid)
            for name, mode in wanted:
                try:
                    os.close(os.open(name, mode | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC))
                except OSError as e:  # whatever the reason: what the user cannot open, root must not
                    os.write(write_end, f"{name} ({e.strerror})".encode(errors="replace")[:4000])
                    break
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        refused = f.read().decode(errors="replace")
    os.waitpid(child, 0)
    if refused:
        raise sealing.ImagesRefused(f"the snapshot opens {refused}, which you may not open")


def cgroup_of(pid: int) -> str:
    """A process's cgroup v2 path ('' where there is none to join: cgroup v1,
    or the root cgroup)."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::/") and ".." not in line:
                    return line[3:].strip().rstrip("/")
    except OSError:
        pass
    return ""


SHARED_NAMESPACES = ("pid", "mnt", "net")


def require_same_namespaces(caller: Caller) -> None:
    """The helper serves servers that see the machine as it does: the same
    processes (pids are named across the socket), files (kernels are started
    and restored on its mounts) and network (kernels listen for the server)."""
    for ns in SHARED_NAMESPACES:
        try:
            theirs, ours = os.stat(f"/proc/{caller.pid}/ns/{ns}").st_ino, os.stat(f"/proc/self/ns/{ns}").st_ino
        except OSError:
            raise NotPermitted("the helper cannot see your process (is it in another pid namespace?)") from None
        if theirs != ours:
            raise NotPermitted(
                f"your server runs in another {ns} namespace than the helper (a container?): run the helper in the "
                "same container or host as the Jupyter servers it serves (README: Deploying for many users)"
            )
