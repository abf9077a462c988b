"""Ordinary system users for the tests of servers that are not root: the
users themselves (made with useradd, removed afterwards), the helper they
reach CRIU through, and a Python they can run.

A Python for them: this suite's environment usually lives under root's home,
which other users cannot enter. Debian's own python3 (the same minor version)
gets a venv whose path file names this checkout and this environment's
packages; paths other users cannot reach are bind-mounted where they can.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jupyter_ckpt

SYSTEM_PYTHON = "/usr/bin/python3"
USER_PREFIX = "ckpt-test-"


def create_user(name: str) -> pwd.struct_passwd:
    """A fresh system user with a home of its own (an old one is replaced)."""
    remove_user(name)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    return pwd.getpwnam(name)


def processes_of(uid: int) -> list[int]:
    """The pids of every process running as ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def end_processes_of(name: str) -> None:
    """End every process of a user the test made, by pid: the test started all
    of them (servers, and the kernels the helper started for them, which are
    not the servers' children), and no one else runs as that user."""
    assert name.startswith(USER_PREFIX) or name.startswith("ckpt-bench-"), name
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for _ in range(50):
        pids = processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_user(name: str) -> None:
    end_processes_of(name)
    subprocess.run(["userdel", "--remove", "--force", name], capture_output=True)


def _user_process(user: str) -> dict:
    """subprocess's arguments for a process of ``user``'s, in their home folder."""
    entry = pwd.getpwnam(user)
    return {
        "user": entry.pw_uid,
        "group": entry.pw_gid,
        "extra_groups": [],
        "cwd": entry.pw_dir,
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": entry.pw_dir, "USER": user},
        "text": True,
    }


def as_user(user: str, *cmd: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, timeout=timeout, **_user_process(user), **kwargs)


def start_as_user(user: str, *cmd: str) -> subprocess.Popen:
    """``cmd`` as ``user``, running, with pipes for its stdin and stdout."""
    return subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, **_user_process(user))


def _reachable(path: Path) -> bool:
    """Whether every user may enter ``path`` and all the folders above it."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


class SharedPython:
    """A Python interpreter every user can run, with this checkout importable."""

    def __init__(self) -> None:
        ours, system = sys.version_info[:2], self._version()
        if ours != system:
            raise RuntimeError(f"{SYSTEM_PYTHON} is Python {system}, this environment {ours}: they must match")
        self.root = Path(tempfile.mkdtemp(prefix="ckpt-users-python-"))
        os.chmod(self.root, 0o755)
        self.mounts: list[Path] = []
        checkout = self._reachable(Path(jupyter_ckpt.__file__).parents[1])
        paths = [checkout, self._reachable(Path(sysconfig.get_paths()["purelib"]))]
        venv = self.root / "venv"
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(
            subprocess.check_output(
                [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
            ).strip()
        )
        (site / "jupyter-ckpt-tests.pth").write_text("".join(f"{p}\n" for p in paths))
        self.python = str(venv / "bin" / "python")
        # JupyterLab's assets are in this environment's data folder, and the
        # extension is linked into it from this checkout.
        shared_data = self._reachable(Path(sys.prefix) / "share" / "jupyter")
        (self.root / "data" / "labextensions").mkdir(parents=True)
        (self.root / "data" / "labextensions" / "jupyter-ckpt").symlink_to(checkout / "jupyter_ckpt" / "labextension")
        self.env = {"JUPYTER_PATH": f"{self.root / 'data'}:{shared_data}"}
        self.lab_args = [f"--LabApp.app_dir={shared_data / 'lab'}"]

    @staticmethod
    def _version() -> tuple[int, int]:
        out = subprocess.check_output([SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"], text=True)
        major, minor = out.split()
        return int(major), int(minor)

    def _reachable(self, path: Path) -> Path:
        if _reachable(path):
            return path
        mount = self.root / f"mount-{len(self.mounts)}"
        mount.mkdir()
        subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(mount)], check=True)
        self.mounts.append(mount)
        return mount

    def close(self) -> None:
        for mount in self.mounts:
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


class RunningHelper:
    """jupyter-ckpt-helper as root, on a socket and state folder of its own."""

    def __init__(self, *args: str, state_dir: Path | None = None, prefix: tuple[str, ...] = ()) -> None:
        """``prefix``: a command the helper is run through (it must exec it)."""
        self.dir = Path(tempfile.mkdtemp(prefix="ckpt-helper-"))
        os.chmod(self.dir, 0o755)
        self.socket = str(self.dir / "helper.sock")
        self.state = state_dir or self.dir / "state"
        self.log_path = self.dir / "helper.log"
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "jupyter_ckpt.helper",
                "--socket",
                self.socket,
                "--state-dir",
                str(self.state),
                *args,
            ],
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        for _ in range(300):
            if os.path.exists(self.socket):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the helper did not start: {self.log_path.read_text()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self, keep_state: bool = False) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        if not keep_state:
            shutil.rmtree(self.state, ignore_errors=True)
