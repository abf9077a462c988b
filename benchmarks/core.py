"""Snapshot and restore of a kernel holding N GiB of numpy data: medians of runs.

Drives the engine and the checkpoint manager directly (no Jupyter server), with
real kernels started by jupyter_client through jupyter_ckpt's provisioner.

    python benchmarks/core.py [--gib 1] [--runs 3] [--store DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.manager import CheckpointManager
from jupyter_ckpt.store import SnapshotStore


async def execute(client, code: str, timeout: float = 600) -> dict:
    reply = await client.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{code!r}: {reply['content']}")
    return reply


async def run(gib: float, runs: int, store_dir: str) -> dict:
    os.makedirs(store_dir, exist_ok=True)
    KernelProvisionerFactory.instance().default_provisioner_name = "ckpt-provisioner"
    kernels = AsyncMultiKernelManager(connection_dir=store_dir)
    kernel_id = await kernels.start_kernel(kernel_name="python3")
    km = kernels.get_kernel(kernel_id)
    client = km.client()
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    manager = CheckpointManager(kernels, CriuEngine(), SnapshotStore(store_dir))
    manager.activity.watch(kernel_id)
    n = int(gib * 2**30 / 8)
    await execute(client, f"import numpy as np; a = np.random.default_rng(0).random({n}); s0 = float(a.sum())")

    rows = []
    records = []
    older: dict = {}
    try:
        for i in range(runs):
            record = await manager.snapshot(kernel_id, label=f"bench {i}")
            records.append(record)
            await execute(client, "a[:] = 0")  # so the restore has something to undo
            started = time.monotonic()
            outcome = await manager.restore(record.id)
            answered = time.monotonic() - started
            await execute(client, "assert float(a.sum()) == s0")
            rows.append(
                {
                    "freeze_s": record.freeze_seconds,
                    "snapshot_total_s": record.total_seconds,
                    "restore_prepare_s": outcome.prepare_seconds,  # images ready and checked
                    "restore_save_previous_s": outcome.save_previous_seconds,
                    "restore_criu_s": outcome.restore_seconds,
                    "restore_until_answering_s": round(answered, 3),
                    "memory_bytes": record.memory_bytes,
                    "stored_bytes": record.stored_bytes,  # new bytes added to the store
                }
            )
            print(f"run {i + 1}: {rows[-1]}", flush=True)
        if runs > 1:
            # The first snapshot, no longer the one whose images are kept: its
            # images come from the store's chunks and the latest kept images.
            await execute(client, "a[:] = 1")
            started = time.monotonic()
            outcome = await manager.restore(records[0].id)
            older = {
                "restore_prepare_s": outcome.prepare_seconds,
                "restore_until_answering_s": round(time.monotonic() - started, 3),
            }
            await execute(client, "assert float(a.sum()) == s0")
            print(f"older snapshot: {older}", flush=True)
    finally:
        client.stop_channels()
        await kernels.shutdown_all(now=True)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"gib": gib, "runs": rows, "median": medians, "older": older}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        # The store inside the temporary folder: its key (beside the store) goes with it.
        result = asyncio.run(run(args.gib, args.runs, args.store or f"{tmp}/store"))
    m = result["median"]
    gib = result["gib"]
    print(f"\nkernel holding {gib:g} GiB of float64, median of {args.runs} runs")
    print(f"  freeze (kernel stopped)        {m['freeze_s']:.3f} s   ({m['freeze_s'] / gib:.3f} s/GiB)")
    print(f"  snapshot total (until durable) {m['snapshot_total_s']:.3f} s")
    print(f"  restore (CRIU)                 {m['restore_criu_s']:.3f} s")
    print(
        f"  restore until kernel answers   {m['restore_until_answering_s']:.3f} s"
        "   (includes saving the replaced state first)"
    )
    print(f"  memory dumped (CRIU images)    {m['memory_bytes'] / 2**30:.3f} GiB")
    if result["older"]:
        older = result["older"]
        print(
            f"  restore of the first snapshot  {older['restore_until_answering_s']:.3f} s"
            f"   (its images ready and checked in {older['restore_prepare_s']:.3f} s)"
        )
    first = result["runs"][0]
    print(
        f"  stored: first snapshot {first['stored_bytes'] / 2**30:.3f} GiB, "
        f"later ones (median) {statistics.median(r['stored_bytes'] for r in result['runs'][1:] or [first]) / 2**20:.1f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
