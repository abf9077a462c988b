"""The ``%checkpoint`` magic and ``jupyter_ckpt.checkpoint()``, inside a kernel.

Loaded in every IPython kernel the server starts (``--ext jupyter_ckpt.magic``),
elsewhere with ``%load_ext jupyter_ckpt``. The kernel talks to its server with
the credential the provisioner gave it (``JUPYTER_CKPT_*`` variables): a token
valid for this kernel's own snapshots only, not the user's server token.

Like fork(), a checkpoint returns twice: once in the kernel that took it, once
more in any kernel later restored from it (the restored process resumes inside
the same call, waiting for the snapshot to finish). The result says which::

    cp = checkpoint("epoch 10")
    if cp.restored:
        print("back from", cp.id)
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

ENV_URL = "JUPYTER_CKPT_URL"
ENV_URL_FILE = "JUPYTER_CKPT_URL_FILE"  # the current server's URL: it may have moved since launch
ENV_KERNEL = "JUPYTER_CKPT_KERNEL_ID"
ENV_TOKEN = "JUPYTER_CKPT_KERNEL_TOKEN"


class CheckpointUnavailable(RuntimeError):
    pass


class ServerUnreachable(CheckpointUnavailable):
    pass


FORK_UNREACHABLE = (
    "this kernel was restored as a new kernel (a fork): it runs in a network namespace of its own, "
    "from where it cannot reach the Jupyter server to snapshot itself; use the Snapshot button or the REST API"
)


def in_fork() -> bool:
    """Is this kernel a fork, in a network namespace of its own? Its namespace
    has the kernel's end of a veth pair (named by forknet.ForkNetwork)."""
    from .forknet import KERNEL_INTERFACE_PREFIX

    try:
        with open("/proc/self/net/dev") as f:
            return any(line.strip().startswith(KERNEL_INTERFACE_PREFIX) for line in f)
    except OSError:
        return False


@dataclass
class Checkpoint:
    id: str
    label: str
    restored: bool  # True in a kernel restored from this snapshot
    memory_bytes: int
    freeze_seconds: float | None

    def __str__(self) -> str:
        if self.restored:
            return f"Restored from snapshot {self.id}" + (f" ({self.label})" if self.label else "")
        frozen = f", kernel frozen {self.freeze_seconds:.2f} s" if self.freeze_seconds is not None else ""
        return f"Snapshot {self.id}: {self.memory_bytes / 2**20:.0f} MiB{frozen}"


class SelfClient:
    """This kernel's side of /api/ckpt/self/<kernel id>."""

    def __init__(self) -> None:
        try:
            self.base = os.environ[ENV_URL].rstrip("/")
            self.kernel_id = os.environ[ENV_KERNEL]
            self.token = os.environ[ENV_TOKEN]
        except KeyError:
            raise CheckpointUnavailable(
                "this kernel was not started by a Jupyter server with jupyter-ckpt, so it cannot snapshot itself"
            ) from None

    def server(self) -> str:
        try:
            with open(os.environ[ENV_URL_FILE]) as f:
                return f.read().strip().rstrip("/") or self.base
        except (KeyError, OSError):
            return self.base

    def call(self, method: str, path: str = "", body: dict | None = None, retries: int = 100) -> Any:
        url = f"{self.server()}/api/ckpt/self/{self.kernel_id}{path}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(retries):
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("Authorization", f"ckpt-kernel {self.token}")
            req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as e:
                try:
                    message = json.loads(e.read()).get("message", str(e))
                except ValueError:
                    message = str(e)
                raise CheckpointUnavailable(message) from None
            except (urllib.error.URLError, OSError) as e:  # ConnectionError, ENOTCONN, timeouts
                if in_fork():
                    raise ServerUnreachable(FORK_UNREACHABLE) from None
                # A restore closes this process's connections: try again.
                if method != "GET" or attempt == retries - 1:
                    raise ServerUnreachable(f"cannot reach the Jupyter server at {url}: {e}") from None
                time.sleep(0.1)


def checkpoint(label: str = "", timeout: float = 3600.0) -> Checkpoint:
    """Snapshot this kernel and return once the snapshot is stored."""
    client = SelfClient()
    snap = client.call("POST", "/snapshots", {"label": label})
    deadline = time.monotonic() + timeout
    try:
        # A restored copy of this kernel resumes in this loop.
        while snap["status"] not in ("complete", "failed"):
            if time.monotonic() > deadline:
                raise CheckpointUnavailable(f"snapshot {snap['id']} did not finish within {timeout:.0f} s")
            time.sleep(0.05)
            snap = client.call("GET", f"/snapshots/{snap['id']}")
        if snap["status"] == "failed":
            raise CheckpointUnavailable(f"snapshot failed: {snap.get('error')}")
        me = client.call("GET")
    except ServerUnreachable:
        if not in_fork():
            raise
        # Only a copy restored as a new kernel resumes here without a server to
        # ask: the snapshot it was restored from is the one being taken.
        return Checkpoint(
            id=snap["id"], label=snap.get("label") or "", restored=True, memory_bytes=0, freeze_seconds=None
        )
    # A restored copy goes on only once the notebook is connected to it again:
    # what it prints before would be lost.
    while not me.get("settled", True) and time.monotonic() < deadline:
        time.sleep(0.05)
        me = client.call("GET")
    return Checkpoint(
        id=snap["id"],
        label=snap.get("label") or "",
        restored=me.get("restored_from") == snap["id"],
        memory_bytes=snap.get("memory_bytes") or 0,
        freeze_seconds=snap.get("freeze_seconds"),
    )


def _checkpoint_magic(line: str) -> Checkpoint | None:
    """%checkpoint [label] | list | auto <seconds> | auto off"""
    words = line.split()
    try:
        if words[:1] == ["list"]:
            for s in SelfClient().call("GET", "/snapshots"):
                size = f"{(s.get('memory_bytes') or 0) / 2**20:.0f} MiB"
                print(
                    f"{s['id']}  {s['created'][:19]}  {s['trigger']:6}  {s['status']:8}  {size:>9}  {s.get('label') or ''}"
                )
            return None
        if words[:1] == ["auto"]:
            if len(words) != 2:
                print("usage: %checkpoint auto <seconds> | %checkpoint auto off")
                return None
            body = {"enabled": False} if words[1] == "off" else {"enabled": True, "interval_seconds": float(words[1])}
            sched = SelfClient().call("PUT", "/schedule", body)
            print(
                f"auto-backup every {sched['interval_seconds']:g} s, keeping {sched['keep']}"
                if sched["enabled"]
                else "auto-backup off"
            )
            return None
        cp = checkpoint(line.strip())
    except (CheckpointUnavailable, ValueError) as e:
        print(f"checkpoint: {e}")
        return None
    print(cp)
    return cp


def _process_start() -> str:
    """When this process started. A restored process is a new one to the
    kernel (CRIU cannot set it), so this changes with every restore and never
    comes back (a pid namespace's id can: freed ids are reused)."""
    try:
        with open("/proc/self/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class HistoryAfterRestore:
    """Gives a restored kernel a new IPython history session before it writes
    any history.

    A restored process is a new process to the kernel. It still numbers its history lines from the snapshot on, while the original
    may have written those numbers since: without a session of its own, the
    first write after a restore fails with IPython's "ERROR! Session/line number
    was not unique in database". The write may come from IPython's saving
    thread (lines cached at the snapshot) or from the next cell, so both paths
    check first."""

    def __init__(self, history: Any):
        self.history = history
        self.started = _process_start()
        self.lock = threading.Lock()
        writeout = history.writeout_cache

        def writeout_cache(conn: Any = None) -> None:
            self.check(conn)
            writeout(conn)

        history.writeout_cache = writeout_cache  # the saving thread calls it through the instance

    def check(self, conn: Any = None) -> None:
        with self.lock:
            started = _process_start()
            if started == self.started:
                return
            self.started = started
            if getattr(self.history, "enabled", False):
                self.history.new_session(conn)

    def pre_execute(self) -> None:
        self.check()


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magic_function(_checkpoint_magic, magic_kind="line", magic_name="checkpoint")
    ipython.user_ns.setdefault("checkpoint", checkpoint)
    history = getattr(ipython, "history_manager", None)
    if history is not None:
        ipython.events.register("pre_execute", HistoryAfterRestore(history).pre_execute)
