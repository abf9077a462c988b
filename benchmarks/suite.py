"""jupyter-ckpt's benchmark suite: the same kernels snapshotted and restored by
jupyter-ckpt and by the baselines, in one run, on this machine.

    python benchmarks/suite.py [--quick] [--json FILE] [--no-kishu]

For each workload (a real ipykernel holding it, started through jupyter-ckpt's
provisioner), measured in the same run:

- jupyter-ckpt: freeze (how long the kernel was stopped), total until the
  snapshot is durable, new and total stored bytes; restore until the kernel
  answers again, from the local store (warm: its chunk index is cached);
- raw CRIU, as container tools drive it: ``criu dump --leave-running`` into a
  plain directory (then fsync, to compare durability), and ``criu restore``;
- dill: ``dill.dump_session`` (then fsync) inside the kernel, and
  ``dill.load_session`` into a fresh kernel;
- Kishu (if installed; `make bench` installs it): its commit after the cell that built the state, and
  its checkout (needs a notebook session: a real jupyter server is started);
- this machine's limits: memory copy bandwidth (numpy) and disk write
  bandwidth with fsync, in the store's directory.

Then coverage: which kinds of kernel state survive each tool
(benchmarks/state_coverage.py). Prints tables and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hibernation as hibernation_bench  # noqa: E402  (benchmarks/hibernation.py)
import kishu_bench  # noqa: E402  (benchmarks/kishu_bench.py)
import state_coverage  # noqa: E402  (benchmarks/state_coverage.py)

from jupyter_ckpt.chunks import chunk_hash  # noqa: E402
from jupyter_ckpt.engine import CriuEngine, errors_from_log  # noqa: E402
from jupyter_ckpt.manager import CheckpointManager  # noqa: E402
from jupyter_ckpt.store import SnapshotStore  # noqa: E402

GIB = 2**30

# name -> (code building the state, check that it is intact, GiB of data it holds)
WORKLOADS: dict[str, tuple[str, str, float]] = {
    "numpy 0.25 GiB": ("import numpy as np; data = np.random.default_rng(0).random(2**25)", "float(data[12345])", 0.25),
    "numpy 1 GiB": ("import numpy as np; data = np.random.default_rng(0).random(2**27)", "float(data[12345])", 1),
    "numpy 4 GiB": ("import numpy as np; data = np.random.default_rng(0).random(2**29)", "float(data[12345])", 4),
    "pandas 1 GiB": (
        "import numpy as np, pandas as pd; r = np.random.default_rng(0); n = 36_000_000\n"
        "data = pd.DataFrame({'f': r.random(n), 'i': r.integers(0, 10**9, n), 'b': r.random(n) < 0.5,\n"
        "    'c': pd.Categorical.from_codes(r.integers(0, 4, n), ['red', 'green', 'blue', 'grey']),\n"
        "    't': pd.Timestamp('2026-01-01') + pd.to_timedelta(r.integers(0, 10**6, n), unit='s')})",
        "str(data.iloc[12345].tolist())",
        1,
    ),
    "dict of 5M entries": ("data = {i: f'value {i}' for i in range(5_000_000)}", "data[4_999_999]", 0.6),
    "zeros 2 GiB": ("import numpy as np; data = np.zeros(2**28); data[:] = 0.0", "float(data.sum())", 2),
}
QUICK = ["numpy 0.25 GiB"]
AGAIN = "numpy 1 GiB"  # also snapshotted again with 0 % and with 10 % of its pages changed


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- machine limits ----------------------------------------------------------------


def memcpy_gbps() -> float:
    import numpy as np

    a = np.ones(GIB // 8)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return GIB / median(times) / 1e9


def first_touch_gbps() -> float:
    """Writing memory this process never used: in a VM whose memory the host
    hands out lazily, the first use of a page costs far more than a copy."""
    import numpy as np

    times = []
    for _ in range(3):
        t = time.perf_counter()
        a = np.ones(GIB // 8)
        times.append(time.perf_counter() - t)
        del a
    return GIB / max(times) / 1e9


def file_write_gbps(directory: Path, fsync: bool, size: int = GIB) -> float:
    """Writing a new file, with fsync (the disk), or without: the page cache,
    which is what CRIU's dump does with every page while the kernel is frozen
    (it splices them into the image files)."""
    block = os.urandom(8 << 20)
    times = []
    for _ in range(3):
        path = directory / "write-probe"
        t = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        times.append(time.perf_counter() - t)
        path.unlink()
    return size / median(times) / 1e9


def page_hash_gbps(size: int = GIB // 4) -> float:
    """BLAKE3 of 4 KiB pages one by one, in Python on one core: what the store
    does to every page it is given and every page it restores."""
    data = memoryview(os.urandom(size))
    t = time.perf_counter()
    for i in range(0, size, 4096):
        chunk_hash(data[i : i + 4096])
    return size / (time.perf_counter() - t) / 1e9


def fsync_tree(directory: Path) -> float:
    t = time.perf_counter()
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# -- kernels -------------------------------------------------------------------------


class Bench:
    def __init__(self, work: Path, criu: str):
        self.work = work
        self.criu = criu
        KernelProvisionerFactory.instance().default_provisioner_name = "ckpt-provisioner"
        self.kernels = AsyncMultiKernelManager(connection_dir=str(work))
        self.store = SnapshotStore(str(work / "store"))
        self.manager = CheckpointManager(self.kernels, CriuEngine(criu), self.store)

    async def start(self) -> tuple[str, Any]:
        kernel_id = await self.kernels.start_kernel(kernel_name="python3")
        client = self.kernels.get_kernel(kernel_id).client()
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        self.manager.activity.watch(kernel_id)
        return kernel_id, client

    async def run(self, client: Any, code: str, timeout: float = 1200) -> str | None:
        out: dict[str, str] = {}
        reply = await client.execute_interactive(code, timeout=timeout, output_hook=kishu_bench.result_hook(out))
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{code[:80]!r} failed: {out.get('error') or reply['content']}")
        return out.get("value")

    async def stop(self, kernel_id: str, client: Any) -> None:
        client.stop_channels()
        try:
            await self.kernels.shutdown_kernel(kernel_id, now=True)
        except Exception as e:  # reported; not in place of what stopped a workload early
            print(f"  shutting kernel {kernel_id} down failed: {type(e).__name__}: {e}", flush=True)

    def init_pid(self, kernel_id: str) -> int:
        return self.kernels.get_kernel(kernel_id).provisioner.tree.init_pid

    # -- jupyter-ckpt ------------------------------------------------------------------

    async def ckpt_snapshot(self, kernel_id: str) -> dict:
        record = await self.manager.snapshot(kernel_id)
        return {
            "freeze_s": record.freeze_seconds,
            "durable_s": record.total_seconds,
            "memory_bytes": record.memory_bytes,
            "new_stored_bytes": record.stored_bytes,
            "total_stored_bytes": dir_bytes(Path(self.store.root) / "packs"),
            "snapshot_id": record.id,
        }

    async def ckpt_restore(self, snapshot_id: str) -> dict:
        outcome = await self.manager.restore(snapshot_id)
        return {
            "restore_s": outcome.total_seconds,
            "restore_prepare_s": outcome.prepare_seconds,
            "restore_save_previous_s": outcome.save_previous_seconds,
            "restore_criu_s": outcome.restore_seconds,
        }

    # -- raw CRIU --------------------------------------------------------------------

    def raw_dump(self, kernel_id: str, images: Path) -> dict:
        images.mkdir()
        t = time.perf_counter()
        proc = subprocess.run(
            [
                self.criu,
                "dump",
                "-t",
                str(self.init_pid(kernel_id)),
                "-D",
                str(images),
                "--leave-running",
                "--tcp-established",
                "--network-lock",
                "nftables",
                # The kernel's mount namespace (its own /dev/shm) holds the host's mounts.
                "--ext-mount-map",
                "auto",
                "-o",
                "dump.log",
                "-v4",
            ],
            capture_output=True,
            text=True,
        )
        dump_s = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"criu dump: {errors_from_log(images / 'dump.log')}")
        sync_s = fsync_tree(images)
        stats = _stats(images / "stats-dump", "dump")
        return {
            "raw_freeze_s": (stats.get("freezing_time", 0) + stats.get("frozen_time", 0)) / 1e6,
            # Of the freeze: copying the pages into the image files.
            "raw_memwrite_s": stats.get("memwrite_time", 0) / 1e6,
            "raw_dump_s": dump_s,
            "raw_durable_s": dump_s + sync_s,
            "raw_image_bytes": dir_bytes(images),
        }

    def raw_restore(self, kernel_id: str, images: Path) -> dict:
        """Kill the kernel's tree, then `criu restore -d` its raw images."""
        os.kill(self.init_pid(kernel_id), signal.SIGKILL)
        time.sleep(0.5)
        t = time.perf_counter()
        proc = subprocess.run(
            [
                self.criu,
                "restore",
                "-D",
                str(images),
                "-d",
                "--tcp-close",
                "--root",
                "/",
                "--ext-mount-map",
                "auto",
                "-o",
                "restore.log",
                "-v4",
                "--pidfile",
                str(images / "restored.pid"),
            ],
            capture_output=True,
            text=True,
        )
        restore_s = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError(f"criu restore: {errors_from_log(images / 'restore.log')}")
        pid = int((images / "restored.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        return {"raw_restore_s": restore_s}

    async def raw_lazy_restore(self, client: Any, images: Path, check: str) -> dict:
        """`criu restore --lazy-pages` of the raw images, with `criu lazy-pages`
        serving the memory from them: the tree runs before its memory is back,
        pages arrive on first touch (userfaultfd) and in the background. Times
        until the kernel answers, and until all of its memory is back (the
        daemon exits); the workload's check then tells the state is intact."""
        (images / "restored.pid").unlink(missing_ok=True)
        daemon = subprocess.Popen(
            [self.criu, "lazy-pages", "-D", str(images), "-o", "lazy-pages.log", "-v4"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):  # its socket, which the restore connects to
                if (images / "lazy-pages.socket").exists():
                    break
                time.sleep(0.05)
            t = time.perf_counter()
            proc = subprocess.run(
                [
                    self.criu,
                    "restore",
                    "-D",
                    str(images),
                    "-d",
                    "--tcp-close",
                    "--root",
                    "/",
                    "--ext-mount-map",
                    "auto",
                    "--lazy-pages",
                    "-o",
                    "restore-lazy.log",
                    "-v4",
                    "--pidfile",
                    str(images / "restored.pid"),
                ],
                capture_output=True,
                text=True,
            )
            restore_s = time.perf_counter() - t
            if proc.returncode:
                raise RuntimeError(f"criu restore --lazy-pages: {errors_from_log(images / 'restore-lazy.log')}")
            await client.kernel_info(reply=True, timeout=120)
            answer_s = time.perf_counter() - t
            await asyncio.to_thread(daemon.wait, 300)
            all_s = time.perf_counter() - t
            value = await self.run(client, check)
        finally:
            if daemon.poll() is None:
                daemon.kill()
            if (images / "restored.pid").exists():
                os.kill(int((images / "restored.pid").read_text()), signal.SIGKILL)
        return {
            "raw_lazy_restore_s": restore_s,
            "raw_lazy_answer_s": answer_s,
            "raw_lazy_all_s": all_s,
            "raw_lazy_check": value,
        }

    # -- dill --------------------------------------------------------------------------

    async def dill_dump(self, client: Any, path: Path) -> dict:
        code = (
            "import dill as _dill, os as _os, time as _time\n"
            f"_t = _time.perf_counter(); _dill.dump_session({str(path)!r}); _dump = _time.perf_counter() - _t\n"
            f"_f = open({str(path)!r}, 'rb'); _os.fsync(_f.fileno()); _f.close(); _durable = _time.perf_counter() - _t\n"
            "(_dump, _durable)"
        )
        dump_s, durable_s = eval(await self.run(client, code))
        return {"dill_dump_s": dump_s, "dill_durable_s": durable_s, "dill_bytes": path.stat().st_size}

    async def dill_load(self, path: Path, check: str) -> dict:
        kernel_id, client = await self.start()
        try:
            code = (
                "import dill as _dill, time as _time\n"
                f"_t = _time.perf_counter(); _dill.load_session({str(path)!r}); _time.perf_counter() - _t"
            )
            load_s = float(await self.run(client, code))
            value = await self.run(client, check)
        finally:
            await self.stop(kernel_id, client)
        return {"dill_load_s": load_s, "dill_check": value}


def _stats(path: Path, kind: str) -> dict:
    import pycriu

    try:
        with open(path, "rb") as f:
            return pycriu.images.load(f)["entries"][0][kind]
    except Exception:
        return {}


async def measure_workload(bench: Bench, name: str, code: str, check: str, gib: float) -> list[dict]:
    """Rows of figures for one workload (three for the 'again' one)."""
    rows = []
    kernel_id, client = await bench.start()
    try:
        await bench.run(client, code)
        expected = await bench.run(client, check)
        row: dict[str, Any] = {"workload": name, "gib": gib}
        row.update(await bench.ckpt_snapshot(kernel_id))
        first_id = row["snapshot_id"]
        if name == AGAIN:
            again = {"workload": f"{name}, again, 0 % changed", "gib": gib, **await bench.ckpt_snapshot(kernel_id)}
            await bench.run(client, "data.reshape(-1, 512)[::10, 0] += 1.0")  # one page in ten
            changed = {"workload": f"{name}, again, 10 % changed", "gib": gib, **await bench.ckpt_snapshot(kernel_id)}
        # Restore (warm local store): undo a change, then check the state.
        await bench.run(client, "data = None")
        row.update(await bench.ckpt_restore(first_id))
        assert await bench.run(client, check) == expected, f"{name}: restored state differs"
        session = bench.work / "dill-session.pkl"
        try:
            row.update(await bench.dill_dump(client, session))
            row.update(await bench.dill_load(session, check))
            row["dill_ok"] = row.pop("dill_check") == expected
        except RuntimeError as e:
            row["dill_error"] = str(e)[:200]
        finally:
            session.unlink(missing_ok=True)
        # Raw CRIU last: its restore needs the kernel gone. Dump, then restore at
        # once: with any cell run in between, IPython's history file grows and a
        # raw restore fails ("bad size"), which jupyter-ckpt allows for.
        raw = bench.work / "raw-images"
        try:
            row.update(bench.raw_dump(kernel_id, raw))
            row.update(bench.raw_restore(kernel_id, raw))
            row.update(await bench.raw_lazy_restore(client, raw, check))
            row["raw_lazy_ok"] = row.pop("raw_lazy_check") == expected
        except (RuntimeError, TimeoutError) as e:  # the baseline failed: reported, the run goes on
            row["raw_error"] = f"{type(e).__name__}: {e}"[:200]
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        rows.append(row)
        if name == AGAIN:
            rows += [again, changed]
    finally:
        await bench.stop(kernel_id, client)
    return rows


async def measure_repeated(bench: Bench, name: str, runs: int) -> dict:
    """The headline comparison on a noisy machine: ``runs`` rounds on one
    kernel, each a jupyter-ckpt snapshot (after changing one page in ten, as
    between two cells) then a dill.dump_session, and a restore of that
    snapshot (its kept images). Then ``runs`` rounds of the same without the
    restores (as auto-backup and %checkpoint take them: a restored kernel's
    first snapshot is a full one, later ones copy what changed). Medians."""
    code, check, gib = WORKLOADS[name]
    kernel_id, client = await bench.start()
    rounds, steady = [], []
    session = bench.work / "dill-session.pkl"

    async def snapshot_and_dill() -> dict:
        await bench.run(client, "data.reshape(-1, 512)[::10, 0] += 1.0")
        row = await bench.ckpt_snapshot(kernel_id)
        row.update(await bench.dill_dump(client, session))
        session.unlink()
        return row

    try:
        await bench.run(client, code)
        for i in range(runs):
            row = await snapshot_and_dill()
            row.update(await bench.ckpt_restore(row["snapshot_id"]))
            rounds.append(row)
            print(f"  round {i + 1}: " + json.dumps({k: v for k, v in row.items() if k.endswith("_s")}), flush=True)
        await bench.ckpt_snapshot(kernel_id)  # the first after the last restore: a full one
        for i in range(runs):
            steady.append(await snapshot_and_dill())
            print(
                f"  without restores, round {i + 1}: "
                + json.dumps({k: v for k, v in steady[-1].items() if k.endswith("_s")}),
                flush=True,
            )
    finally:
        await bench.stop(kernel_id, client)
    keys = (
        "freeze_s",
        "durable_s",
        "dill_dump_s",
        "dill_durable_s",
        "restore_s",
        "restore_prepare_s",
        "restore_save_previous_s",
        "restore_criu_s",
    )
    steady_keys = ("freeze_s", "durable_s", "dill_dump_s", "dill_durable_s")
    return {
        "workload": name,
        "gib": gib,
        "runs": runs,
        **{k: median([r[k] for r in rounds]) for k in keys},
        **{f"steady_{k}": median([r[k] for r in steady]) for k in steady_keys},
    }


async def run_suite(args: argparse.Namespace, work: Path) -> dict:
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    bench = Bench(work, criu)
    limits = {
        "memcpy_gbps": memcpy_gbps(),
        "first_touch_gbps": first_touch_gbps(),
        "disk_write_fsync_gbps": file_write_gbps(work, fsync=True),
        "page_cache_write_gbps": file_write_gbps(work, fsync=False),
        "page_hash_gbps": page_hash_gbps(),
    }
    print("machine: " + limits_text(limits), flush=True)
    if args.coverage_only:
        cover = await state_coverage.measure(work / "coverage", bench, kishu=not args.no_kishu)
        bench.manager.close()
        return {"machine": machine(), "limits": limits, "rows": [], "repeated": None, "kishu": None, "coverage": cover}
    rows: list[dict] = []
    names = QUICK if args.quick else list(WORKLOADS)
    for name in names:
        code, check, gib = WORKLOADS[name]
        print(f"workload: {name} ...", flush=True)
        for row in await measure_workload(bench, name, code, check, gib):
            rows.append(row)
            print(
                "  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True
            )
    name, runs = ("numpy 0.25 GiB", 2) if args.quick else ("numpy 1 GiB", 5)
    print(f"repeated: {name} ...", flush=True)
    repeated = await measure_repeated(bench, name, runs)
    print("hibernation ...", flush=True)
    # (it runs its own event loop: in a thread of its own)
    hibernation = await asyncio.to_thread(
        hibernation_bench.measure, work / "hibernation", *((0.25, 2) if args.quick else (1.0, 5))
    )
    kishu = None
    if not args.no_kishu and not args.quick:
        kishu = kishu_bench.measure(work / "kishu", WORKLOADS["numpy 1 GiB"])
    cover = await state_coverage.measure(work / "coverage", bench, kishu=not args.no_kishu and not args.quick)
    bench.manager.close()
    return {
        "machine": machine(),
        "limits": limits,
        "rows": rows,
        "repeated": repeated,
        "hibernation": hibernation,
        "kishu": kishu,
        "coverage": cover,
    }


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "criu": CriuEngine().health().version,
    }


# -- report -----------------------------------------------------------------------------


def per_gib(value: float | None, gib: float) -> str:
    return "–" if value is None else f"{value / gib:.2f}"


def limits_text(lim: dict) -> str:
    return (
        f"memory copy {lim['memcpy_gbps']:.1f} GB/s, first touch of memory {lim['first_touch_gbps']:.1f} GB/s, "
        f"disk write+fsync {lim['disk_write_fsync_gbps']:.2f} GB/s, write to page cache "
        f"{lim['page_cache_write_gbps']:.2f} GB/s, BLAKE3 of 4 KiB pages {lim['page_hash_gbps']:.2f} GB/s"
    )


def report(result: dict) -> str:
    lim = result["limits"]
    lines = [
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['memory_gib']} GiB, Linux "
        f"{result['machine']['kernel']}, CRIU {result['machine']['criu']}; " + limits_text(lim),
        "",
        "| workload | freeze s/GiB (raw CRIU) | durable s (raw CRIU, dill) | goal durable s | restore s/GiB (raw CRIU, raw CRIU lazy: answers / all back, dill load) | new / total stored |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        gib = r["gib"]
        disk_s = (r["new_stored_bytes"] or 0) / 1e9 / lim["disk_write_fsync_gbps"]
        goal = 1.2 * disk_s + (r["freeze_s"] or 0)
        raw = f"{r['raw_freeze_s'] / gib:.2f}" if "raw_freeze_s" in r else "–"
        dill = f"{r['dill_durable_s']:.2f}" if "dill_durable_s" in r else ("fails" if "dill_error" in r else "–")
        durable_raw = f"{r['raw_durable_s']:.2f}" if "raw_durable_s" in r else "–"
        restore = f"{r['restore_s'] / gib:.2f}" if "restore_s" in r else "–"
        raw_restore = f"{r['raw_restore_s'] / gib:.2f}" if "raw_restore_s" in r else "–"
        lazy = (
            f"{r['raw_lazy_answer_s'] / gib:.2f} / {r['raw_lazy_all_s'] / gib:.2f}" if "raw_lazy_answer_s" in r else "–"
        )
        dill_load = f"{r['dill_load_s'] / gib:.2f}" if "dill_load_s" in r else "–"
        lines.append(
            f"| {r['workload']} | {r['freeze_s'] / gib:.2f} ({raw}) | {r['durable_s']:.2f} ({durable_raw}, {dill}) | "
            f"{goal:.2f} | {restore} ({raw_restore}, {lazy}, {dill_load}) | "
            f"{r['new_stored_bytes'] / GIB:.3f} / {r['total_stored_bytes'] / GIB:.2f} GiB |"
        )
    rep = result.get("repeated")
    if rep:
        lines += [
            "",
            f"{rep['workload']}, {rep['runs']} rounds on one kernel (one page in ten changed before each), medians: "
            f"freeze {rep['freeze_s']:.2f} s against dill.dump_session {rep['dill_dump_s']:.2f} s "
            f"({rep['dill_dump_s'] / rep['freeze_s']:.1f}x shorter stop of the kernel); durable {rep['durable_s']:.2f} s "
            f"against dill's {rep['dill_durable_s']:.2f} s; restore until it answers {rep['restore_s']:.2f} s "
            f"(checking its kept images {rep['restore_prepare_s']:.2f} s, saving the replaced state "
            f"{rep['restore_save_previous_s']:.2f} s, CRIU {rep['restore_criu_s']:.2f} s). Each of these "
            "snapshots is the first after a restore: a full one.",
            "",
            f"The same, {rep['runs']} rounds without the restores (as auto-backup and %checkpoint take them: "
            f"each snapshot copies what changed since the one before), medians: freeze {rep['steady_freeze_s']:.3f} s "
            f"against dill.dump_session {rep['steady_dill_dump_s']:.2f} s "
            f"({rep['steady_dill_dump_s'] / rep['steady_freeze_s']:.1f}x shorter stop of the kernel); durable "
            f"{rep['steady_durable_s']:.2f} s against dill's {rep['steady_dill_durable_s']:.2f} s",
        ]
    if result.get("hibernation"):
        lines += ["", hibernation_bench.report(result["hibernation"])]
    k = result.get("kishu")
    if k:
        lines += [
            "",
            f"Kishu {k.get('version', '')}: "
            + (
                k["error"]
                if k.get("error")
                else f"commit {k['commit_s']:.2f} s, checkout {k['checkout_s']:.2f} s (numpy 1 GiB)"
            ),
        ]
    lines += ["", state_coverage.report(result["coverage"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small workload, no Kishu: a smoke check")
    parser.add_argument("--no-kishu", action="store_true")
    parser.add_argument("--coverage-only", action="store_true", help="only which kinds of state survive each tool")
    parser.add_argument("--json", default="test-artifacts/bench.json", help="where to write the figures")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one on the store's disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=args.work) as tmp:
        result = asyncio.run(run_suite(args, Path(tmp)))
    text = report(result)
    print("\n" + text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
