"""Cost against size, and a kernel that keeps working while it is backed up.

    python benchmarks/large.py [--gib 8] [--train-gib 2] [--interval 60] [--snapshots 4] [--json FILE]

Measured in one run on this machine, through the checkpoint manager (no
Jupyter server) with real kernels started by jupyter_ckpt's provisioner:

- size: a kernel holding 1 GiB of numpy data and one holding ``--gib`` GiB,
  each snapshotted for the first time (freeze, until durable), then dumped by
  raw CRIU into a plain folder (its freeze), then restored (until the kernel
  answers; the state it replaces is small). Per GiB, to see whether the cost
  grows faster than the size.
- training loop: a kernel holding ``--train-gib`` GiB runs a loop that computes
  and writes 5 % of its pages per ``--interval`` seconds, while a snapshot is
  taken every interval (as auto-backup does, mid-cell); the same loop for as
  long without snapshots before and after. What the loop lost (steps per
  second), each snapshot's freeze and what it added to the store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import GIB, Bench, dir_bytes  # noqa: E402  (benchmarks/suite.py)

# The loop: steps of a little compute (a 256 x 256 matrix product), writing
# rows of 4 KiB (pages) of the data at random as it goes, 5 % of the pages per
# interval (by the clock, whatever the step rate). Returns steps and seconds.
TRAIN = """
import numpy as np, time
def train(seconds, interval, fraction=0.05):
    rng = np.random.default_rng(1)
    m = rng.random((256, 256))
    pages = data.reshape(-1, 512)
    per_second = fraction * len(pages) / interval
    steps = written = 0
    start = time.perf_counter()
    while (now := time.perf_counter() - start) < seconds:
        m = np.tanh(m @ m / 256)
        due = int(per_second * now) - written
        if due > 0:
            pages[rng.integers(0, len(pages), due), 0] += 1.0
            written += due
        steps += 1
    return steps, time.perf_counter() - start
"""


def build(gib: float) -> str:
    return f"import numpy as np; data = np.random.default_rng(0).random({int(gib * GIB / 8)}); x = float(data[12345])"


async def size_row(bench: Bench, gib: float) -> dict:
    kernel_id, client = await bench.start()
    try:
        await bench.run(client, build(gib))
        expected = await bench.run(client, "x")
        row = {"gib": gib, **await bench.ckpt_snapshot(kernel_id)}
        raw = bench.work / "raw-images"
        row.update({k: v for k, v in bench.raw_dump(kernel_id, raw).items() if k in ("raw_freeze_s", "raw_memwrite_s")})
        shutil.rmtree(raw)
        await bench.run(client, "data = None")
        row.update(await bench.ckpt_restore(row["snapshot_id"]))
        assert await bench.run(client, "float(data[12345])") == expected, "restored state differs"
    finally:
        await bench.stop(kernel_id, client)
    print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row


async def training_loop(bench: Bench, gib: float, interval: float, snapshots: int) -> dict:
    kernel_id, client = await bench.start()
    seconds = interval * (snapshots + 0.5)  # the last snapshot is taken mid-loop too
    try:
        await bench.run(client, build(gib) + "\n" + TRAIN)
        # Without snapshots before and after (the machine's noise shows in the two).
        quiet = [json.loads(await bench.run(client, f"list(train({seconds}, {interval}))"))]
        await bench.manager.snapshot(kernel_id, label="before the loop")  # the loop's first backup is incremental
        base = dir_bytes(Path(bench.store.root) / "packs")
        msg_id = client.execute(f"r = train({seconds}, {interval})")
        taken = []
        started = asyncio.get_running_loop().time()
        for k in range(1, snapshots + 1):  # every interval, as auto-backup's schedule
            await asyncio.sleep(max(0.0, started + k * interval - asyncio.get_running_loop().time()))
            record = await bench.manager.snapshot(kernel_id, label="auto", trigger="auto")
            if asyncio.get_running_loop().time() - started >= seconds:
                raise RuntimeError("a snapshot ended after the loop did: its figures would not be mid-loop")
            taken.append(record)
            print(
                f"  snapshot: freeze {record.freeze_seconds:.2f} s, durable {record.total_seconds:.2f} s, "
                f"new {record.stored_bytes / 2**20:.0f} MiB",
                flush=True,
            )
        while True:  # the cell's reply
            reply = await client.get_shell_msg(timeout=seconds + 600)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        steps, elapsed = json.loads(await bench.run(client, "list(r)"))
        growth = dir_bytes(Path(bench.store.root) / "packs") - base
        quiet.append(json.loads(await bench.run(client, f"list(train({seconds}, {interval}))")))
    finally:
        await bench.stop(kernel_id, client)
    rate = steps / elapsed
    quiet_rate = statistics.mean(q[0] / q[1] for q in quiet)
    return {
        "gib": gib,
        "interval_s": interval,
        "snapshots": snapshots,
        "steps_per_s": rate,
        "steps_per_s_without_snapshots": quiet_rate,
        "steps_per_s_without_snapshots_before_and_after": [q[0] / q[1] for q in quiet],
        "lost": 1 - rate / quiet_rate,
        "freeze_s": statistics.median(r.freeze_seconds for r in taken),
        "durable_s": statistics.median(r.total_seconds for r in taken),
        "new_stored_bytes": statistics.median(r.stored_bytes for r in taken),
        "store_growth_bytes": growth,
    }


def report(result: dict) -> str:
    lines = []
    if result["size"]:
        lines += size_report(*result["size"])
    t = result.get("training")
    if t:
        lines += [
            "",
            f"training loop, {t['gib']:g} GiB, 5 % of its pages written per {t['interval_s']:g} s, a snapshot every "
            f"{t['interval_s']:g} s ({t['snapshots']}): {t['steps_per_s']:.0f} steps/s against "
            f"{t['steps_per_s_without_snapshots']:.0f} without snapshots (before and after: "
            + ", ".join(f"{r:.0f}" for r in t["steps_per_s_without_snapshots_before_and_after"])
            + f"; lost {100 * t['lost']:.1f} %); per snapshot (medians): freeze {t['freeze_s']:.2f} s, durable "
            f"{t['durable_s']:.2f} s, new in the store {t['new_stored_bytes'] / 2**20:.0f} MiB; the store grew "
            f"{t['store_growth_bytes'] / 2**20:.0f} MiB in all",
        ]
    return "\n".join(lines)


def size_report(small: dict, large: dict) -> list[str]:
    lines = [
        "| kernel | freeze s (s/GiB) | raw CRIU freeze s (s/GiB) | durable s (s/GiB) | restore until it answers s (s/GiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in (small, large):
        g = r["gib"]
        lines.append(
            f"| numpy {g:g} GiB | {r['freeze_s']:.2f} ({r['freeze_s'] / g:.2f}) | {r['raw_freeze_s']:.2f} "
            f"({r['raw_freeze_s'] / g:.2f}) | {r['durable_s']:.2f} ({r['durable_s'] / g:.2f}) | "
            f"{r['restore_s']:.2f} ({r['restore_s'] / g:.2f}) |"
        )
    ratio = (large["freeze_s"] / large["gib"]) / (small["freeze_s"] / small["gib"])
    return [*lines, "", f"freeze per GiB, {large['gib']:g} GiB against 1 GiB: {ratio:.2f} x (goal: at most 1.2 x)"]


async def run(args: argparse.Namespace, work: Path) -> dict:
    bench = Bench(work, shutil.which("criu") or "/usr/local/sbin/criu")
    try:
        result: dict = {"size": []}
        for gib in (1.0, args.gib) if args.gib else ():
            print(f"numpy {gib:g} GiB ...", flush=True)
            result["size"].append(await size_row(bench, gib))
        if args.snapshots:
            print(f"training loop, {args.train_gib:g} GiB ...", flush=True)
            result["training"] = await training_loop(bench, args.train_gib, args.interval, args.snapshots)
    finally:
        bench.manager.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=8, help="the large kernel (0: no size rows)")
    parser.add_argument("--train-gib", type=float, default=2)
    parser.add_argument("--interval", type=float, default=60, help="seconds between snapshots of the loop")
    parser.add_argument("--snapshots", type=int, default=4, help="of the loop (0: no training loop row)")
    parser.add_argument("--json", default="test-artifacts/bench-large.json")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=args.work) as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print("\n" + report(result))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
