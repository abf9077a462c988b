"""Real `jupyter server` (or `jupyter lab`) processes for the tests that need a
server of their own: crashes, restarts, a second server, the browser."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from jupyter_client import BlockingKernelClient

TOKEN = "crash-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(
    port: int, method: str, path: str, body: dict | None = None, timeout: float = 60, host: str = "127.0.0.1"
) -> dict:
    req = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=json.dumps(body or {}).encode() if method != "GET" else None,
        method=method,
        headers={"Authorization": f"token {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def cmdline(pid: int) -> list[str]:
    """A process's arguments ([] once it is gone). criu rewrites its own:
    "criu: dump --rpc -t PID" while it dumps."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    out += [child, *descendants(child)]
        except OSError:
            pass
    return out


class Server:
    """A real server process with its own root (``tmp_path/root``), runtime dir
    and store; ``app`` is the module run (``jupyter_server`` or ``jupyterlab``).

    With ``netns``, it runs in that network namespace (standing for another
    host) and listens on ``host`` there."""

    def __init__(
        self,
        tmp_path,
        *extra: str,
        app: str = "jupyter_server",
        netns: str | None = None,
        host: str = "127.0.0.1",
        local_store: bool = True,
        user: str | None = None,
        python: str = sys.executable,
        log_dir=None,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ):
        """With ``user``, the server runs as that system user, with ``python``
        (an interpreter that user can run), and ``tmp_path`` must be theirs.
        ``prefix``: a command the server is run through (it must exec it)."""
        self.port = free_port() if netns is None else 8888
        self.host = host
        self.runtime = tmp_path / "runtime"
        (tmp_path / "root").mkdir(exist_ok=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            for d in (tmp_path, tmp_path / "root"):
                os.chown(d, entry.pw_uid, entry.pw_gid)
        prefix = [*prefix, *(["ip", "netns", "exec", netns] if netns else [])]
        self.log_path = (log_dir or tmp_path) / f"server-{self.port}-{time.monotonic_ns()}.log"  # read it on failure
        log = open(self.log_path, "wb")
        extra_env = env or {}
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(self.runtime), HOME=str(tmp_path), **extra_env)
        as_user: dict = {}
        if user is not None:
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": str(tmp_path)}
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": entry.pw_dir,
                "USER": user,
                "JUPYTER_RUNTIME_DIR": str(self.runtime),
                **extra_env,
            }
        self.proc = subprocess.Popen(
            [
                *prefix,
                python,
                "-m",
                app,
                "--allow-root",
                "--no-browser",
                f"--port={self.port}",
                f"--ip={host}",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={tmp_path / 'root'}",
                "--ServerApp.jpserver_extensions=jupyter_ckpt=True",
                *([f"--CheckpointApp.store_root={tmp_path / 'store'}"] if local_store else []),
                *extra,
            ],
            stdout=log,
            stderr=log,
            env=env,
            **as_user,
        )
        for _ in range(300):
            try:
                self.call("GET", "/api/ckpt/status", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")

    def call(self, method, path, body=None, timeout=60):
        return call(self.port, method, path, body, timeout, host=self.host)

    def client(self, kernel_id: str) -> BlockingKernelClient:
        client = BlockingKernelClient()
        client.load_connection_file(str(self.runtime / f"kernel-{kernel_id}.json"))
        client.start_channels()
        client.wait_for_ready(timeout=60)
        return client

    def stop(self, timeout: float = 60) -> None:
        """As a user stops it (POST /api/shutdown): extensions stop, then kernels are shut down."""
        if self.proc.poll() is None:
            try:
                self.call("POST", "/api/shutdown", timeout=timeout)
            except OSError:
                pass  # it closed the connection while going
        self.proc.wait(timeout=timeout)

    def crash(self) -> None:
        """As a crash of the server alone would (SIGKILL): its kernels run on."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill(self) -> None:
        """As a reboot would: the server and its kernels, at once."""
        if self.proc.poll() is None:
            for pid in [*descendants(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        # A reboot empties /run/netns too: the namespaces of its forks go.
        from jupyter_ckpt import forknet

        forknet.remove_stale()


def value(client: BlockingKernelClient, expr: str) -> str:
    out = {}
    reply = client.execute_interactive(
        expr,
        timeout=60,
        output_hook=lambda m: out.update(m["content"].get("data", {})) if m["msg_type"] == "execute_result" else None,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    return out.get("text/plain")


def execute_started(client: BlockingKernelClient, code: str, timeout: float = 60) -> str:
    """Send a cell and return once the kernel runs it (its busy status for that
    request): a snapshot taken after this catches the cell mid-run."""
    msg_id = client.execute(code)
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "busy"
        ):
            return msg_id


def wait_for_output(client: BlockingKernelClient, text: str, timeout: float = 60) -> None:
    """Until a cell of this client prints ``text`` (on its stdout)."""
    deadline = time.monotonic() + timeout
    seen = ""
    while text not in seen:
        msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]


def take(server: Server, kernel_id: str, label: str = "") -> dict:
    """Take a snapshot through the API and wait until it is complete."""
    snap = server.call("POST", f"/api/ckpt/kernels/{kernel_id}/snapshots", {"label": label})
    while snap["status"] not in ("complete", "failed"):
        time.sleep(0.05)
        snap = server.call("GET", f"/api/ckpt/snapshots/{snap['id']}")
    assert snap["status"] == "complete", snap
    return snap
