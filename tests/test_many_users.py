"""Servers that are not root: each runs as an ordinary system user (made by
the test) and reaches CRIU through jupyter-ckpt-helper, a real root process.

What one user can do with their own kernels (snapshot mid-cell, restore in
place, fork, the magic, auto-backup, the CLI, a bundle to another server), and
what they cannot do to another user's, through the API or by talking to the
helper directly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import uuid
from pathlib import Path

import pytest

from .servers import Server, execute_started, running, take, value
from .test_ui import page  # noqa: F401 (the browser fixture)
from .users import (
    USER_PREFIX,
    RunningHelper,
    SharedPython,
    as_user,
    create_user,
    end_processes_of,
    remove_user,
    start_as_user,
)

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

    def start(
        self, user: str, *extra: str, name: str = "server", app: str = "jupyter_server", base: Path | None = None
    ) -> Server:
        """A server of ``user``'s, in a folder of its own (or ``base``: a server started again)."""
        home = base or Path(self.users[user].pw_dir) / f"{name}-{uuid.uuid4().hex[:8]}"
        home.mkdir(exist_ok=True)
        server = Server(
            home,
            # An option given twice is not "the last one wins": each is given once.
            *(
                []
                if any("helper_socket=" in e for e in extra)
                else [f"--CheckpointApp.helper_socket={self.helper.socket}"]
            ),
            *([] if any("auto_backup=" in e for e in extra) else ["--CheckpointApp.auto_backup=False"]),
            *extra,
            *(self.python.lab_args if app == "jupyterlab" else []),
            user=user,
            python=self.python.python,
            log_dir=self.tmp_path,
            app=app,
            env=self.python.env,
        )
        server.base, server.user = home, user
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        # The kernels too: the helper started them, they are not the servers' children.
        for user in {s.user for s in self.servers}:
            end_processes_of(user)
        # Their forks' namespaces, empty now (Server.kill found processes in them).
        from jupyter_ckpt import forknet

        forknet.remove_stale()


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
    execute_started(client, LOOP)
    snap = take(server, kernel_id, "mid-loop")
    assert snap["memory_bytes"] > 0 and snap["freeze_seconds"] > 0
    assert value(client, "total, 'done' in dir()") == "(1225, True)"
    client.execute_interactive("total = -1; del done", timeout=60)

    outcome = server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"}, timeout=120)
    # As for root: the kernel answers before its memory is all back, where CRIU can do that.
    from jupyter_ckpt.engine import CriuEngine

    assert outcome["lazy"] is CriuEngine().health().lazy_pages is status["features"]["lazy_restore"]
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

    # Hibernation, through the helper: the user's processes go, a wake brings them back as the user.
    gone = restored  # the kernel's own (kernel_pids also finds the fork's: same command lines)
    out = server.call("POST", f"/api/ckpt/kernels/{kernel_id}/hibernate", timeout=120)
    assert out["memory_freed_bytes"] > 0
    assert not [pid for pid in gone if running(pid)]  # gone, or exited and not yet reaped by the helper
    server.call("POST", f"/api/ckpt/kernels/{kernel_id}/wake", timeout=120)
    assert value(client, "cp.label, os.getuid()") == f"('from the magic', {ann.pw_uid})"
    for pid in kernel_pids(kernel_id):
        assert set(ids_of(pid)) == {ann.pw_uid}, pid

    # The CLI, as the user, on the user's store.
    store = server.base / "store"
    listed = as_user(ANN, user_servers.python.python, "-m", "jupyter_ckpt.cli", "--store", str(store), "list")
    assert listed.returncode == 0, listed.stderr
    assert "mid-loop" in listed.stdout and "from the magic" in listed.stdout
    check = as_user(
        ANN,
        user_servers.python.python,
        "-m",
        "jupyter_ckpt.cli",
        "check",
        "--helper-socket",
        user_servers.helper.socket,
    )
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
    # Nothing of the user's is root's: the store is theirs alone.
    for path in [store, *store.rglob("*")]:
        assert path.lstat().st_uid == ann.pw_uid, path


POOL_SETUP = (
    "import multiprocessing as mp, time, tempfile; manager = mp.Manager(); seen = manager.list(); pool = mp.Pool(2)"
)
POOL_LOOP = (
    "total = 0\n"
    "for i in range(40):\n"
    "    total += sum(pool.map(abs, range(i)))\n"
    "    seen.append(i)\n"
    "    time.sleep(0.1)\n"
    "done = (total, len(seen))"
)
POOL_RESULT = sum(sum(range(i)) for i in range(40)), 40


def test_worker_pools_of_an_ordinary_users_kernel_go_on_after_a_restore(user_servers, users):
    """multiprocessing's Pool and Manager (a server process on a unix socket,
    in TMPDIR: the kernel's own /dev/shm) through the helper, mid-computation."""
    server = user_servers.start(ANN)
    kernel_id = start_kernel(server)
    client = server.client(kernel_id)
    client.execute_interactive(POOL_SETUP, timeout=60)
    assert value(client, "tempfile.gettempdir()") == "'/dev/shm'"
    execute_started(client, POOL_LOOP)
    snap = take(server, kernel_id, "pool mid-loop")
    # A fork made while the original still runs its loop; each finishes it.
    fork = server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120)
    assert value(client, "done") == str(POOL_RESULT)
    server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"}, timeout=120)
    client = server.client(kernel_id)
    assert value(client, "done") == str(POOL_RESULT)  # the loop went on from where the snapshot caught it
    assert value(server.client(fork["kernel_id"]), "done") == str(POOL_RESULT)


def test_a_kernel_that_outlives_its_users_server_is_saved_and_comes_back(user_servers, users):
    """The server crashes; its kernel (the helper's child, not the server's)
    runs on; the next start saves it through the helper and resumes it."""
    from .test_crash import previous_run, resumed

    a = user_servers.start(ANN)
    kernel_id = start_kernel(a)
    client = a.client(kernel_id)
    assert value(client, "x = 'computed before the crash'; x") == "'computed before the crash'"
    client.stop_channels()
    a.crash()
    b = user_servers.start(ANN, "--CheckpointApp.resume_kernels=True", base=a.base)
    report = previous_run(b)
    assert [(r["kernel_id"], r["lost"]) for r in report] == [(kernel_id, False)], report
    assert value(resumed(b, kernel_id), "x") == "'computed before the crash'"


def test_without_the_helper_kernels_start_and_snapshots_say_why_not(user_servers, users, tmp_path):
    """A server that is not root, with no helper running: Jupyter works as ever,
    and every place that would snapshot says what is missing."""
    import urllib.error

    server = user_servers.start(ANN, f"--CheckpointApp.helper_socket={tmp_path}/no-helper.sock")
    status = server.call("GET", "/api/ckpt/status")
    assert not status["criu"]["available"]
    assert "helper is not reachable" in status["criu"]["reason"]
    kernel_id = start_kernel(server)
    assert value(server.client(kernel_id), "40 + 2") == "42"
    with pytest.raises(urllib.error.HTTPError) as refused_snapshot:
        server.call("POST", f"/api/ckpt/kernels/{kernel_id}/snapshots", {})
    assert refused_snapshot.value.code == 503
    assert "helper is not reachable" in refused_snapshot.value.read().decode()


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
    execute_started(client, LOOP)
    snap = take(a, kernel_id)
    from .test_migrate import raw

    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap['id']}/bundle")
    assert status == 200
    status, body = raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)
    assert status == 201, body
    moved = b.call("POST", f"/api/ckpt/snapshots/{json.loads(body)['id']}/restore", {"mode": "new"}, timeout=120)
    there = b.client(moved["kernel_id"])
    assert value(there, "total, marker") == "(1225, 'from A')"


@pytest.mark.browser
def test_the_toolbar_and_the_panel_on_an_ordinary_users_jupyterlab(user_servers, users, page):  # noqa: F811
    from .test_ui import EMPTY_NOTEBOOK, click_snapshot, last_output, open_notebook, run_cell

    ann = users[ANN]
    server = user_servers.start(ANN, app="jupyterlab")
    notebook = server.base / "root" / "story.ipynb"
    notebook.write_text(json.dumps(EMPTY_NOTEBOOK))
    os.chown(notebook, ann.pw_uid, ann.pw_gid)
    open_notebook(page, server.port, "lab/tree/story.ipynb")
    run_cell(page, "import os; x = 'before'; print('x is', x, 'as', os.getuid())")
    last_output(page, f"x is before as {ann.pw_uid}")
    assert "kernel frozen" in click_snapshot(page).inner_text()

    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    row = page.locator(".jp-ckpt-row.jp-ckpt-status-complete").first
    row.wait_for()
    run_cell(page, "x = 'after'; print('x is', x)")
    last_output(page, "x is after")
    row.locator(".jp-ToolbarButtonComponent[aria-label='Restore']").click()
    page.locator(".jp-Dialog button.jp-mod-warn").click()
    page.locator(".jp-toast-message", has_text="Kernel restored").wait_for()
    run_cell(page, "print('x is now', x)")
    last_output(page, "x is now before")


class HelperCaller:
    """Requests to the helper from a user's own process (tests/helper_calls.py)."""

    def __init__(self, helper, shared_python, users):
        self.helper, self.python, self.users = helper, shared_python, users

    def __call__(self, user: str, op: str, **spec) -> dict:
        spec = {"op": op, **spec}
        done = as_user(user, self.python.python, "-m", "tests.helper_calls", self.helper.socket, json.dumps(spec))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def folder(self, user: str, name: str) -> Path:
        path = Path(self.users[user].pw_dir) / name
        assert as_user(user, "mkdir", "-m", "700", str(path)).returncode == 0
        return path

    def sleeper(self, user: str, script: str = "exec sleep 600") -> int:
        """A process tree of ``user``'s, launched by the helper: ``script`` in sh."""
        home = self.users[user].pw_dir
        cmd = ["sh", "-c", script]
        answer = self(user, "launch", cmd=cmd, env={"PATH": "/usr/bin:/bin", "HOME": home}, cwd=home, pipes=2)
        assert answer["ok"], answer
        time.sleep(0.5)  # sh has run its commands and exec'd sleep
        return answer["pid"]

    def dump(self, user: str, pid: int, name: str) -> Path:
        images = self.folder(user, name)
        answer = self(user, "dump", pid=pid, dirs=[str(images)])
        assert answer["ok"], answer
        return images


def edit_image(path: Path, edit) -> None:
    import pycriu

    with open(path, "rb") as f:
        image = pycriu.images.load(f)
    edit(image["entries"])
    with open(path, "wb") as f:
        pycriu.images.dump(image, f)


def refused(answer: dict, *words: str) -> None:
    assert not answer["ok"], answer
    for word in words:
        assert word in answer["error"], answer["error"]


def test_the_helper_refuses_what_is_not_the_callers(users, helper, shared_python):
    """Bob talks to the helper directly, with crafted requests and images."""
    import shutil

    from jupyter_ckpt import seal

    call = HelperCaller(helper, shared_python, users)
    ann, bob = users[ANN], users[BOB]
    ann_pid = call.sleeper(ANN)
    assert ids_of(ann_pid) == [ann.pw_uid] * 4
    ann_images = call.dump(ANN, ann_pid, "ann-dump")
    assert (ann_images / seal.SEAL_FILE).stat().st_uid == ann.pw_uid
    bob_pid = call.sleeper(BOB)
    bob_images = call.dump(BOB, bob_pid, "bob-dump")
    key = (helper.state / "helper.key").read_text().strip().encode()

    def variant(name: str) -> Path:
        """A copy of Bob's images that is Bob's, to edit."""
        copy = Path(bob.pw_dir) / name
        shutil.copytree(bob_images, copy)
        for path in [copy, *copy.iterdir()]:
            os.chown(path, bob.pw_uid, bob.pw_gid, follow_symlinks=False)
        return copy

    def restore(images: Path, **spec) -> dict:
        return call(BOB, "restore", dirs=[str(images)], inherit_keys=[], **spec)

    # Another user's process: not dumped.
    refused(
        call(BOB, "dump", pid=ann_pid, dirs=[str(call.folder(BOB, "theft"))]), "not yours alone", f"uid {ann.pw_uid}"
    )
    assert not any((Path(bob.pw_dir) / "theft").iterdir())
    # Images written only into a folder of the caller's.
    refused(call(BOB, "dump", pid=bob_pid, dirs=["/etc"]), "must be a directory of yours")
    # Another user's images, handed to Bob: sealed for Ann.
    stolen = Path(bob.pw_dir) / "stolen"
    shutil.copytree(ann_images, stolen)
    for path in [stolen, *stolen.iterdir()]:
        os.chown(path, bob.pw_uid, bob.pw_gid)
    refused(restore(stolen), "another user's kernel")

    # Bob's own images, edited to run as root: the seal breaks.
    def as_root(entries):
        for core in entries:
            core["thread_core"]["creds"].update(uid=0, euid=0, suid=0, fsuid=0)

    rooted = variant("rooted")
    core = next(rooted.glob("core-*.img"))
    edit_image(core, as_root)
    refused(restore(rooted), "core-", "differs from the one the helper dumped")
    # ... and with the seal's record of that file rewritten to match (without the key).
    forged = json.loads((rooted / seal.SEAL_FILE).read_text())
    fd = os.open(core, os.O_RDONLY)
    forged["files"][core.name] = seal.describe(core.name, fd)
    os.close(fd)
    (rooted / seal.SEAL_FILE).write_text(json.dumps(forged))
    refused(restore(rooted), "does not verify")
    # ... and resealed with the helper's own key (which Bob cannot read): the
    # credentials are still checked.
    seal.seal(rooted, key, bob.pw_uid)
    refused(restore(rooted), "does not run as you", "uid=0")
    # The checks a server asks for before it stops a kernel refuse the same, and keep nothing.
    refused(call(BOB, "check_restore", dirs=[str(stolen)]), "another user's kernel")
    refused(call(BOB, "check_restore", dirs=[str(rooted)]), "does not run as you", "uid=0")
    assert call(BOB, "check_restore", dirs=[str(bob_images)])["ok"]
    assert not any((helper.state / "work").iterdir())

    # Another user's file, opened by the restored process: refused.
    def open_ann_file(entries):
        for entry in entries:
            if entry.get("type") == "REG" and entry["reg"]["name"].startswith("/usr/bin/sleep"):
                entry["reg"]["name"] = f"{ann.pw_dir}/secret"

    (Path(ann.pw_dir) / "secret").write_text("ann's")
    os.chown(Path(ann.pw_dir) / "secret", ann.pw_uid, ann.pw_gid)
    os.chmod(Path(ann.pw_dir) / "secret", 0o600)
    snooping = variant("snooping")
    edit_image(snooping / "files.img", open_ann_file)
    seal.seal(snooping, key, bob.pw_uid)
    refused(restore(snooping), "secret", "you may not open")
    # A memory image swapped for a link to root's file: not followed.
    linked = variant("linked")
    pages = next(linked.glob("pages-*.img"))
    pages.unlink()
    pages.symlink_to("/etc/shadow")
    os.chown(pages, bob.pw_uid, bob.pw_gid, follow_symlinks=False)
    refused(restore(linked), "pages-", "symbolic link")
    # Fork namespaces are their maker's.
    made = call(ANN, "network_create", outbound="host")
    assert made["ok"], made
    refused(call(BOB, "network_close", name=made["name"]), "not a fork namespace the helper made for you")
    refused(restore(variant("into-ann-net"), netns=made["name"]), "not a fork namespace the helper made for you")
    assert call(ANN, "network_close", name=made["name"])["ok"]
    # Root's ports are not handed out by moving a listener.
    refused(restore(variant("port"), listener_moves={"5555": ["127.0.0.1", 80]}), "port 80")
    refused(call(BOB, "format_disk"), "does not know")
    # A server in other namespaces (a container) is told to run the helper beside it.
    contained = subprocess.run(
        ["unshare", "--mount", "--", "setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--clear-groups"]
        + [shared_python.python, "-m", "tests.helper_calls", helper.socket, json.dumps({"op": "hello"})],
        capture_output=True,
        text=True,
        cwd=bob.pw_dir,
        env={"PATH": "/usr/bin:/bin", "HOME": bob.pw_dir},
        timeout=60,
    )
    refused(json.loads(contained.stdout), "another mnt namespace", "same container or host")
    # Nothing of the above ran anything: Ann's and Bob's sleepers are the only processes.
    for user in (ANN, BOB):
        assert as_user(user, "pgrep", "-c", "-u", user).stdout.strip() == "2"  # tini and sleep

    # What is one's own works: Ann's images restore, as Ann.
    os.kill(ann_pid, 9)
    restored = call(ANN, "restore", dirs=[str(ann_images)], inherit_keys=[])
    assert restored["ok"], restored
    assert ids_of(restored["pid"]) == [ann.pw_uid] * 4
    os.kill(restored["pid"], 9)
    os.kill(bob_pid, 9)


def test_the_helper_holds_against_swapped_paths_floods_and_privileged_programs(users, helper, shared_python):
    """What a red team tried: a path swapped for a symlink after the helper's
    checks, sockets and deleted files restored by path as root, garbage and
    idle connections, a process that ran a program with file capabilities."""
    call = HelperCaller(helper, shared_python, users)
    bob = users[BOB]
    home = Path(bob.pw_dir)

    # A file the kernel has open, swapped for a symlink to a file Bob may open
    # (so the helper's check as Bob passes): CRIU does not follow it.
    # (Of the same size: CRIU's size check must not be what stops the restore.)
    as_user(BOB, "sh", "-c", "mkdir -p ~/w && echo data > ~/w/data.txt && echo othr > ~/other.txt")
    pid = call.sleeper(BOB, "exec 3<~/w/data.txt; exec sleep 600")
    images = call.dump(BOB, pid, "swap-dump")
    os.kill(pid, 9)
    as_user(BOB, "sh", "-c", "rm ~/w/data.txt && ln -s ~/other.txt ~/w/data.txt")
    answer = call(BOB, "restore", dirs=[str(images)], inherit_keys=[])
    refused(answer, "w/data.txt", "symbolic links")

    # What CRIU would create by path as root on the host's mounts: refused.
    script = (
        "mkdir -p ~/s; python3 -c 'import socket,os,time; s=socket.socket(socket.AF_UNIX); "
        's.bind(os.path.expanduser("~/s/helper.sock")); s.listen(); time.sleep(600)\' & '
        "ln -s /dev/shm ~/l; python3 -c 'import socket,os,time; s=socket.socket(socket.AF_UNIX); "
        's.bind(os.path.expanduser("~/l/through-a-link")); s.listen(); time.sleep(600)\' & '
        "python3 -c 'import ctypes,os,time; libc=ctypes.CDLL(None); fd=libc.inotify_init(); "
        'libc.inotify_add_watch(fd, os.path.expanduser("~").encode(), 0xfff); time.sleep(600)\' & '
        "ln -s /etc /dev/shm/etc; exec 3<>~/ghost; rm ~/ghost; exec sleep 600"
    )
    pid = call.sleeper(BOB, script)
    images = call.dump(BOB, pid, "paths-dump")
    os.kill(pid, 9)
    refused(
        call(BOB, "restore", dirs=[str(images)], inherit_keys=[]),
        f"unix socket bound at {home}/s/helper.sock",
        f"{home}/ghost, deleted while open",
        "etc in the kernel's /dev/shm is a link (/etc)",
        # Bound on the kernel's own tmpfs, but by a name through the user's link:
        # CRIU binds by name, and the link could point anywhere by then.
        f"unix socket bound at {home}/l/through-a-link",
        # A watch is added again by path, as root: it would report on any folder.
        "a file-system watch (inotify or fanotify)",
    )
    # A process in a user namespace of its own (where it could mount): not dumped.
    pid = call.sleeper(BOB, "exec unshare --user --map-root-user sleep 600")
    refused(call(BOB, "dump", pid=pid, dirs=[str(call.folder(BOB, "userns-dump"))]), "user namespace of its own")
    os.kill(pid, 9)

    # A process that ran a program with file capabilities is not its user's to dump.
    capsleep = helper.dir / "capsleep"
    shutil.copy("/usr/bin/sleep", capsleep)
    subprocess.run(["setcap", "cap_net_raw+ep", str(capsleep)], check=True)
    pid = call.sleeper(BOB, f"exec {capsleep} 600")
    refused(call(BOB, "dump", pid=pid, dirs=[str(call.folder(BOB, "cap-dump"))]), "holds capabilities 0x2000")
    os.kill(pid, 9)

    # Garbage with descriptors attached leaves none open in the helper.
    def helper_fds() -> int:
        return len(os.listdir(f"/proc/{helper.proc.pid}/fd"))

    before = helper_fds()
    flood = (
        "import socket, os, sys\n"
        "for _ in range(200):\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])\n"
        "    fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(10)]\n"
        "    socket.send_fds(s, [b'[' * 100000], fds); s.recv(100); s.close()\n"
        "    [os.close(fd) for fd in fds]\n"
    )
    assert as_user(BOB, shared_python.python, "-c", flood, helper.socket).returncode == 0
    assert helper_fds() <= before + 2
    # Idle connections: a user's are capped, and others are still served.
    idle = (
        "import socket, sys, time\n"
        "held = []\n"
        "for _ in range(40):\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1]); held.append(s)\n"
        "time.sleep(1)\n"
        "def closed(s):\n"
        "    try:\n"
        "        return s.recv(10, socket.MSG_DONTWAIT) == b''\n"
        "    except BlockingIOError:\n"
        "        return False\n"
        "print(sum(map(closed, held)))\n"
    )
    import threading

    from .users import as_user as run_as

    result: dict = {}
    flooding = threading.Thread(
        target=lambda: result.update(out=run_as(BOB, shared_python.python, "-c", idle, helper.socket))
    )
    flooding.start()
    time.sleep(0.5)
    assert call(ANN, "hello")["ok"]
    flooding.join()
    assert result["out"].returncode == 0, result["out"].stderr
    assert int(result["out"].stdout) == 40 - 16  # those past --connections-per-user were closed at once
    assert call(BOB, "hello")["ok"]


def test_fork_namespaces_are_capped_per_user_and_survive_a_restart_of_the_helper(users, shared_python, tmp_path):
    state = tmp_path / "helper-state"
    helper = RunningHelper("--forks-per-user", "2", state_dir=state)
    try:
        call = HelperCaller(helper, shared_python, users)
        made = [call(BOB, "network_create", outbound="host") for _ in range(2)]
        assert all(m["ok"] for m in made), made
        refused(call(BOB, "network_create", outbound="host"), "you have 2 forked kernels' namespaces already")
        assert call(ANN, "network_create", outbound="host")["ok"]  # another user's own count
    finally:
        helper.close(keep_state=True)
    helper = RunningHelper(state_dir=state)
    try:
        call = HelperCaller(helper, shared_python, users)
        refused(call(ANN, "network_close", name=made[0]["name"]), "not a fork namespace the helper made for you")
        for m in made:
            assert call(BOB, "network_close", name=m["name"])["ok"]
    finally:
        helper.close()
        from jupyter_ckpt import forknet

        forknet.remove_stale()


def test_the_helper_links_the_memory_pages_and_copies_the_rest(users, helper, shared_python, request):
    """What a restore starts from (helper_images.take_over, as op_restore and
    op_check_restore call it): the memory pages are the user's files, linked
    where the user cannot swap them; the other images are root's own copies."""
    from jupyter_ckpt.helper_callers import Caller
    from jupyter_ckpt.helper_images import take_over

    bob = users[BOB]
    call = HelperCaller(helper, shared_python, users)
    pid = call.sleeper(BOB)
    images = call.dump(BOB, pid, "linked-pages")
    os.kill(pid, 9)
    key = (helper.state / "helper.key").read_text().strip().encode()
    # Root's folder on the images' filesystem (a link cannot cross one), as the
    # helper's state folder is on a machine that has one filesystem.
    taken = Path(bob.pw_dir).parent / f"ckpt-test-taken-{uuid.uuid4().hex[:8]}"
    taken.mkdir(mode=0o700)
    source = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        take_over(source, taken, key, Caller(os.getpid(), bob.pw_uid, bob.pw_gid, [bob.pw_gid]))
    finally:
        os.close(source)
        request.addfinalizer(lambda: shutil.rmtree(taken, ignore_errors=True))
    pages = sorted(p.name for p in images.glob("pages-*.img"))
    assert pages
    for name in pages:
        assert os.stat(taken / name).st_ino == os.stat(images / name).st_ino, name
    core = next(images.glob("core-*.img")).name
    assert os.stat(taken / core).st_ino != os.stat(images / core).st_ino
    assert os.stat(taken / core).st_uid == 0 and (taken / core).read_bytes() == (images / core).read_bytes()


def test_a_dump_whose_credentials_changed_meanwhile_is_discarded(users, helper, shared_python, tmp_path):
    """The helper reads the credentials in the images again after CRIU's dump.
    Stand-in: a process that executes a setuid program between the helper's
    check and CRIU's freeze cannot be timed from a test, so the helper (in this
    process) runs the real dump, then writes into the images what such a
    program leaves there (uid 0)."""
    from jupyter_ckpt.engine import CriuEngine
    from jupyter_ckpt.errors import DumpFailed
    from jupyter_ckpt.helper import Helper, HelperSettings
    from jupyter_ckpt.helper_callers import Caller

    def as_root(entries):
        for core in entries:
            core["thread_core"]["creds"].update(uid=0, euid=0, suid=0, fsuid=0)

    class SetuidMeanwhile(CriuEngine):
        def dump(self, pid, images_dir, **kwargs):
            result = super().dump(pid, images_dir, **kwargs)
            edit_image(next(images_dir.glob("core-*.img")), as_root)
            return result

    bob = users[BOB]
    call = HelperCaller(helper, shared_python, users)
    pid = call.sleeper(BOB)
    target = call.folder(BOB, "setuid-meanwhile")
    in_process = Helper(HelperSettings(state_dir=str(tmp_path / "state")), SetuidMeanwhile())
    caller = Caller(pid, bob.pw_uid, bob.pw_gid, sorted(set(os.getgrouplist(BOB, bob.pw_gid))))
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(DumpFailed, match="a process changed its credentials while it was dumped"):
            in_process.op_dump(caller, {"pid": pid}, [fd])
    finally:
        os.close(fd)
    assert not any(target.iterdir())  # nothing handed over
    assert not any((tmp_path / "state" / "work").iterdir())  # nor kept
    assert ids_of(pid) == [bob.pw_uid] * 4  # the process runs on
    os.kill(pid, 9)


def test_a_kernel_joins_its_users_cgroup_on_cgroup_v2(users, shared_python, tmp_path):
    """Stand-in for a cgroup v2 machine where this one has cgroup v1: the
    helper and its caller run in a mount namespace whose /sys/fs/cgroup is the
    machine's cgroup2 hierarchy (the "unified" one beside v1's). Bob's caller
    sits in a cgroup of its own there; the kernel the helper launches joins it."""
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists():  # a cgroup v2 machine: the real thing
        unified = Path("/sys/fs/cgroup")
    group = unified / f"ckpt-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    bind = 'mount --bind "$0" /sys/fs/cgroup && exec "$@"'
    helper = RunningHelper(prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", bind, str(unified)))
    bob = users[BOB]
    try:
        spec = {
            "op": "launch",
            "cmd": ["sleep", "600"],
            "env": {"PATH": "/usr/bin:/bin", "HOME": bob.pw_dir},
            "cwd": bob.pw_dir,
            "pipes": 2,
        }
        # Bob's caller: in the helper's mount namespace, moved into the group, then Bob.
        join = 'echo $$ > "/sys/fs/cgroup/$0/cgroup.procs" && exec "$@"'
        launched = subprocess.run(
            ["nsenter", "-t", str(helper.proc.pid), "-m", "sh", "-c", join, group.name]
            + ["setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--clear-groups"]
            + [shared_python.python, "-m", "tests.helper_calls", helper.socket, json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=bob.pw_dir,
            env={"PATH": "/usr/bin:/bin", "HOME": bob.pw_dir},
            timeout=60,
        )
        answer = json.loads(launched.stdout or "{}")
        assert answer.get("ok"), (answer, launched.stderr, helper.log())
        with open(f"/proc/{answer['pid']}/cgroup") as f:
            assert f"0::/{group.name}\n" in f.read()
        assert answer["pid"] in map(int, (group / "cgroup.procs").read_text().split())
        os.kill(answer["pid"], 9)
    finally:
        helper.close()
        end_processes_of(BOB)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                group.rmdir()
                break
            except OSError:  # its processes are still going
                time.sleep(0.05)


# What the README lists as the capabilities a container needs for the helper,
# by number (linux/capability.h).
CONTAINER_CAPABILITIES = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "net_admin": 12,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_admin": 21,
    "sys_time": 25,
    "checkpoint_restore": 40,
}


def test_the_helper_in_a_single_user_container_with_the_listed_capabilities(users, shared_python, tmp_path):
    """Stand-in for a docker-stacks container (there is no container runtime
    here): the helper runs as root in new pid, mount, UTS and IPC namespaces,
    on the host's network (as with docker's --network host), with only the
    capabilities the README lists; Bob's server runs in the same namespaces.
    A kernel is snapshotted, restored in place and forked."""
    bounding = ",".join(["-all", *(f"+{name}" for name in CONTAINER_CAPABILITIES)])
    container = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--uts", "--ipc")
    helper = RunningHelper(prefix=(*container, "setpriv", f"--bounding-set={bounding}", "--"))
    bob = users[BOB]
    server = None
    try:
        with open(f"/proc/{helper.proc.pid}/task/{helper.proc.pid}/children") as f:
            (inside,) = map(int, f.read().split())  # the helper, pid 1 of the container
        with open(f"/proc/{inside}/status") as f:
            effective = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
        assert effective == sum(1 << n for n in CONTAINER_CAPABILITIES.values())
        home = Path(bob.pw_dir) / f"container-{uuid.uuid4().hex[:8]}"
        (home / "root").mkdir(parents=True)
        for d in (home, home / "root"):
            os.chown(d, bob.pw_uid, bob.pw_gid)
        enter = ("nsenter", "-t", str(inside), "--pid", "--mount", "--uts", "--ipc", "--")
        as_bob = ("setpriv", f"--reuid={bob.pw_uid}", f"--regid={bob.pw_gid}", "--clear-groups", "--")
        server = Server(
            home,
            f"--CheckpointApp.helper_socket={helper.socket}",
            "--CheckpointApp.auto_backup=False",
            python=shared_python.python,
            log_dir=tmp_path,
            env=shared_python.env,
            prefix=(*enter, *as_bob),
        )
        assert server.call("GET", "/api/ckpt/status")["criu"]["available"]
        kernel_id = start_kernel(server)
        client = server.client(kernel_id)
        assert value(client, "import os; x = 'before'; os.getuid()") == str(bob.pw_uid)
        snap = take(server, kernel_id)
        assert value(client, "x = 'after'; x") == "'after'"
        server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"}, timeout=120)
        assert value(server.client(kernel_id), "x, os.getuid()") == f"('before', {bob.pw_uid})"
        fork = server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120)
        assert value(server.client(fork["kernel_id"]), "x, os.getuid()") == f"('before', {bob.pw_uid})"
        server.call("DELETE", f"/api/kernels/{fork['kernel_id']}")  # its namespace goes with it
    finally:
        if server is not None:
            server.kill()
        helper.close()  # pid 1 of the container: everything in it ends
        end_processes_of(BOB)


@pytest.mark.browser
def test_the_toolbar_and_the_panel_say_that_snapshots_need_the_helper(user_servers, users, page, tmp_path):  # noqa: F811
    from .test_ui import EMPTY_NOTEBOOK, click_snapshot, last_output, open_notebook, run_cell

    ann = users[ANN]
    server = user_servers.start(ANN, f"--CheckpointApp.helper_socket={tmp_path}/no-helper.sock", app="jupyterlab")
    notebook = server.base / "root" / "plain.ipynb"
    notebook.write_text(json.dumps(EMPTY_NOTEBOOK))
    os.chown(notebook, ann.pw_uid, ann.pw_gid)
    open_notebook(page, server.port, "lab/tree/plain.ipynb", "plain.ipynb")
    run_cell(page, "print('works', 6 * 7)")
    last_output(page, "works 42")  # Jupyter works as ever
    toast = click_snapshot(page, "Snapshot not taken")
    assert "helper is not reachable" in toast.inner_text()
    page.locator(".lm-TabBar-tab[data-id='jupyter-ckpt-panel']").click()
    disabled = page.locator(".jp-ckpt-error", has_text="Snapshots are disabled")
    disabled.wait_for()
    assert "helper is not reachable" in disabled.inner_text()


def test_a_named_pipe_is_not_restored_and_the_kernel_goes_on(user_servers, users):
    """CRIU would create a named pipe again by path, as root: the helper refuses
    to restore one. Every operation that would need that refuses before it
    touches the kernel (409, naming the pipe): restoring a snapshot holding
    it, restoring another snapshot over a kernel holding it (its state could
    not be put back should that fail), hibernating it."""
    server = user_servers.start(BOB)
    kernel_id = start_kernel(server)
    client = server.client(kernel_id)
    assert value(client, "import os; x = 1; x") == "1"
    clean = take(server, kernel_id)
    pipe = Path(users[BOB].pw_dir) / f"pipe-{kernel_id[:8]}"
    assert value(client, f"os.mkfifo({str(pipe)!r}); p = os.open({str(pipe)!r}, os.O_RDWR); x = 2; x") == "2"
    with_pipe = take(server, kernel_id)
    processes = sorted(kernel_pids(kernel_id))

    def refused(method: str, path: str, body: dict) -> str:
        with pytest.raises(urllib.error.HTTPError) as refusal:
            server.call(method, path, body, timeout=120)
        message = json.loads(refusal.value.read())["message"]
        assert refusal.value.code == 409, message
        assert f"a named pipe, {pipe}" in message, message
        assert value(client, "x") == "2"
        assert sorted(kernel_pids(kernel_id)) == processes  # never stopped, not put back: the same processes
        return message

    refused("POST", f"/api/ckpt/snapshots/{with_pipe['id']}/restore", {"mode": "replace"})
    assert "could not be brought back" in refused(
        "POST", f"/api/ckpt/snapshots/{clean['id']}/restore", {"mode": "replace"}
    )
    assert "could not be woken" in refused("POST", f"/api/ckpt/kernels/{kernel_id}/hibernate", {})
    assert not server.call("GET", f"/api/ckpt/kernels/{kernel_id}")["hibernated"]
    # Released, the clean snapshot restores.
    assert value(client, f"os.close(p); os.unlink({str(pipe)!r}); x") == "2"
    server.call("POST", f"/api/ckpt/snapshots/{clean['id']}/restore", {"mode": "replace"}, timeout=120)
    assert value(server.client(kernel_id), "x") == "1"


def test_a_refusal_of_the_helper_is_a_403_with_its_reason(user_servers, users, shared_python):
    """What the helper refuses a user (here: a fork past --forks-per-user) is a
    403 with the helper's words; the kernel goes on and no fork is left."""
    capped = RunningHelper("--forks-per-user", "0")
    try:
        server = user_servers.start(BOB, f"--CheckpointApp.helper_socket={capped.socket}")
        kernel_id = start_kernel(server)
        client = server.client(kernel_id)
        assert value(client, "x = 1; x") == "1"
        snap = take(server, kernel_id)
        with pytest.raises(urllib.error.HTTPError) as refused_fork:
            server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120)
        message = json.loads(refused_fork.value.read())["message"]
        assert refused_fork.value.code == 403, message
        assert "you have 0 forked kernels' namespaces already" in message, message
        assert value(client, "x") == "1"
        assert [k["id"] for k in server.call("GET", "/api/kernels")] == [kernel_id]
    finally:
        capped.close()


# Run as a user: connects once per request, says "connected", and sends them
# all at once when a line comes on stdin; prints the answers as a JSON list.
REQUESTS_AT_ONCE = """
import json, os, socket, sys
from jupyter_ckpt.helper_client import receive, send
path, requests = sys.argv[1], json.loads(sys.argv[2])
connections, fds = [], []
for r in requests:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    connections.append(s)
    fds.append([os.open(d, os.O_RDONLY | os.O_DIRECTORY) for d in r.pop("dirs", [])])
print("connected", flush=True)
sys.stdin.readline()
for s, r, f in zip(connections, requests, fds):
    send(s, r, f)
print(json.dumps([receive(s)[0] for s in connections]), flush=True)
"""

# Run as a user: connects, sends nothing, prints how long the helper waited
# before it closed the connection.
SILENT_CONNECTION = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(30)
started = time.monotonic()
assert s.recv(10) == b""
print(time.monotonic() - started)
"""


def traced(pid: int) -> bool:
    """Whether CRIU has seized ``pid`` (a dump of it is running)."""
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("TracerPid:")).split()[1] != "0"


def test_the_helpers_request_limits_and_a_key_shared_by_two_machines(users, shared_python, tmp_path):
    """--requests-per-user, --request-timeout, and --key-file given to two helpers."""
    key = tmp_path / "shared.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    limited = RunningHelper("--key-file", str(key), "--requests-per-user", "1", "--request-timeout", "2")
    same_key = RunningHelper("--key-file", str(key))
    own_key = RunningHelper()
    try:
        call = HelperCaller(limited, shared_python, users)
        home = Path(users[BOB].pw_dir)
        # 512 MiB of memory: its dump runs long enough to be seen running.
        big = "import time; b = b'x' * (512 << 20); open('big-ready', 'w').close(); time.sleep(600)"
        pid = call.sleeper(BOB, f'exec python3 -c "{big}"')
        deadline = time.monotonic() + 30
        while not (home / "big-ready").exists():
            assert time.monotonic() < deadline, "the sleeper did not allocate its memory"
            time.sleep(0.05)
        python = int(subprocess.check_output(["pgrep", "-u", BOB, "-f", "big-ready"], text=True).split()[0])
        folders = [call.folder(BOB, f"at-once-{i}") for i in range(3)]
        dumps = [{"op": "dump", "pid": pid, "dirs": [str(f)]} for f in folders]
        bob = start_as_user(BOB, shared_python.python, "-c", REQUESTS_AT_ONCE, limited.socket, json.dumps(dumps))
        ann = start_as_user(ANN, shared_python.python, "-c", REQUESTS_AT_ONCE, limited.socket, '[{"op": "hello"}]')
        assert bob.stdout.readline() == "connected\n" and ann.stdout.readline() == "connected\n"
        bob.stdin.write("go\n")
        bob.stdin.flush()
        while not traced(python):
            assert bob.poll() is None, "Bob's requests ended before a dump was seen running"
            time.sleep(0.01)
        ann.stdin.write("go\n")
        ann.stdin.flush()
        ann_answers = json.loads(ann.stdout.readline())
        assert traced(python), "Bob's dump ended before Ann was answered: nothing was at once"
        assert ann_answers[0]["ok"], ann_answers  # another user's requests have their own count
        bob_answers = json.loads(bob.stdout.readline())
        assert [a["ok"] for a in bob_answers].count(True) == 1, bob_answers
        for refusal in (a for a in bob_answers if not a["ok"]):
            assert "too many requests to the helper at once" in refusal["error"], refusal
        bob.wait(10), ann.wait(10)
        assert call(BOB, "hello")["ok"]  # the slot is free again

        # A connection that sends no request is closed after --request-timeout.
        silent = as_user(BOB, shared_python.python, "-c", SILENT_CONNECTION, limited.socket)
        assert silent.returncode == 0, silent.stderr
        assert 1.5 <= float(silent.stdout) < 10, silent.stdout

        # The images one helper sealed restore through another with the same
        # key (another machine), and not through one with a key of its own.
        (dumped,) = (f for f in folders if any(f.iterdir()))
        os.kill(pid, 9)
        refused(
            HelperCaller(own_key, shared_python, users)(BOB, "restore", dirs=[str(dumped)], inherit_keys=[]),
            "does not verify",
        )
        restored = HelperCaller(same_key, shared_python, users)(BOB, "restore", dirs=[str(dumped)], inherit_keys=[])
        assert restored["ok"], restored
        assert ids_of(restored["pid"]) == [users[BOB].pw_uid] * 4
        os.kill(restored["pid"], 9)
    finally:
        for helper in (limited, same_key, own_key):
            helper.close()
        end_processes_of(BOB)
        end_processes_of(ANN)


# -- JupyterHub ----------------------------------------------------------------------

HUB_PASSWORD = "a password for the test users"


class Hub:
    """A real JupyterHub (root, local process spawner, configurable-http-proxy)
    whose users log in with a password (JupyterHub's shared-password authenticator) and
    whose single-user servers run jupyter_ckpt through the helper."""

    def __init__(self, tmp_path, helper, shared_python, users):
        import subprocess
        import sys

        from .servers import free_port

        self.port, self.api_port, self.hub_port = free_port(), free_port(), free_port()
        proxy = Path(__file__).parent / "hub" / "node_modules" / ".bin" / "configurable-http-proxy"
        assert proxy.exists(), "run 'make test' (it installs configurable-http-proxy)"
        config = tmp_path / "jupyterhub_config.py"
        single_user_args = [
            f"--CheckpointApp.helper_socket={helper.socket}",
            "--CheckpointApp.auto_backup=False",
            "--ServerApp.jpserver_extensions=jupyter_ckpt=True",
        ]
        config.write_text(
            "\n".join(
                [
                    f"c.JupyterHub.bind_url = 'http://127.0.0.1:{self.port}'",
                    f"c.JupyterHub.hub_port = {self.hub_port}",
                    f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.api_port}'",
                    f"c.ConfigurableHTTPProxy.command = [{str(proxy)!r}]",
                    f"c.JupyterHub.db_url = 'sqlite:///{tmp_path}/jupyterhub.sqlite'",
                    f"c.JupyterHub.cookie_secret_file = '{tmp_path}/cookie_secret'",
                    f"c.JupyterHub.pid_file = '{tmp_path}/jupyterhub.pid'",
                    "c.JupyterHub.authenticator_class = 'shared-password'",
                    f"c.SharedPasswordAuthenticator.user_password = {HUB_PASSWORD!r}",
                    f"c.Authenticator.allowed_users = {set(users)!r}",
                    "c.JupyterHub.spawner_class = 'localprocess'",
                    f"c.Spawner.cmd = [{shared_python.python!r}, '-m', 'jupyterhub.singleuser']",
                    f"c.Spawner.args = {single_user_args!r}",
                    "c.Spawner.start_timeout = 120",
                ]
            )
        )
        self.log_path = tmp_path / "jupyterhub.log"
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=tmp_path,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.call("GET", "/hub/api/")[0] == 200:  # the proxy answers 404 until the hub's route is in
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterHub did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def call(self, method: str, path: str, body=None, token: str | None = None, timeout: float = 120):
        """(status, JSON body) of a request through the hub's proxy."""
        import urllib.error
        import urllib.request

        headers = {"Authorization": f"token {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT") else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def log_in(self, name: str) -> str:
        """A token for ``name``, got from the hub with the user's password."""
        status, body = self.call(
            "POST", f"/hub/api/users/{name}/tokens", {"auth": {"username": name, "password": HUB_PASSWORD}}
        )
        assert status == 201, body
        return body["token"]

    def start_server(self, name: str, token: str) -> str:
        """Start the user's single-user server; its URL prefix."""
        status, body = self.call("POST", f"/hub/api/users/{name}/server", token=token)
        assert status in (201, 202), body
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, user = self.call("GET", f"/hub/api/users/{name}", token=token)
            server = (user.get("servers") or {}).get("", {})
            if server.get("ready"):
                return f"/user/{name}"
            time.sleep(0.3)
        raise RuntimeError(f"{name}'s server did not start: {self.log_path.read_text()[-3000:]}")

    def close(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


@pytest.fixture
def hub(tmp_path, helper, shared_python, users):
    running = Hub(tmp_path, helper, shared_python, users)
    yield running
    running.close()


def test_jupyterhub_users_snapshot_their_own_kernels_and_nobody_elses(hub, users):
    from jupyter_client import BlockingKernelClient

    tokens = {name: hub.log_in(name) for name in (ANN, BOB)}
    prefix = {name: hub.start_server(name, tokens[name]) for name in (ANN, BOB)}
    clients, snaps = {}, {}
    for name in (ANN, BOB):
        status, kernel = hub.call("POST", f"{prefix[name]}/api/kernels", {"name": "python3"}, token=tokens[name])
        assert status == 201, kernel
        connection_file = f"{users[name].pw_dir}/.local/share/jupyter/runtime/kernel-{kernel['id']}.json"
        client = BlockingKernelClient()
        client.load_connection_file(connection_file)
        client.start_channels()
        client.wait_for_ready(timeout=60)
        assert value(client, f"who = {name!r}; import os; os.getuid()") == str(users[name].pw_uid)
        status, snap = hub.call(
            "POST", f"{prefix[name]}/api/ckpt/kernels/{kernel['id']}/snapshots", {"label": name}, token=tokens[name]
        )
        assert status == 202, snap
        deadline = time.monotonic() + 120
        while snap["status"] not in ("complete", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
            status, snap = hub.call("GET", f"{prefix[name]}/api/ckpt/snapshots/{snap['id']}", token=tokens[name])
        assert snap["status"] == "complete", snap
        client.execute_interactive("who = 'changed'", timeout=60)
        clients[name], snaps[name] = (connection_file, kernel["id"]), snap

    for name in (ANN, BOB):
        status, outcome = hub.call(
            "POST",
            f"{prefix[name]}/api/ckpt/snapshots/{snaps[name]['id']}/restore",
            {"mode": "replace"},
            token=tokens[name],
        )
        assert status == 200, outcome
        client = BlockingKernelClient()
        client.load_connection_file(clients[name][0])
        client.start_channels()
        assert value(client, "who, os.getuid()") == f"({name!r}, {users[name].pw_uid})"

    # Ann's snapshot is not visible to Bob, on his server or through hers.
    ann_snap, ann_kernel = snaps[ANN]["id"], clients[ANN][1]
    status, listed = hub.call("GET", f"{prefix[BOB]}/api/ckpt/snapshots", token=tokens[BOB])
    assert status == 200 and [s["label"] for s in listed] == [BOB]
    assert hub.call("GET", f"{prefix[BOB]}/api/ckpt/snapshots/{ann_snap}", token=tokens[BOB])[0] == 404
    for method, path, body in (
        ("GET", "/api/ckpt/snapshots", None),
        ("GET", f"/api/ckpt/snapshots/{ann_snap}", None),
        ("GET", f"/api/ckpt/snapshots/{ann_snap}/bundle", None),
        ("POST", f"/api/ckpt/kernels/{ann_kernel}/snapshots", {}),
        ("POST", f"/api/ckpt/snapshots/{ann_snap}/restore", {"mode": "new"}),
        ("DELETE", f"/api/ckpt/snapshots/{ann_snap}", None),
    ):
        status, body = hub.call(method, f"{prefix[ANN]}{path}", body, token=tokens[BOB])
        assert status == 403, (method, path, status, body)
    status, listed = hub.call("GET", f"{prefix[ANN]}/api/ckpt/snapshots", token=tokens[ANN])
    assert [s["label"] for s in listed] == [ANN]  # nothing of Ann's was deleted or added
