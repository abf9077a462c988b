"""Hibernation figures, through a real `jupyter server` and a websocket, as a
notebook uses it: a kernel holding --gib of numpy data is hibernated, then a
cell is sent to it; medians of --runs.

    python benchmarks/hibernation.py --gib 1 --runs 5

- memory freed: the server's figure (the kernel's processes' PSS before they
  stopped) and the host's MemAvailable before and after (each after a sync,
  so that the snapshot's images in the page cache count as available);
- hibernate: POST .../hibernate until it answers (snapshot durable, processes gone);
- wake: from the execute request on the websocket to the cell's first output,
  against a hibernated kernel; beside it, in the same run, the same request to
  the kernel running (the floor) and a fresh kernel's start until its first
  output (what a culled kernel leaves: its data must then be rebuilt too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tornado.httpclient import HTTPRequest  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

from tests.servers import TOKEN, Server  # noqa: E402

MiB = 2**20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


async def connect(server: Server, kernel_id: str):
    """A websocket to the kernel, as an open notebook holds one."""
    url = f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
    return await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))


async def first_output(ws, code: str) -> float:
    """Seconds from sending ``code`` on ``ws`` to its first output."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "session": "bench", "username": "", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    started = time.perf_counter()
    await ws.write_message(
        json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"})
    )
    while True:
        raw = await asyncio.wait_for(ws.read_message(), 300)
        if raw is None:
            raise ConnectionError("websocket closed")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "stream":
            return time.perf_counter() - started


def measure(work: Path, gib: float = 1.0, runs: int = 5) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    server = Server(work)
    figures: dict[str, list[float]] = {
        k: [] for k in ("freed", "available", "server", "hibernate", "wake", "running", "fresh")
    }
    try:
        asyncio.run(_measure(server, gib, runs, figures))
    finally:
        server.kill()
    return {"gib": gib, "runs": runs, **{k: statistics.median(v) for k, v in figures.items()}}


async def _measure(server: Server, gib: float, runs: int, figures: dict[str, list[float]]) -> None:
    kernel_id = server.call("POST", "/api/kernels", {"name": "python3"})["id"]
    ws = await connect(server, kernel_id)  # open all along, as the notebook's
    build = f"import numpy as np; data = np.random.default_rng(0).random(int({gib} * 2**27)); print('built')"
    await first_output(ws, build)
    probe = "print(float(data[12345]))"
    for _ in range(runs):
        figures["running"].append(await first_output(ws, probe))
        os.sync()
        before, server_before = mem_available(), rss(server.proc.pid)
        started = time.perf_counter()
        out = await asyncio.to_thread(server.call, "POST", f"/api/ckpt/kernels/{kernel_id}/hibernate", None, 600)
        figures["hibernate"].append(time.perf_counter() - started)
        os.sync()  # the snapshot's images written: their page cache counts as available again
        figures["available"].append(mem_available() - before)
        figures["server"].append(rss(server.proc.pid) - server_before)
        figures["freed"].append(out["memory_freed_bytes"])
        figures["wake"].append(await first_output(ws, probe))  # held by the server, sent once it runs
    ws.close()
    for _ in range(runs):
        started = time.perf_counter()
        fresh = await asyncio.to_thread(server.call, "POST", "/api/kernels", {"name": "python3"})
        fresh_ws = await connect(server, fresh["id"])
        await first_output(fresh_ws, "print(1)")
        figures["fresh"].append(time.perf_counter() - started)
        fresh_ws.close()
        await asyncio.to_thread(server.call, "DELETE", f"/api/kernels/{fresh['id']}")


def report(r: dict) -> str:
    return "\n".join(
        [
            f"| hibernation, numpy {r['gib']:g} GiB (medians of {r['runs']}) | |",
            "| --- | --- |",
            f"| memory freed (server's figure: the processes' PSS; host MemAvailable change, after sync) | {r['freed'] / MiB:.0f} MiB; "
            f"{r['available'] / MiB:+.0f} MiB (the server process's memory: {r['server'] / MiB:+.0f} MiB) |",
            f"| hibernate, until the processes are gone | {r['hibernate']:.2f} s |",
            f"| execute request to first output, waking | {r['wake']:.2f} s |",
            f"| same, kernel running (floor) | {r['running'] * 1000:.0f} ms |",
            f"| a fresh kernel, start to first output (its data not rebuilt) | {r['fresh']:.2f} s |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-hibernation-") as tmp:
        result = measure(Path(tmp), args.gib, args.runs)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
