"""Servers that are not root: each runs as an ordinary system user (made by
the test) and reaches CRIU through jupyter-ckpt-helper, a real root process.

What one user can do with their own kernels (snapshot mid-cell, restore in
place, fork, the magic, auto-backup, the CLI, a bundle to another server), and
what they cannot do to another user's, through the API or by talking to the
helper directly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from .servers import Server, take, value
from .users import USER_PREFIX, RunningHelper, SharedPython, as_user, create_user, remove_user

pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(300)]

ANN, BOB = f"{USER_PREFIX}ann", f"{USER_PREFIX}bob"

# A cell that runs for about 5 s; a snapshot taken meanwhile holds it mid-loop.
LOOP = "for i in range(50):\n    total += i\n    time.sleep(0.1)\ndone = True"


@pytest.fixture(scope="module")
def shared_python():
    python = SharedPython()
    yield python
    python.close()


@pytest.fixture(scope="module")
def helper():
    running = RunningHelper()
    yield running
    running.close()


@pytest.fixture(scope="module")
def users():
    made = {name: create_user(name) for name in (ANN, BOB)}
    yield made
    for name in made:
        remove_user(name)


class UserServers:
    def __init__(self, users, helper, shared_python, tmp_path):
        self.users, self.helper, self.python, self.tmp_path = users, helper, shared_python, tmp_path
        self.servers: list[Server] = []

    def start(self, user: str, *extra: str, name: str = "server") -> Server:
        home = Path(self.users[user].pw_dir) / f"{name}-{len(self.servers)}"
        home.mkdir()
        server = Server(
            home,
            f"--CheckpointApp.helper_socket={self.helper.socket}",
            *([] if any("auto_backup=" in e for e in extra) else ["--CheckpointApp.auto_backup=False"]),
            *extra,
            user=user,
            python=self.python.python,
            log_dir=self.tmp_path,
        )
        server.base = home
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()


@pytest.fixture
def user_servers(users, helper, shared_python, tmp_path):
    servers = UserServers(users, helper, shared_python, tmp_path)
    yield servers
    servers.close()


def ids_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return [int(x) for x in fields["Uid"].split()]


def kernel_pids(kernel_id: str) -> list[int]:
    """The host pids of a kernel's processes (its command line names its connection file)."""
    from .servers import cmdline

    found = [int(p) for p in os.listdir("/proc") if p.isdigit() and any(kernel_id in a for a in cmdline(int(p)))]
    assert found, f"no process of kernel {kernel_id}"
    return found


def start_kernel(server: Server) -> str:
    return server.call("POST", "/api/kernels", {"name": "python3"})["id"]


def test_an_ordinary_users_server_snapshots_restores_and_forks_its_kernels(user_servers, users):
    ann = users[ANN]
    server = user_servers.start(ANN)
    assert os.stat(f"/proc/{server.proc.pid}").st_uid == ann.pw_uid
    status = server.call("GET", "/api/ckpt/status")
    assert status["criu"]["available"], status
    kernel_id = start_kernel(server)
    client = server.client(kernel_id)
    assert value(client, "import os, time; total = 0; os.getuid()") == str(ann.pw_uid)
    for pid in kernel_pids(kernel_id):
        assert set(ids_of(pid)) == {ann.pw_uid}, pid

    # Mid-cell: the loop runs on after the snapshot, and after the restore.
    client.execute(LOOP)
    time.sleep(1.5)
    snap = take(server, kernel_id, "mid-loop")
    assert snap["memory_bytes"] > 0 and snap["freeze_seconds"] > 0
    assert value(client, "total, 'done' in dir()") == "(1225, True)"
    client.execute_interactive("total = -1; del done", timeout=60)

    server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"}, timeout=120)
    client = server.client(kernel_id)
    # The restored kernel finishes the loop it was in, then answers.
    assert value(client, "total, done, os.getuid()") == f"(1225, True, {ann.pw_uid})"
    restored = kernel_pids(kernel_id)
    for pid in restored:
        assert set(ids_of(pid)) == {ann.pw_uid}, pid

    fork = server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120)
    forked = server.client(fork["kernel_id"])
    assert value(forked, "total, done, os.getuid()") == f"(1225, True, {ann.pw_uid})"
    # The fork's processes are copies of the original's (their command lines too).
    both = kernel_pids(kernel_id)
    assert len(both) == 2 * len(restored)
    for pid in both:
        assert set(ids_of(pid)) == {ann.pw_uid}, pid

    # The magic, inside the kernel, as the user.
    client.execute_interactive("cp = %checkpoint from the magic", timeout=120)
    assert value(client, "cp.label") == "'from the magic'"
    labels = {s["label"] for s in server.call("GET", "/api/ckpt/snapshots")}
    assert {"mid-loop", "from the magic"} <= labels

    # The CLI, as the user, on the user's store.
    store = server.base / "store"
    listed = as_user(ANN, user_servers.python.python, "-m", "jupyter_ckpt.cli", "--store", str(store), "list")
    assert listed.returncode == 0, listed.stderr
    assert "mid-loop" in listed.stdout and "from the magic" in listed.stdout
    # Nothing of the user's is root's: the store is theirs alone.
    for path in [store, *store.rglob("*")]:
        assert path.lstat().st_uid == ann.pw_uid, path


def test_auto_backup_of_a_busy_kernel_as_an_ordinary_user(user_servers, users):
    server = user_servers.start(
        ANN,
        "--CheckpointApp.auto_backup=True",
        "--CheckpointApp.auto_backup_interval=1",
        "--CheckpointApp.auto_backup_tick=0.2",
    )
    kernel_id = start_kernel(server)
    client = server.client(kernel_id)
    client.execute_interactive("import time; total = 0", timeout=60)
    client.execute(LOOP)
    deadline = time.monotonic() + 60
    auto: list = []
    while time.monotonic() < deadline and not auto:
        listed = server.call("GET", "/api/ckpt/snapshots")
        auto = [s for s in listed if s["trigger"] == "auto" and s["status"] == "complete"]
        time.sleep(0.2)
    assert auto, f"no automatic snapshot of the busy kernel: {listed}"
    assert auto[0]["memory_bytes"] > 0
    assert value(client, "total") == "1225"


def test_a_bundle_moves_a_kernel_to_another_server_of_the_same_user(user_servers, users):
    a = user_servers.start(ANN, name="server-a")
    b = user_servers.start(ANN, name="server-b")
    kernel_id = start_kernel(a)
    client = a.client(kernel_id)
    client.execute_interactive("import time; total = 0; marker = 'from A'", timeout=60)
    client.execute(LOOP)
    time.sleep(1.5)
    snap = take(a, kernel_id)
    from .test_migrate import raw

    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap['id']}/bundle")
    assert status == 200
    status, body = raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)
    assert status == 201, body
    moved = b.call("POST", f"/api/ckpt/snapshots/{json.loads(body)['id']}/restore", {"mode": "new"}, timeout=120)
    there = b.client(moved["kernel_id"])
    assert value(there, "total, marker") == "(1225, 'from A')"


def test_the_helper_refuses_what_is_not_the_callers(users, helper, shared_python):
    """Bob talks to the helper directly, with crafted requests, about Ann's kernel."""
    pass
