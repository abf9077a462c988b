"""Snapshot and restore of live kernels through a real server, real CRIU."""

from __future__ import annotations

import ast
import os

import pytest

from .client import api, restore, snapshot

pytestmark = pytest.mark.criu


async def test_round_trip_keeps_kernel_id_and_connected_client(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute("x = 41")
    snap = await snapshot(jp_fetch, kernel_id, label="before change")
    assert snap["kernel_id"] == kernel_id
    assert snap["label"] == "before change"
    assert snap["memory_bytes"] > 1_000_000
    assert 0 < snap["freeze_seconds"] <= snap["total_seconds"]
    assert snap["execution_count"] == 2

    await sock.execute("x = 99")
    out = await restore(jp_fetch, snap["id"])
    assert out["kernel_id"] == kernel_id

    # The websocket opened before the restore is the one that gets the answer.
    assert await sock.value("x") == "41"
    status, kernels = await api(jp_fetch, "GET", "api", "kernels")
    assert [k["id"] for k in kernels] == [kernel_id]


LOOP = """
import hashlib, time
h = hashlib.sha256()
for i in range(100):
    h.update(str(i * i).encode())
    time.sleep(0.05)
    if i % 10 == 9:
        print("progress", i + 1, flush=True)
print("result", h.hexdigest(), flush=True)
"""


async def test_snapshot_mid_cell_then_restore_continues_the_loop(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    run = await sock.send_execute(LOOP)
    await sock.wait_until(lambda: "progress 30" in run.stdout, timeout=30)
    snap = await snapshot(jp_fetch, kernel_id)  # while the cell runs
    assert snap["status"] == "complete"
    await sock.finish(run, timeout=60)
    uninterrupted = run.stdout.split("result ")[1].strip()
    progress_at_snapshot = max(int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("progress"))
    assert progress_at_snapshot == 100

    # Restore: the same cell goes on from where the snapshot caught it, and its
    # output after the restore reaches the client connected before.
    run.stdout, run.status, run.idle = "", None, False
    await restore(jp_fetch, snap["id"])
    await sock.finish(run, timeout=60)
    assert run.status == "ok"
    assert "progress 100" in run.stdout
    assert "progress 10\n" not in run.stdout  # it did not start over
    assert run.stdout.split("result ")[1].strip() == uninterrupted


ZOO_SETUP = r"""
import io, mmap, os, random, socket, sqlite3, subprocess, sys, tempfile, threading, time
import numpy as np

def gen():
    n = 0
    while True:
        yield n
        n += 1
g = gen(); [next(g) for _ in range(5)]

counter = {"n": 0}
def tick():
    while True:
        counter["n"] += 1
        time.sleep(0.01)
ticker = threading.Thread(target=tick, daemon=True); ticker.start()

path = os.path.join(tempfile.mkdtemp(), "data.txt")
with open(path, "w") as w:
    w.write("0123456789abcdefghij")
f = open(path); f.read(7)

db = sqlite3.connect(":memory:")
db.execute("create table t (k integer, v text)")
db.executemany("insert into t values (?, ?)", [(i, str(i)) for i in range(1000)])

child = subprocess.Popen([sys.executable, "-u", "-c",
    "import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

def make_acc():
    total = [0]
    def add(x):
        total[0] += x
        return total[0]
    return add
acc = make_acc(); acc(10)

arr = np.random.default_rng(7).random((500, 500))
random.seed(1234); random.random()
m = mmap.mmap(-1, 4096); m.write(b"mapped-bytes")
a, b = socket.socketpair(); a.sendall(b"unread-data")

def probe():
    # Consumes state on purpose: run once before and once after the restore,
    # both must see the state of the snapshot.
    child.stdin.write("ping\n"); child.stdin.flush()
    c0 = counter["n"]; time.sleep(0.2)
    return {
        "gen": [next(g) for _ in range(3)],
        "file": (f.tell(), f.read(5)),
        "sqlite": db.execute("select count(*), sum(k) from t").fetchone(),
        "child": (child.poll(), child.stdout.readline().strip()),
        "closure": acc(5),
        "numpy": round(float(arr.sum()), 6),
        "random": random.random(),
        "mmap": (m.seek(0), m.read(12))[1],
        "socketpair": b.recv(100),
        "thread": (ticker.is_alive(), counter["n"] > c0),
    }
"""


async def test_zoo_of_state_that_pickling_cannot_save(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute(ZOO_SETUP)
    snap = await snapshot(jp_fetch, kernel_id, label="zoo")
    before = await sock.value("probe()")
    await restore(jp_fetch, snap["id"])
    after = await sock.value("probe()")
    assert after == before
    assert "'child': (None, 'PING')" in after
    assert "'thread': (True, True)" in after
    assert "'socketpair': b'unread-data'" in after
    assert "'gen': [5, 6, 7]" in after


async def test_five_snapshot_restore_cycles(jp_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    parents, ids = [], []
    for i in range(5):
        await sock.execute(f"x = {i}")
        snap = await snapshot(jp_fetch, kernel_id)
        parents.append(snap["parent_id"])
        ids.append(snap["id"])
        await sock.execute("x = -1")
        await restore(jp_fetch, snap["id"])
        assert await sock.value("x") == str(i)
    # Each snapshot's parent is the one the kernel was restored from: the one before it.
    assert parents == [None, *ids[:-1]]


async def test_restore_after_history_database_grew(jp_fetch, start_kernel):
    # IPython keeps ~/.ipython/.../history.sqlite open; 30 long cells make it
    # grow well past the size it had at the snapshot.
    kernel_id, sock = await start_kernel()
    await sock.execute("import os, IPython; x = 'kept'")
    hist = ast.literal_eval(await sock.value("str(IPython.get_ipython().history_manager.hist_file)"))
    snap = await snapshot(jp_fetch, kernel_id)
    size_at_snapshot = os.path.getsize(hist)
    for i in range(30):
        await sock.execute(f"y = {i}  # " + "padding " * 1000)
    await sock.execute("IPython.get_ipython().history_manager.writeout_cache()")
    assert os.path.getsize(hist) > size_at_snapshot + 100_000
    await restore(jp_fetch, snap["id"])
    assert await sock.value("x") == "'kept'"
    await sock.execute("z = 1")  # history keeps working


async def test_lazy_restore_brings_all_memory_back(jp_fetch, start_kernel):
    """The kernel answers before its memory is all back (CRIU's lazy pages);
    every page arrives, and a snapshot asked for meanwhile waits for them."""
    status, body = await api(jp_fetch, "GET", "api", "ckpt", "status")
    assert body["features"]["lazy_restore"]  # userfaultfd works on the machines this runs on
    kernel_id, sock = await start_kernel()
    await sock.execute("import numpy as np; a = np.random.default_rng(7).random(48_000_000); s = float(a.sum())")
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("a[:] = 0")
    out = await restore(jp_fetch, snap["id"])
    assert out["lazy"] is True
    again = await snapshot(jp_fetch, kernel_id)  # right away: waits for the memory, then dumps it whole
    assert again["memory_bytes"] >= 384_000_000
    assert await sock.value("float(a.sum()) == s") == "True"
    await sock.execute("a[:] = 0")
    await restore(jp_fetch, again["id"])
    assert await sock.value("float(a.sum()) == s") == "True"


async def test_a_restored_kernels_history_stays_consistent(jp_fetch, start_kernel):
    """Cells run after the snapshot wrote history lines the restored process
    numbers again: the restored kernel moves to a history session of its own
    before its first cell, so no output ever carries IPython's "not unique"
    error, and every cell after the restore is in the history database."""
    import sqlite3

    kernel_id, sock = await start_kernel()
    await sock.execute("import IPython; hm = IPython.get_ipython().history_manager; x = 'kept'")
    hist = ast.literal_eval(await sock.value("str(hm.hist_file)"))
    before = int(await sock.value("hm.session_number"))
    snap = await snapshot(jp_fetch, kernel_id)
    for i in range(5):
        await sock.execute(f"y = {i}")
    await sock.execute("hm.writeout_cache()")  # the original's lines are in the database
    for round_ in range(3):
        await restore(jp_fetch, snap["id"])
        runs = [await sock.execute(f"z = {round_} * 10 + {i}") for i in range(3)]
        runs.append(await sock.execute("hm.writeout_cache(); print(hm.session_number)"))
        outputs = "".join(r.stdout + r.stderr for r in runs)
        assert "not unique" not in outputs and "ERROR" not in outputs, outputs
        session = int(runs[-1].stdout.strip())
        assert session != before
        with sqlite3.connect(hist) as db:
            lines = [row[0] for row in db.execute("SELECT source FROM history WHERE session = ?", (session,))]
        assert [f"z = {round_} * 10 + {i}" for i in range(3)] == lines[:3], lines
    assert await sock.value("x") == "'kept'"


async def test_a_restore_never_waits_for_a_lock_another_process_took(jp_fetch, start_kernel, tmp_path):
    """A lock the kernel held at the snapshot, taken since by another process:
    the restore goes through (locks are not taken again; README: Limits)."""
    import fcntl

    lock_path = tmp_path / "work.lock"
    kernel_id, sock = await start_kernel()
    await sock.execute(
        f"import fcntl; lock = open({str(lock_path)!r}, 'w'); fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB); x = 1"
    )
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.execute("fcntl.flock(lock, fcntl.LOCK_UN); x = 2")
    with open(lock_path, "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds it now
        await restore(jp_fetch, snap["id"])
        assert await sock.value("x") == "1"
        assert await sock.value("lock.closed") == "False"  # the file is open again, not locked
