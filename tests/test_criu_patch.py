"""patches/criu/0001: a root criu without CAP_SYS_RESOURCE (container runtimes
drop it; this machine's root lacks it) dumps another user's process, reading its
rlimits from /proc/<pid>/limits; the images carry the process's own limits."""

from __future__ import annotations

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
