"""Recovery across real server restarts: the kernel is gone, its snapshots are
not; a restore starts it again for its notebook, or the next server resumes it."""

from __future__ import annotations

import time

import pytest

from .servers import Server, take, value

pytestmark = [pytest.mark.criu, pytest.mark.slow]


def first_run(tmp_path) -> tuple[str, str]:
    a = Server(tmp_path)
    session = a.call(
        "POST",
        "/api/sessions",
        {"path": "work/analysis.ipynb", "name": "analysis.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    kernel_id = session["kernel"]["id"]
    client = a.client(kernel_id)
    value(client, "import threading; x = 'from the first run'; t = threading.Thread(target=lambda: None)")
    client.stop_channels()
    snap = take(a, kernel_id, label="before the crash")
    a.kill()
    return kernel_id, snap["id"]


@pytest.mark.timeout(240)
def test_restore_after_restart_starts_the_kernel_again_for_its_notebook(tmp_path):
    kernel_id, snapshot_id = first_run(tmp_path)
    b = Server(tmp_path)
    try:
        listed = b.call("GET", "/api/ckpt/snapshots")
        assert [s["id"] for s in listed] == [snapshot_id]
        assert listed[0]["path"] == "work/analysis.ipynb"
        assert b.call("GET", "/api/kernels") == []
        outcome = b.call("POST", f"/api/ckpt/snapshots/{snapshot_id}/restore", {"mode": "replace"})
        assert outcome["kernel_id"] == kernel_id
        sessions = b.call("GET", "/api/sessions")
        assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("work/analysis.ipynb", kernel_id)]
        client = b.client(kernel_id)
        assert value(client, "x") == "'from the first run'"
        # The recovered kernel can snapshot itself: its credential survived the restart.
        assert "Snapshot" in value(client, "str(__import__('jupyter_ckpt').checkpoint('after recovery'))")
        client.stop_channels()
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_resume_kernels_at_start(tmp_path):
    kernel_id, snapshot_id = first_run(tmp_path)
    b = Server(tmp_path, "--CheckpointApp.resume_kernels=True")
    try:
        for _ in range(300):
            if b.call("GET", "/api/sessions"):
                break
            time.sleep(0.1)
        sessions = b.call("GET", "/api/sessions")
        assert [(s["path"], s["kernel"]["id"]) for s in sessions] == [("work/analysis.ipynb", kernel_id)]
        client = b.client(kernel_id)
        assert value(client, "x") == "'from the first run'"
        client.stop_channels()
    finally:
        b.kill()


@pytest.mark.timeout(240)
def test_a_fork_comes_back_as_a_fork_after_a_restart(tmp_path):
    """A snapshot of a fork whose server went away: restoring it brings the
    fork back under its own id, in a network namespace of its own again."""
    from jupyter_ckpt import forknet

    a = Server(tmp_path)
    try:
        kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
        client = a.client(kernel_id)
        value(client, "x = 'original'")
        client.stop_channels()
        snap = take(a, kernel_id)
        fork_id = a.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "new"})["kernel_id"]
        forked = a.client(fork_id)
        value(forked, "x = 'the fork'")
        forked.stop_channels()
        fork_snap = take(a, fork_id)
    finally:
        a.kill()
    forknet.remove_stale()  # as the next server does at start

    b = Server(tmp_path)
    try:
        outcome = b.call("POST", f"/api/ckpt/snapshots/{fork_snap['id']}/restore", {"mode": "replace"})
        assert outcome["kernel_id"] == fork_id and outcome["mode"] == "replace"
        client = b.client(fork_id)
        assert value(client, "x") == "'the fork'"
        assert client.transport == "tcp" and client.ip.startswith("10.213.")
        client.stop_channels()
    finally:
        b.kill()
        forknet.remove_stale()
