"""Why CRIU refused to dump a kernel, said so a user can act on it.

CRIU's own error lines name a resource by its inode and rarely the process
that holds it. After a refused dump the tree runs on unchanged, so the
process can be looked up here: the explanation names the process (pid and
command), the resource, and what to do, and ends with CRIU's own words.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

# "Runaway socket: ino 4849342 peer_ino 4850070 family 1 type 1 state 1 name /tmp/db.sock"
_RUNAWAY_UNIX = re.compile(r"Runaway socket: ino (\d+) peer_ino (\d+) .*? name (\S+)")
_HALF_UNIX = re.compile(r"Dumping: ino (\d+) peer_ino (\d+) .*? name (\S+)")
_GHOST_TOO_BIG = re.compile(r"Can't dump ghost file (\S+) of (\d+) size")
_ODD_FILE = re.compile(r"Can't dump file (\d+) of that type \[(\d+)\] (\S+)")


def explain(log_text: str, root_pid: int) -> str | None:
    """An explanation of a refused dump of the tree under ``root_pid``, or
    None when the refusal is not one of those known here."""
    for rule in _RULES:
        found = rule(log_text, root_pid)
        if found:
            return found
    return None


def _outside_unix_connection(log_text: str, root_pid: int) -> str | None:
    if "External socket is used" not in log_text and "half of stream unix connection" not in log_text:
        return None
    m = _RUNAWAY_UNIX.search(log_text)
    if m:
        theirs, ours, name = m.group(1), m.group(2), m.group(3)
    else:
        half = [h for h in _HALF_UNIX.finditer(log_text)]
        if not half:
            return None
        ours, theirs, name = half[-1].group(1), half[-1].group(2), half[-1].group(3)
    holder = _holder_of(f"socket:[{ours}]", root_pid) or _holder_of(f"socket:[{theirs}]", root_pid)
    where = name if name != "null" else "an unnamed unix socket"
    return (
        f"a unix socket connection to {where}, served by a process outside the kernel (a database, a desktop "
        f"or container service...), held by {_describe(holder)}: a snapshot cannot carry the other end of "
        "that connection. Close it before taking a snapshot (for example close the client object that "
        "opened it) and open it again afterwards."
    )


def _ghost_too_big(log_text: str, root_pid: int) -> str | None:
    m = _GHOST_TOO_BIG.search(log_text)
    if not m:
        return None
    path, size = m.group(1), int(m.group(2))
    holder = _holder_of(path, root_pid, deleted=True)
    return (
        f"a deleted file of {size / 2**30:.1f} GiB still open or mapped ({path}), held by {_describe(holder)}: "
        "a snapshot copies such a file whole, at most 4 GiB of it. Keep the file under a name while it is "
        "in use, or release it before taking a snapshot."
    )


def _odd_file(log_text: str, root_pid: int) -> str | None:
    m = _ODD_FILE.search(log_text)
    if not m:
        return None
    fd, what = m.group(1), m.group(3)
    holder = _holder_of(what, root_pid)
    return (
        f"a file a snapshot cannot save ({what}: a device or a kernel object such as io_uring, perf or BPF), "
        f"open as file descriptor {fd} in {_describe(holder)}. Close it before taking a snapshot."
    )


_RULES: list[Callable[[str, int], str | None]] = [_outside_unix_connection, _ghost_too_big, _odd_file]


def tree_pids(root: int) -> list[int]:
    """The processes of the tree under ``root`` (host pids), root first."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                todo.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
            except OSError:
                pass
    return pids


def _holder_of(target: str, root_pid: int, deleted: bool = False) -> int | None:
    """The first process of the tree with an fd (or, for a path, a mapping) on ``target``."""
    wanted = {target, f"{target} (deleted)"} if deleted else {target}
    for pid in tree_pids(root_pid):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        return pid
                except OSError:
                    continue
            if target.startswith("/"):
                with open(f"/proc/{pid}/maps") as f:
                    if any(line.rstrip("\n").endswith(tuple(wanted)) for line in f):
                        return pid
        except OSError:
            continue
    return None


def _describe(pid: int | None) -> str:
    if pid is None:
        return "a process of the kernel"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv if a)
    except OSError:
        command = "?"
    if len(command) > 80:
        command = command[:77] + "..."
    return f"process {pid} ({command})"
