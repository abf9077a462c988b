"""How jupyter-ckpt-helper starts: its state folder, its socket's group, the
CRIU it runs, and the sysctl it insists on. A real helper process as root."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_ckpt.helper_client import HelperEngine

from .users import RunningHelper

pytestmark = pytest.mark.criu  # root, and a CRIU to start with


def test_the_state_folder_and_key_are_roots_only(tmp_path):
    helper = RunningHelper(state_dir=tmp_path / "state")
    try:
        state = os.stat(helper.state)
        assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == 0
        key = os.stat(helper.state / "helper.key")
        assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == 0
        assert stat.S_IMODE(os.stat(helper.state / "work").st_mode) == 0o700
    finally:
        helper.close()


def test_a_socket_group_lets_only_its_members_connect(tmp_path):
    group = "ckpt-test-helper"
    subprocess.run(["groupadd", "-f", group], check=True)
    helper = RunningHelper("--socket-group", group)
    try:
        for _ in range(300):  # the helper binds, then sets the group and the mode
            if stat.S_IMODE(os.stat(helper.socket).st_mode) == 0o660:
                break
            time.sleep(0.01)
        st = os.stat(helper.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
        # nobody is not in the group: the kernel refuses the connection.
        code = f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect({helper.socket!r})"
        nobody = subprocess.run(
            ["/usr/bin/python3", "-c", code],  # the system's Python: nobody cannot run the venv's
            capture_output=True,
            text=True,
            user="nobody",
            group="nogroup",
            timeout=60,
        )
        assert nobody.returncode != 0 and "PermissionError" in nobody.stderr
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(helper.socket)  # root may
    finally:
        helper.close()
        subprocess.run(["groupdel", group])


def test_criu_is_the_one_given_with_criu(tmp_path):
    """--criu: the helper runs that binary (a wrapper that notes each call)."""
    real = subprocess.run(["sh", "-c", "command -v criu || echo /usr/local/sbin/criu"], capture_output=True, text=True)
    calls = tmp_path / "calls"
    wrapper = tmp_path / "criu-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real.stdout.strip()} "$@"\n')
    wrapper.chmod(0o755)
    helper = RunningHelper("--criu", str(wrapper))
    try:
        health = HelperEngine(socket_path=helper.socket).health()
        assert health.available, health.reason
        assert Path(calls).read_text().strip(), "the wrapper was never run"
    finally:
        helper.close()


def test_it_refuses_to_start_without_protected_hardlinks(tmp_path):
    sysctl = Path("/proc/sys/fs/protected_hardlinks")
    before = sysctl.read_text().strip()
    sysctl.write_text("0\n")
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "jupyter_ckpt.helper",
                "--socket",
                str(tmp_path / "h.sock"),
                "--state-dir",
                str(tmp_path / "s"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        sysctl.write_text(f"{before}\n")
    assert out.returncode != 0 and "needs fs.protected_hardlinks = 1" in out.stderr
    assert not (tmp_path / "h.sock").exists()


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_a_request_timeout_must_be_a_number_of_seconds_above_zero(seconds, capsys):
    from jupyter_ckpt.helper import main

    with pytest.raises(SystemExit) as refused:
        main(["--request-timeout", seconds])
    assert refused.value.code == 2
    assert "--request-timeout" in capsys.readouterr().err
