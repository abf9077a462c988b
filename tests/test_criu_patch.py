"""Our patches to CRIU (patches/criu/). 0001: a root criu without CAP_SYS_RESOURCE (container runtimes
drop it; this machine's root lacks it) dumps another user's process, reading its
rlimits from /proc/<pid>/limits; the images carry the process's own limits.
0002, 0003: below. 0004 and 0006: tests/test_dirty_tracking.py. 0005: the network
lock of a dump is lifted before its tasks resume, its table deleted after."""

from __future__ import annotations

import os
import re
import resource
import subprocess

import pytest

from jupyter_ckpt.engine import CriuEngine

pytestmark = pytest.mark.criu

NOBODY = 65534


def test_criu_dumps_another_users_process_without_cap_sys_resource(tmp_path):
    import pycriu

    criu = CriuEngine().criu_path
    sleeper = subprocess.Popen(
        ["sleep", "600"],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (777, 888)),
        cwd="/",
    )
    try:
        dump = subprocess.run(
            # Root without CAP_SYS_RESOURCE: prlimit() on another user's process is refused.
            ["setpriv", "--bounding-set", "-sys_resource", "--", criu, "dump", "-t", str(sleeper.pid)]
            + ["-D", str(tmp_path), "--leave-running", "-o", "dump.log", "-v4"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        log = (tmp_path / "dump.log").read_text()
        assert dump.returncode == 0, log[-2000:]
        assert f"Reading the rlimits of {sleeper.pid} from /proc" in log
        with open(tmp_path / f"core-{sleeper.pid}.img", "rb") as f:
            core = pycriu.images.load(f)["entries"][0]
        limits = core["tc"]["rlimits"]["rlimits"]
        assert limits[resource.RLIMIT_NOFILE] == {"cur": 777, "max": 888}
        for number in range(len(limits)):  # 16 on Linux, in the order of /proc/<pid>/limits
            soft, hard = _from_proc(sleeper.pid, number)
            assert (limits[number]["cur"], limits[number]["max"]) == (soft, hard), number
    finally:
        sleeper.kill()
        sleeper.wait()


def _from_proc(pid: int, number: int) -> tuple[int, int]:
    """The limit as /proc shows it (infinity as CRIU's image has it), parsed here."""
    with open(f"/proc/{pid}/limits") as f:
        row = f.read().splitlines()[1 + number]
    soft, hard = row[26:].split()[:2]
    value = lambda s: 2**64 - 1 if s == "unlimited" else int(s)  # noqa: E731
    return value(soft), value(hard)


def test_criu_restores_files_with_the_owners_credentials(tmp_path):
    """patches/criu/0002 and 0003: with restore_no_symlinks and restore_fs_*,
    CRIU opens the files of a restored tree as their owner, without following
    symlinks: a file that became root's after the dump (the result of a race a
    user could win against any check made beforehand) fails the restore; the
    same images restore when nothing changed; without the options, root opens it."""
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp())  # a folder the owner can reach (tmp_path's parents are root's only)
    os.chmod(base, 0o755)
    try:
        _restore_as_owner(base, tmp_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _restore_as_owner(base, tmp_path) -> None:
    from jupyter_ckpt.errors import RestoreFailed
    from jupyter_ckpt.kernel_tree import restore_tree

    folder = base / "owner"
    folder.mkdir()
    data = folder / "data.txt"
    data.write_text("data\n")
    for path in (folder, data):
        os.chown(path, NOBODY, NOBODY)
    # As the helper starts a user's kernel: its own pid and mount namespaces, then the user's ids.
    pid = _launch_as(NOBODY, ["sh", "-c", f"exec 3<>{data}; exec sleep 600"])
    strict = CriuEngine(restore_no_symlinks=True)
    images = tmp_path / "images"
    images.mkdir()
    try:
        _wait_for_fd(pid, 3)
        strict.dump(pid, images)
    finally:
        os.kill(pid, 9)
    owner = (NOBODY, NOBODY, [])

    os.chown(data, 0, 0)  # no longer the owner's to open for writing
    work = tmp_path / "work-1"
    work.mkdir()
    with pytest.raises(RestoreFailed, match="data.txt"):
        restore_tree(strict, images, work, {}, owner=owner)
    work = tmp_path / "work-root"
    work.mkdir()
    as_root = restore_tree(CriuEngine(), images, work, {})  # what CRIU does without the options
    os.kill(as_root.pid, 9)
    os.waitpid(as_root.pid, 0)

    os.chown(data, NOBODY, NOBODY)  # as it was: it restores as the owner
    work = tmp_path / "work-2"
    work.mkdir()
    tree = restore_tree(strict, images, work, {}, owner=owner)
    try:
        with open(f"/proc/{tree.pid}/task/{tree.pid}/children") as f:
            child = int(f.read().split()[0])
        assert os.readlink(f"/proc/{child}/fd/3") == str(data)
    finally:
        os.kill(tree.pid, 9)
        os.waitpid(tree.pid, 0)


def _launch_as(uid: int, cmd: list[str]) -> int:
    """jupyter_ckpt.launcher, as the helper runs it; the host pid of the tree's init."""
    import json
    import shutil
    import sys

    out_r, out_w = os.pipe()
    report_r, report_w = os.pipe()
    spec = {
        "uid": uid,
        "gid": uid,
        "groups": [],
        "cmd": cmd,
        "env": {"PATH": "/usr/bin:/bin"},
        "cwd": "/",
        "tini": shutil.which("tini"),
        "stdout": out_w,
        "stderr": out_w,
        "report": report_w,
    }
    launcher = subprocess.Popen(
        [sys.executable, "-m", "jupyter_ckpt.launcher"], stdin=subprocess.PIPE, pass_fds=(out_w, report_w)
    )
    launcher.stdin.write(json.dumps(spec).encode())
    launcher.stdin.close()
    os.close(report_w)
    os.close(out_w)
    with os.fdopen(report_r) as report:
        return int(report.readline())


def _wait_for_fd(pid: int, fd: int) -> None:
    """Until the init's child (sh, then sleep) holds ``fd``."""
    import time

    for _ in range(300):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                child = int(f.read().split()[0])
            with open(f"/proc/{child}/comm") as f:
                if f.read().strip() == "sleep" and os.path.exists(f"/proc/{child}/fd/{fd}"):
                    return
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.01)
    raise TimeoutError("the sleeper did not start")


ECHO = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while True:
    data = s.recv(64)
    if not data:
        break
    s.sendall(data)
"""


def test_a_dump_opens_the_network_lock_before_the_tasks_resume_and_deletes_it_after(tmp_path):
    """patches/criu/0005: deleting CRIU's nftables table waits for the kernel
    (an RCU grace period, tens of ms), so it is no longer done while the tasks
    are frozen: the lock is opened (accept rules) before they resume, the table
    deleted once they run. Nothing of the lock is left, and the dumped
    process's TCP connection carries data both ways right after."""
    import socket
    import sys

    from jupyter_ckpt.engine import DUMP_LOG

    server = socket.create_server(("127.0.0.1", 0))
    script = tmp_path / "echo.py"
    script.write_text(ECHO)
    echo = subprocess.Popen(
        [sys.executable, str(script), str(server.getsockname()[1])],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    images = tmp_path / "images"
    images.mkdir()
    try:
        server.settimeout(30)
        peer, _ = server.accept()
        peer.settimeout(30)
        peer.sendall(b"before")
        assert peer.recv(64) == b"before"
        CriuEngine().dump(echo.pid, images)
        log = (images / DUMP_LOG).read_text()
        opened = log.find("Unlock network (the lock table is deleted after the tasks resume)")
        assert 0 <= opened < log.find("Unfreezing tasks"), log[-3000:]
        for failure in ("Could not open the nftables lock", "Could not delete the nftables lock table"):
            assert failure not in log, log[-3000:]
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        run_id = re.findall(r"CRIU run id = ([0-9a-f-]{36})", log)[-1]
        assert f"CRIU-{run_id[:20]}" not in tables
        peer.sendall(b"after")
        assert peer.recv(64) == b"after"
        peer.close()
    finally:
        echo.kill()
        echo.wait()
        server.close()
