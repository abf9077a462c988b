"""Which kinds of kernel state survive a snapshot and restore, per tool.

Each kind is a cell that builds some state, and a check (a cell whose value is
True when the state is intact and working). jupyter-ckpt: all kinds in one
kernel, snapshot, a marker set, restore in place, then every check (and the
marker must be gone). dill: per kind, ``dill.dump_session`` in a kernel, then
``dill.load_session`` in a fresh kernel, then the check. Kishu: see
kishu_bench.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KINDS: list[tuple[str, str, str]] = [
    ("numbers and strings", "k_num = 42; k_str = 'text'", "k_num == 42 and k_str == 'text'"),
    ("numpy array", "import numpy as np; k_arr = np.arange(10.0)", "float(k_arr.sum()) == 45.0"),
    ("pandas DataFrame", "import pandas as pd; k_df = pd.DataFrame({'a': [1, 2]})", "int(k_df.a.sum()) == 3"),
    (
        "instance of a class defined in the notebook",
        "class KPoint:\n    def __init__(self, x):\n        self.x = x\nk_obj = KPoint(3)",
        "k_obj.x == 3 and type(k_obj).__name__ == 'KPoint'",
    ),
    ("closure", "def k_make(n):\n    return lambda x: x + n\nk_add = k_make(5)", "k_add(1) == 6"),
    (
        "half-consumed generator",
        "def k_gen():\n    yield from range(10)\nk_g = k_gen(); next(k_g); next(k_g)",
        "next(k_g) == 2",
    ),
    ("itertools iterator", "import itertools; k_cnt = itertools.count(100); next(k_cnt)", "next(k_cnt) == 101"),
    (
        "running thread",
        "import threading, time\nk_ticks = [0]\ndef k_tick():\n    while True:\n        k_ticks[0] += 1\n        time.sleep(0.01)\n"
        "k_thread = threading.Thread(target=k_tick, daemon=True); k_thread.start()",
        "import time\nk_n = k_ticks[0]; time.sleep(0.3)\nk_thread.is_alive() and k_ticks[0] > k_n",
    ),
    ("lock held", "import threading; k_lock = threading.Lock(); k_lock.acquire()", "k_lock.locked()"),
    (
        "open file and its offset",
        "import tempfile; k_file = tempfile.NamedTemporaryFile('w+', delete=False); k_file.write('abcdef'); k_file.flush(); k_file.seek(3)",
        "k_file.read() == 'def'",
    ),
    (
        "socket pair with unread data",
        "import socket; k_a, k_b = socket.socketpair(); k_a.sendall(b'ping')",
        "k_b.recv(4) == b'ping'",
    ),
    (
        "listening TCP socket",
        "import socket; k_srv = socket.create_server(('127.0.0.1', 0)); k_port = k_srv.getsockname()[1]",
        "import socket\nk_c = socket.create_connection(('127.0.0.1', k_port), timeout=2); k_s, _ = k_srv.accept(); k_c.sendall(b'hi'); k_s.recv(2) == b'hi'",
    ),
    ("child process", "import subprocess; k_child = subprocess.Popen(['sleep', '600'])", "k_child.poll() is None"),
    (
        "sqlite in-memory database",
        "import sqlite3; k_db = sqlite3.connect(':memory:'); k_db.execute('create table t(x)'); k_db.execute('insert into t values (7)')",
        "k_db.execute('select x from t').fetchone()[0] == 7",
    ),
    ("anonymous mmap", "import mmap; k_mm = mmap.mmap(-1, 4096); k_mm[:5] = b'hello'", "k_mm[:5] == b'hello'"),
    (
        "random.Random state",
        "import random; k_rng = random.Random(5); k_rng.random()",
        "import random\nk_ref_rng = random.Random(5); k_ref_rng.random()\nk_rng.random() == k_ref_rng.random()",
    ),
    (
        "numpy Generator state",
        "import numpy as np; k_gen_np = np.random.default_rng(3); k_gen_np.random()",
        "import numpy as np\nk_ref_np = np.random.default_rng(3); k_ref_np.random()\nfloat(k_gen_np.random()) == float(k_ref_np.random())",
    ),
    (
        "hashlib object mid-update (C state)",
        "import hashlib; k_h = hashlib.sha256(b'half')",
        "import hashlib\nk_h.update(b'way'); k_h.hexdigest() == hashlib.sha256(b'halfway').hexdigest()",
    ),
    (
        "zlib stream mid-compression",
        "import zlib; k_z = zlib.compressobj(); k_zpart = k_z.compress(b'x' * 1000)",
        "import zlib\nzlib.decompress(k_zpart + k_z.flush()) == b'x' * 1000",
    ),
    (
        "asyncio task on the kernel's loop",
        "import asyncio\nk_async = [0]\nasync def k_bump():\n    while True:\n        k_async[0] += 1\n        await asyncio.sleep(0.01)\n"
        "k_task = asyncio.ensure_future(k_bump())",
        "import asyncio\nk_m = k_async[0]\nawait asyncio.sleep(0.3)\nk_async[0] > k_m and not k_task.done()",
    ),
    (
        "environment variable and working directory",
        "import os; os.environ['K_FLAG'] = 'on'; os.chdir('/tmp')",
        "import os\nos.environ.get('K_FLAG') == 'on' and os.getcwd() == '/tmp'",
    ),
    (
        "weak reference",
        "import weakref\nclass KTarget:\n    pass\nk_target = KTarget(); k_ref = weakref.ref(k_target)",
        "k_ref() is k_target",
    ),
    (
        "temporary directory with a file",
        "import tempfile, pathlib; k_tmp = tempfile.TemporaryDirectory(); pathlib.Path(k_tmp.name, 'f').write_text('kept')",
        "import pathlib\npathlib.Path(k_tmp.name, 'f').read_text() == 'kept'",
    ),
    ("module imported under an alias", "import json as k_json", "k_json.dumps([1]) == '[1]'"),
    (
        "ctypes handle to a C library",
        "import ctypes, ctypes.util; k_libm = ctypes.CDLL(ctypes.util.find_library('m')); k_libm.cos.restype = ctypes.c_double; "
        "k_libm.cos.argtypes = [ctypes.c_double]",
        "k_libm.cos(0.0) == 1.0",
    ),
    # Worker processes and what they share with the kernel.
    (
        "multiprocessing Pool (fork)",
        "import math, multiprocessing as k_mp; k_pool = k_mp.get_context('fork').Pool(2)",
        "import math\nk_pool.map(math.sqrt, [4.0, 9.0]) == [2.0, 3.0]",
    ),
    (
        "multiprocessing Pool (spawn)",
        "import multiprocessing as k_mp; k_spool = k_mp.get_context('spawn').Pool(2); k_spool.map(abs, [-1])",
        "k_spool.map(abs, [-1, -2]) == [1, 2]",
    ),
    (
        "ProcessPoolExecutor",
        "from concurrent.futures import ProcessPoolExecutor; k_ppe = ProcessPoolExecutor(2); k_ppe.submit(abs, -1).result()",
        "list(k_ppe.map(abs, [-3])) == [3]",
    ),
    (
        "multiprocessing Manager (server process)",
        "import multiprocessing as k_mp; k_mgr = k_mp.Manager(); k_md = k_mgr.dict(a=1)",
        "k_md['a'] == 1 and k_mgr.list([2])[0] == 2",
    ),
    (
        "multiprocessing Queue holding an item",
        "import multiprocessing as k_mp, time; k_q = k_mp.Queue(); k_q.put('item'); time.sleep(0.2)",
        "k_q.get(timeout=5) == 'item'",
    ),
    (
        "joblib's reusable loky executor",
        "from joblib.externals.loky import get_reusable_executor; k_exec = get_reusable_executor(max_workers=2); "
        "k_exec.submit(abs, -1).result()",
        "from joblib.externals.loky import get_reusable_executor\n"
        "get_reusable_executor(max_workers=2) is k_exec and k_exec.submit(abs, -5).result() == 5",
    ),
    (
        "SharedMemory segment",
        "from multiprocessing import shared_memory; k_shm = shared_memory.SharedMemory(create=True, size=16); "
        "k_shm.buf[:5] = b'hello'",
        "bytes(k_shm.buf[:5]) == b'hello'",
    ),
    (
        "file deleted while open",
        "import tempfile; k_gone = tempfile.TemporaryFile(); k_gone.write(b'gone'); k_gone.flush()",
        "k_gone.seek(0) == 0 and k_gone.read() == b'gone'",
    ),
    (
        "dask.distributed LocalCluster (process workers)",
        "from dask.distributed import Client, LocalCluster; k_cluster = LocalCluster(n_workers=2, threads_per_worker=1, "
        "processes=True, dashboard_address=None); k_client = Client(k_cluster)",
        "k_client.submit(abs, -7).result(timeout=30) == 7",
    ),
    (
        "thread pool with a finished task",
        "from concurrent.futures import ThreadPoolExecutor; k_tpe = ThreadPoolExecutor(2); k_fut = k_tpe.submit(lambda: 6 * 7)",
        "k_fut.result(timeout=5) == 42 and k_tpe.submit(abs, -1).result() == 1",
    ),
]


async def _check(bench: Any, client: Any, check: str) -> str:
    try:
        value = await bench.run(client, check, timeout=30)
    except Exception as e:  # the check raised: the state did not survive
        return f"broken: {str(e)[:120]}"
    return "ok" if value == "True" else f"wrong: {value}"


async def ckpt(bench: Any) -> dict[str, str]:
    kernel_id, client = await bench.start()
    try:
        for _, setup, _ in KINDS:
            await bench.run(client, setup)
        record = await bench.manager.snapshot(kernel_id)
        await bench.run(client, "k_marker = 'set after the snapshot'")
        await bench.manager.restore(record.id)
        if await bench.run(client, "'k_marker' in globals()") != "False":
            raise RuntimeError("the restore did not happen")
        return {name: await _check(bench, client, check) for name, _, check in KINDS}
    finally:
        await bench.stop(kernel_id, client)


async def dill(bench: Any, work: Path) -> dict[str, str]:
    out = {}
    for n, (name, setup, check) in enumerate(KINDS):
        path = work / f"dill-{n}.pkl"
        kernel_id, client = await bench.start()
        try:
            await bench.run(client, setup)
            await bench.run(client, f"import dill as _dill; _dill.dump_session({str(path)!r})", timeout=60)
        except Exception as e:
            out[name] = f"dump fails: {str(e)[:120]}"
            continue
        finally:
            await bench.stop(kernel_id, client)
        kernel_id, client = await bench.start()
        try:
            await bench.run(client, f"import dill as _dill; _dill.load_session({str(path)!r})", timeout=60)
            out[name] = await _check(bench, client, check)
        except Exception as e:
            out[name] = f"load fails: {str(e)[:120]}"
        finally:
            await bench.stop(kernel_id, client)
    return out


async def measure(work: Path, bench: Any, kishu: bool) -> dict[str, dict[str, str]]:
    work.mkdir(parents=True, exist_ok=True)
    print("coverage: jupyter-ckpt ...", flush=True)
    result = {"jupyter-ckpt": await ckpt(bench)}
    print("coverage: dill ...", flush=True)
    result["dill"] = await dill(bench, work)
    if kishu:
        import kishu_bench  # only when Kishu is measured

        print("coverage: Kishu ...", flush=True)
        result["Kishu"] = kishu_bench.coverage(work / "kishu", KINDS)
    return result


def report(result: dict[str, dict[str, str]]) -> str:
    tools = list(result)
    lines = ["| kind of state | " + " | ".join(tools) + " |", "| --- |" + " --- |" * len(tools)]
    for name, _, _ in KINDS:
        cells = []
        for tool in tools:
            verdict = result[tool].get(name, "–")
            cells.append("yes" if verdict == "ok" else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = [sum(1 for v in result[t].values() if v == "ok") for t in tools]
    lines.append("| **survive** | " + " | ".join(f"**{n} of {len(KINDS)}**" for n in totals) + " |")
    return "\n".join(lines)
