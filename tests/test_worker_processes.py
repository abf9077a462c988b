"""Kernels with worker processes, snapshotted mid-computation: process pools,
multiprocessing's primitives, joblib, shared memory, a dask cluster, busy thread
pools. Each workload is a cell that runs a parallel loop in 40 steps and ends
with a digest of everything it computed; the snapshot is taken at step 10 or
later. The cell's uninterrupted digest is the reference: a fork of the snapshot
and a restore in place must both finish the loop with that same digest.

The workloads use the libraries as their documentation shows, through real
kernels, a real server and real CRIU.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .client import KernelSocket, api, restore, snapshot, wait_for_snapshot
from .servers import execute_started, take, value, wait_for_output
from .test_fork import connect, fork
from .test_migrate import kernel_socket, raw, two_servers  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.criu, pytest.mark.timeout(300)]

# A module the workers import: spawned and forkserver workers cannot use a
# function defined in the notebook (that is how multiprocessing works).
WORK_MODULE = """
import hashlib, time

def digest(i):
    time.sleep(0.02)
    return hashlib.sha256(str(i).encode()).hexdigest()[:12]

def scaled_sum(args):
    name, start, factor = args
    from multiprocessing import shared_memory
    import numpy as np
    shm = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray((1000,), dtype=np.float64, buffer=shm.buf)
        view[start:start + 100] *= factor
        return float(view[start:start + 100].sum())
    finally:
        del view
        shm.close()
"""


def setup(folder: Path) -> str:
    """The kernel's first cell: WORK_MODULE written into ``folder`` (the test's
    own, removed with it) and imported, and the loop's helpers."""
    return f"""
import hashlib, os, sys, tempfile, time
_work_dir = {str(folder)!r}
os.makedirs(_work_dir, exist_ok=True)
with open(os.path.join(_work_dir, "ckpt_work.py"), "w") as _f:
    _f.write({WORK_MODULE!r})
sys.path.insert(0, _work_dir)
import ckpt_work
out = []
def step_done(step):
    time.sleep(0.1)  # 40 steps last at least 4 s: the snapshot at step 10 is mid-computation
    if step % 5 == 4:
        print("progress", step + 1, flush=True)
"""


FINISH = """
result = hashlib.sha256(repr(out).encode()).hexdigest()
print("result", result, flush=True)
"""


def loop(body: str, before: str = "", after: str = "") -> str:
    """A cell: ``before``, then 40 steps of ``body`` (with ``step``), then the digest."""
    steps = "for step in range(40):\n" + textwrap.indent(textwrap.dedent(body).strip() + "\nstep_done(step)", "    ")
    return "\n".join([textwrap.dedent(before).strip(), steps, textwrap.dedent(after).strip(), FINISH])


WORKLOADS = {
    "multiprocessing Pool (fork)": loop(
        "out.extend(pool.map(ckpt_work.digest, range(step * 4, step * 4 + 4)))",
        before="import multiprocessing as mp\npool = mp.get_context('fork').Pool(2)",
    ),
    "multiprocessing Pool (spawn)": loop(
        "out.extend(pool.map(ckpt_work.digest, range(step * 4, step * 4 + 4)))",
        before="import multiprocessing as mp\npool = mp.get_context('spawn').Pool(2)",
    ),
    "concurrent.futures ProcessPoolExecutor": loop(
        "out.extend(executor.map(ckpt_work.digest, range(step * 4, step * 4 + 4)))",
        before="from concurrent.futures import ProcessPoolExecutor\nexecutor = ProcessPoolExecutor(2)",
    ),
    "multiprocessing Manager (server process over a unix socket)": loop(
        """
        pool.map(record, range(step * 4, step * 4 + 4))
        out.append(len(shared))
        """,
        before="""
        import multiprocessing as mp
        manager = mp.Manager()
        shared = manager.dict()
        def record(i):
            shared[i] = ckpt_work.digest(i)
        pool = mp.get_context('fork').Pool(2)
        """,
    ),
    "multiprocessing Process, Queue, Lock and Event": loop(
        """
        for i in range(step * 4, step * 4 + 4):
            tasks.put(i)
        got = sorted(results.get(timeout=30) for _ in range(4))
        out.append(got)
        """,
        before="""
        import multiprocessing as mp
        tasks, results, lock, stop = mp.Queue(), mp.Queue(), mp.Lock(), mp.Event()
        def serve(tasks, results, lock, stop):
            while not stop.is_set():
                i = tasks.get()
                with lock:
                    results.put((i, ckpt_work.digest(i)))
        workers = [mp.Process(target=serve, args=(tasks, results, lock, stop), daemon=True) for _ in range(2)]
        for w in workers:
            w.start()
        """,
    ),
    "joblib, loky backend, memmapped array, reused executor": loop(
        "out.extend(Parallel(n_jobs=2)(delayed(weighted)(data, i) for i in range(step * 2, step * 2 + 2)))",
        before="""
        import numpy as np
        from joblib import Parallel, delayed
        data = np.arange(300_000, dtype=np.float64)  # over joblib's 1 MB: memmapped through /dev/shm
        def weighted(a, i):
            time.sleep(0.02)
            return float((a * i).sum())
        Parallel(n_jobs=2)(delayed(weighted)(data, i) for i in range(2))  # the executor stays for the loop
        """,
    ),
    "joblib, multiprocessing backend": loop(
        "out.extend(Parallel(n_jobs=2, backend='multiprocessing')(delayed(ckpt_work.digest)(i) for i in range(step * 4, step * 4 + 4)))",
        before="from joblib import Parallel, delayed",
    ),
    "scikit-learn cross-validation with n_jobs=2": loop(
        "out.append([round(s, 10) for s in cross_val_score(model, X, y, cv=2, n_jobs=2)])",
        before="""
        from sklearn.datasets import make_classification
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score
        X, y = make_classification(n_samples=400, n_features=20, random_state=0)
        model = LogisticRegression(max_iter=200)
        """,
    ),
    "SharedMemory, and files deleted while open or mapped": loop(
        """
        out.append(pool.map(ckpt_work.scaled_sum, [(shm.name, (step % 10) * 100, 1.001)]))
        deleted.seek(0); out.append(deleted.read(8)); mapped[step] = step % 256
        out.append(bytes(mapped[:8]))
        """,
        before="""
        import mmap, multiprocessing as mp, numpy as np
        from multiprocessing import shared_memory
        shm = shared_memory.SharedMemory(create=True, size=8000)
        np.ndarray((1000,), dtype=np.float64, buffer=shm.buf)[:] = np.arange(1000.0)
        pool = mp.get_context('fork').Pool(2)
        deleted = tempfile.TemporaryFile()  # open, never had a name one could reopen
        deleted.write(b"survives" * 1000); deleted.flush()
        _path = os.path.join(_work_dir, "mapped.bin")
        with open(_path, "wb") as _f:
            _f.write(bytes(4096))
        with open(_path, "r+b") as _f:
            mapped = mmap.mmap(_f.fileno(), 4096)
        os.unlink(_path)  # mapped, then deleted
        """,
    ),
    "dask.distributed LocalCluster with process workers": loop(
        "out.extend(client.gather(client.map(ckpt_work.digest, range(step * 4, step * 4 + 4), pure=False)))",
        before="""
        from dask.distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        """,
    ),
    "busy thread pools and BLAS threads": loop(
        "out.extend(threads.map(lambda i: float(np.linalg.norm(m @ m + i)), range(step * 4, step * 4 + 4)))",
        before="""
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        threads = ThreadPoolExecutor(4)
        m = np.random.default_rng(0).random((300, 300))
        """,
    ),
}


async def start_workload(sock: KernelSocket, cell: str, folder: Path):
    await sock.execute(setup(folder))
    run = await sock.send_execute(cell)
    await sock.wait_until(lambda: "progress 10" in run.stdout or run.idle, timeout=120)
    assert "progress 10" in run.stdout, run.stderr or run.error
    return run


async def finished_digest(sock: KernelSocket, run) -> str:
    await sock.finish(run, timeout=180)
    assert run.status == "ok", run.error or run.stderr
    return run.stdout.split("result ")[1].split()[0]


def host_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.mark.parametrize("workload", list(WORKLOADS))
async def test_snapshot_mid_computation_then_fork_and_restore(jp_fetch, jp_ws_fetch, start_kernel, workload, tmp_path):
    shm_before = host_shm()
    kernel_id, sock = await start_kernel()
    run = await start_workload(sock, WORKLOADS[workload], tmp_path / "work")
    snap = await snapshot(jp_fetch, kernel_id)
    # A fork finishes the same loop from where the snapshot caught it; it is
    # made while the original still runs its loop (as it would be in use).
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    uninterrupted = await finished_digest(sock, run)
    forked_result = asyncio.ensure_future(forked.value("result", timeout=180))  # once its loop is done
    await sock.execute("marker = 'set after the snapshot'")

    # A restore in place too (while the fork runs), and it did not start the loop over.
    run.stdout, run.status, run.idle = "", None, False
    await restore(jp_fetch, snap["id"])
    assert await finished_digest(sock, run) == uninterrupted
    assert await forked_result == repr(uninterrupted)
    assert "progress 5\n" not in run.stdout
    assert await sock.value("'marker' in globals()") == "False"
    # Each kernel's semaphores and shared memory live in a /dev/shm of its own.
    assert host_shm() == shm_before


ISOLATION_SETUP = """
import multiprocessing as mp, numpy as np, time
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(name="ckpt-isolation", create=True, size=8000)
view = np.ndarray((1000,), dtype=np.float64, buffer=shm.buf)
def fill(args):
    start, factor = args
    mine = shared_memory.SharedMemory(name="ckpt-isolation")
    w = np.ndarray((1000,), dtype=np.float64, buffer=mine.buf)
    w[start:start + 250] = np.arange(start, start + 250) * factor
    del w
    mine.close()
    time.sleep(0.02)
pool = mp.get_context("fork").Pool(2)
"""

# Every kernel fills the same-named shared memory with its own factor, again and
# again; had they shared it, a kernel would read another's numbers.
ISOLATION_RUN = """
wrong = 0
for step in range(40):
    view[:] = 0
    pool.map(fill, [(start, factor) for start in range(0, 1000, 250)])
    wrong += float(view.sum()) != 499500.0 * factor
    time.sleep(0.01)
print("wrong", wrong, "sum", float(view.sum()), flush=True)
"""


async def test_forks_have_their_own_pools_and_shared_memory(jp_fetch, jp_ws_fetch, start_kernel):
    kernel_id, sock = await start_kernel()
    await sock.execute(ISOLATION_SETUP)
    snap = await snapshot(jp_fetch, kernel_id)
    kernels = [sock] + [await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"]) for _ in range(2)]
    for factor, kernel in enumerate(kernels, start=1):
        await kernel.execute(f"factor = {factor}")
    runs = [await kernel.send_execute(ISOLATION_RUN) for kernel in kernels]  # all three at once
    for factor, (kernel, run) in enumerate(zip(kernels, runs, strict=True), start=1):
        await kernel.finish(run, timeout=120)
        assert run.stdout.split() == ["wrong", "0", "sum", str(499500.0 * factor)], (run.error, run.stderr)


async def test_a_refused_snapshot_names_the_process_the_resource_and_what_to_do(
    jp_fetch, start_kernel, tmp_path, store_root
):
    import socket

    # A service outside the kernel, reached over a unix socket (a database's, say).
    path = tmp_path / "service.sock"
    service = socket.socket(socket.AF_UNIX)
    service.bind(str(path))
    service.listen()
    kernel_id, sock = await start_kernel()
    client = f"import socket, time; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); time.sleep(600)"
    await sock.execute(f"import subprocess, sys\nchild = subprocess.Popen([sys.executable, '-c', {client!r}])")
    accepted, _ = service.accept()
    try:
        status, model = await api(jp_fetch, "POST", "api", "ckpt", "kernels", kernel_id, "snapshots", body={})
        assert status == 202, model
        record = await wait_for_snapshot(jp_fetch, model["id"])
        assert record["status"] == "failed"
        child = await sock.value("child.pid")  # the pid inside the kernel's namespace
        error = record["error"]
        assert error.startswith(f"a unix socket connection to {path}, served by a process outside the kernel"), error
        assert "Close it before taking a snapshot" in error, error
        holder = next(
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        assert f"held by process {holder} (" in error and "python -c import socket" in error, error
        assert "(CRIU: unix: External socket is used" in error, error
        # The command line says the same (the panel and the toolbar show this record's error).
        shown = subprocess.run(
            [sys.executable, "-m", "jupyter_ckpt.cli", "--store", str(store_root), "show", record["id"]],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert f"a unix socket connection to {path}" in shown and "Close it before taking a snapshot" in shown, shown
        assert child is not None
        # Nothing was lost: the kernel runs on, and once the connection is gone a snapshot works.
        await sock.execute("child.kill(); child.wait()")
        assert (await snapshot(jp_fetch, kernel_id))["status"] == "complete"
    finally:
        accepted.close()
        service.close()


@pytest.mark.slow
async def test_a_kernel_with_a_process_pool_moves_to_another_server_mid_computation(two_servers, tmp_path):  # noqa: F811

    a = two_servers.start("a")
    b = two_servers.start("b", elsewhere=True)
    kernel_id = a.call("POST", "/api/kernels", {"name": "python3"})["id"]
    client = a.client(kernel_id)
    value(client, setup(tmp_path / "work"))
    execute_started(client, WORKLOADS["joblib, loky backend, memmapped array, reused executor"])
    wait_for_output(client, "progress 10\n")  # mid-computation (40 steps)
    snap = take(a, kernel_id)
    uninterrupted = value(client, "result")  # answered once the loop is done
    status, bundle = raw(a, "GET", f"/api/ckpt/snapshots/{snap['id']}/bundle")
    assert status == 200
    assert raw(b, "POST", "/api/ckpt/bundles?trust=true", bundle)[0] == 201

    # On B the loop goes on from where the snapshot caught it, with its workers.
    outcome = b.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"})
    assert outcome["kernel_id"] == kernel_id
    sock = await kernel_socket(b, kernel_id)
    assert await sock.value("result", timeout=120) == uninterrupted
    assert await sock.value("len(out)") == "80"
    client.stop_channels()
