"""A server killed with SIGKILL in the middle of a snapshot leaves the store
consistent: nothing half-written is listed as restorable, and gc reclaims what
the interrupted snapshot had stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from jupyter_ckpt.store import SnapshotStore

from .servers import Server, call, descendants, take, value

pytestmark = [pytest.mark.criu, pytest.mark.slow]


@pytest.fixture
def server(tmp_path):
    running = Server(tmp_path)
    yield running.proc, running.port, tmp_path / "store"
    running.kill()


@pytest.mark.parametrize("kill_while", ["dumping", "storing"])
def test_sigkill_mid_snapshot_leaves_store_consistent(server, kill_while):
    proc, port, store = server
    kernel = call(port, "POST", "/api/kernels", {"name": "python3"})
    code = "import numpy as np; a = np.random.default_rng(0).random(50_000_000)"  # 400 MB
    # Run the code through a client of its own, then snapshot from another thread.
    from jupyter_client import BlockingKernelClient

    client = BlockingKernelClient()
    client.load_connection_file(str(store.parent / "runtime" / f"kernel-{kernel['id']}.json"))
    client.start_channels()
    client.wait_for_ready(timeout=60)
    assert client.execute_interactive(code, timeout=120)["content"]["status"] == "ok"
    client.stop_channels()
    kernel_tree = descendants(proc.pid)

    import threading

    def take_snapshot() -> None:
        try:
            call(port, "POST", f"/api/ckpt/kernels/{kernel['id']}/snapshots", timeout=120)
        except OSError:
            pass  # the server is killed under it

    threading.Thread(target=take_snapshot, daemon=True).start()
    records = store / "state" / "records"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [json.loads(p.read_text()) for p in records.glob("*.json")] if records.exists() else []
        # "storing": wait until some chunks are in the store, so the kill leaves
        # stored packs that no manifest refers to.
        packs = list((store / "packs").glob("*.pack")) if kill_while == "storing" else [True]
        if any(r["status"] == kill_while for r in found) and packs:
            break
        time.sleep(0.005)
    else:
        pytest.fail(f"the snapshot never reached {kill_while}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in kernel_tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    reopened = SnapshotStore(store)
    assert reopened.recover() != []  # what the next server start does
    listed = reopened.list()
    assert listed and all(not r.restorable for r in listed)
    assert all(r.status == "failed" and "server stopped" in r.error for r in listed)
    assert not any((store / "state" / "staging").iterdir())
    deleted, freed = reopened.gc()
    if kill_while == "storing":
        assert deleted > 0 and freed > 10 * 2**20
    assert not list((store / "packs").glob("*.pack"))  # nothing stored survives unreferenced
    reopened.close()


# -- a server that dies without warning: the next start mends what it left -----


def leftovers(tmp_path) -> dict[str, list]:
    """What a run must not leave: criu processes, CRIU network locks, fork
    namespaces and their veths, scratch folders, journal entries."""
    criu = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and (argv[0].startswith(b"criu:") or os.path.basename(argv[0]) == b"criu"):
                criu.append(int(entry))
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    state = tmp_path / "store" / "state"
    return {
        "criu processes": criu,
        "CRIU tables": [line for line in tables.splitlines() if "CRIU-" in line],
        "fork namespaces": [n for n in os.listdir("/run/netns") if n.startswith("ckpt-fork-")]
        if os.path.isdir("/run/netns")
        else [],
        "veths": [
            line
            for line in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
            if ": ckh" in line
        ],
        "scratch": sorted(p.name for p in (state / "tmp").iterdir()) if (state / "tmp").exists() else [],
        "journal": sorted(p.name for p in (state / "operations").iterdir()) if (state / "operations").exists() else [],
    }


def nothing_left(tmp_path) -> None:
    deadline = time.monotonic() + 30
    while (found := {k: v for k, v in leftovers(tmp_path).items() if v}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not found, found


def wait_for(predicate, timeout: float = 60, what: str = "it"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never happened")
        time.sleep(0.005)
    return result


def previous_run(server: Server) -> list[dict]:
    """What the server's start found of the previous run, once it is done."""
    return wait_for(
        lambda: (
            server.call("GET", "/api/ckpt/status")["previous_run"] is not None
            and server.call("GET", "/api/ckpt/status")["previous_run"]
        ),
        120,
        "mending the previous run",
    )


def resumed(server: Server, kernel_id: str):
    """A client of the kernel once the server has restored it (not GET
    /api/kernels: jupyter_server answers it 500 while a kernel is starting)."""

    def back() -> bool:
        try:
            kernel = server.call("GET", f"/api/ckpt/kernels/{kernel_id}")
        except OSError:
            return False
        return kernel["restored_from"] is not None and not kernel["busy"]

    wait_for(back, 120, f"kernel {kernel_id} resumed")
    return server.client(kernel_id)


def start_big_kernel(server: Server) -> tuple[str, object]:
    kernel_id = server.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = server.client(kernel_id)
    value(client, "import numpy as np; a = np.random.default_rng(0).random(40_000_000); x = 'old'")  # 320 MB
    return kernel_id, client


def in_background(call) -> None:
    def run() -> None:
        try:
            call()
        except OSError:
            pass  # the server dies under it

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.timeout(240)
def test_a_kernel_that_outlives_its_server_is_saved_and_comes_back(tmp_path):
    a = Server(tmp_path)
    kernel_id, client = start_big_kernel(a)
    take(a, kernel_id, label="old")
    value(client, "x = 'computed after the last snapshot'; import threading; t = threading.Thread(target=lambda: None)")
    client.stop_channels()
    orphan = a.call("GET", "/api/kernels")[0]
    a.crash()  # the kernel runs on, orphaned
    b = Server(tmp_path, "--CheckpointApp.resume_kernels=True")
    try:
        report = previous_run(b)
        assert [(r["kernel_id"], r["lost"]) for r in report] == [(kernel_id, False)], report
        assert "saved as snapshot" in report[0]["message"]
        client = resumed(b, kernel_id)
        assert value(client, "x") == "'computed after the last snapshot'"  # nothing was lost
        assert value(client, "round(float(a.sum()))") == str(
            round(float(__import__("numpy").random.default_rng(0).random(40_000_000).sum()))
        )
        client.stop_channels()
        assert orphan["id"] == kernel_id
        nothing_left(tmp_path)
    finally:
        b.kill()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("phase", ["saving the previous state", "restoring"])
def test_a_restore_cut_short_by_a_crash(tmp_path, phase):
    """Killed while the restore saves the kernel's state, or while CRIU restores:
    at the next start the kernel is back, with its state before the restore or
    the snapshot's, whichever is complete; nothing is left behind."""
    a = Server(tmp_path)
    kernel_id, client = start_big_kernel(a)
    snap = take(a, kernel_id)
    value(client, "x = 'new'")
    client.stop_channels()
    tmp = tmp_path / "store" / "state" / "tmp"
    marker = "previous-state/dump.log" if phase == "saving the previous state" else "restore.log"
    in_background(lambda: a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"}, timeout=120))
    wait_for(lambda: list(tmp.glob(f"restore-*/{marker}")), what=phase)
    a.crash()
    b = Server(tmp_path, "--CheckpointApp.resume_kernels=True")
    try:
        report = previous_run(b)
        assert report and all(not r["lost"] for r in report), report
        client = resumed(b, kernel_id)
        assert value(client, "x") in ("'old'", "'new'")
        client.stop_channels()
        nothing_left(tmp_path)
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_a_fork_cut_short_by_a_crash_leaves_nothing(tmp_path):
    a = Server(tmp_path)
    kernel_id, client = start_big_kernel(a)
    snap = take(a, kernel_id)
    client.stop_channels()
    in_background(lambda: a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"}, timeout=120))
    wait_for(lambda: list((tmp_path / "store" / "state" / "tmp").glob("fork-*/restore.log")), what="the fork's restore")
    a.crash()
    b = Server(tmp_path, "--CheckpointApp.resume_kernels=True")
    try:
        report = {r["kernel_id"]: r for r in previous_run(b)}
        assert not report[kernel_id]["lost"]  # the original, saved
        forks = [r for k, r in report.items() if k != kernel_id]
        assert len(forks) == 1 and "cut short" in forks[0]["message"], report
        client = resumed(b, kernel_id)
        assert value(client, "x") == "'old'"
        client.stop_channels()
        nothing_left(tmp_path)
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_a_running_fork_outlives_its_server_and_the_next_start_clears_its_namespace(tmp_path):
    """A fork that runs when its server dies: the next start saves it like any
    kernel, stops it, and removes its network namespace and veth."""
    a = Server(tmp_path)
    kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = a.client(kernel_id)
    value(client, "x = 'original'")
    client.stop_channels()
    snap = take(a, kernel_id)
    fork_id = a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"})["kernel_id"]
    forked = a.client(fork_id)
    value(forked, "x = 'changed in the fork'")
    forked.stop_channels()
    a.crash()  # the original and the fork run on, orphaned
    assert leftovers(tmp_path)["fork namespaces"], "the fork's namespace went with the server"
    b = Server(tmp_path)
    try:
        report = {r["kernel_id"]: r for r in previous_run(b)}
        assert set(report) == {kernel_id, fork_id} and not report[fork_id]["lost"], report
        assert "saved as snapshot" in report[fork_id]["message"]
        nothing_left(tmp_path)  # its namespace and veth included
        saved = [s for s in b.call("GET", f"/api/ckpt/snapshots?kernel_id={fork_id}") if s["id"] != snap["id"]]
        assert [s["label"] for s in saved] == ["saved when the server restarted: it ran on after its server stopped"]
    finally:
        b.kill()
