"""Stored bytes and freeze time of the versioned store, on a real kernel.

A kernel holding N GiB of random float64 is snapshotted; then again unchanged;
then after changing 10 % of its pages (scattered); then a kernel with N GiB of
touched zero pages. Prints new bytes stored as ratios to the first snapshot,
and the freeze time with storage in the background (what the kernel feels)
against storage in the foreground (what it would feel if it stayed frozen
until the snapshot is durable).

    python benchmarks/store.py [--gib 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

from jupyter_client.multikernelmanager import AsyncMultiKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from jupyter_ckpt.engine import CriuEngine
from jupyter_ckpt.manager import CheckpointManager
from jupyter_ckpt.store import SnapshotStore


async def run(gib: float, store_dir: str) -> None:
    os.makedirs(store_dir, exist_ok=True)
    KernelProvisionerFactory.instance().default_provisioner_name = "ckpt-provisioner"
    kernels = AsyncMultiKernelManager(connection_dir=store_dir)
    kernel_id = await kernels.start_kernel(kernel_name="python3")
    client = kernels.get_kernel(kernel_id).client()
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    manager = CheckpointManager(kernels, CriuEngine(), SnapshotStore(store_dir))

    async def execute(code: str) -> None:
        reply = await client.execute_interactive(code, timeout=600, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]

    n = int(gib * 2**30 / 8)
    await execute(f"import numpy as np; a = np.random.default_rng(0).random({n})")
    rows = []
    first = await manager.snapshot(kernel_id, label="first")
    rows.append(("first snapshot", first))
    rows.append(("again, unchanged", await manager.snapshot(kernel_id)))
    await execute(
        "v = a.view(np.uint8).reshape(-1, 4096); rng = np.random.default_rng(1)\n"
        "v[rng.choice(len(v), len(v) // 10, replace=False), 0] ^= 1"
    )
    rows.append(("10 % of pages changed", await manager.snapshot(kernel_id)))
    await execute(f"del a, v; z = np.zeros({n}); z[::512] = 0.0")  # every page touched, all zero
    rows.append(("all-zero memory", await manager.snapshot(kernel_id)))
    client.stop_channels()
    await kernels.shutdown_all(now=True)

    base = first.stored_bytes
    print(f"\nkernel holding {gib:g} GiB; stored bytes are new bytes added to the store")
    print(f"{'snapshot':24} {'memory':>10} {'new stored':>12} {'ratio':>8} {'freeze':>8} {'durable':>8}")
    for name, r in rows:
        print(
            f"{name:24} {r.memory_bytes / 2**20:9.0f}M {r.stored_bytes / 2**20:11.1f}M "
            f"{r.stored_bytes / base:8.3%} {r.freeze_seconds:7.2f}s {r.total_seconds:7.2f}s"
        )
    print(
        f"\nfreeze of the first snapshot: {first.freeze_seconds:.2f} s with storage in the background; "
        f"{first.total_seconds:.2f} s if the kernel stayed frozen until the snapshot is durable"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        asyncio.run(run(args.gib, f"{tmp}/store"))  # its key (beside the store) goes with the folder


if __name__ == "__main__":
    main()
