"""The demo notebook's cells run in a real kernel, and its story holds: a
snapshot in the middle of the long cell, restored, ends with the same result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .client import restore, snapshot

pytestmark = pytest.mark.criu

DEMO = Path(__file__).parent.parent / "notebooks" / "demo.ipynb"


async def test_demo_notebook_story(jp_fetch, start_kernel):
    cells = ["".join(c["source"]) for c in json.loads(DEMO.read_text())["cells"] if c["cell_type"] == "code"]
    setup, loop, check = cells
    kernel_id, sock = await start_kernel()
    await sock.execute(setup)
    run = await sock.send_execute(loop.replace("time.sleep(0.25)", "time.sleep(0.02)"))
    await sock.wait_until(lambda: "step 150/200" in run.stdout, timeout=120)  # 50 steps left
    snap = await snapshot(jp_fetch, kernel_id, label="mid-loop")
    await sock.finish(run, timeout=120)
    final = run.stdout.split("final checksum")[1]
    run.stdout, run.status, run.idle = "", None, False
    await restore(jp_fetch, snap["id"])
    await sock.finish(run, timeout=120)
    assert run.stdout.split("final checksum")[1] == final
    assert "step  10/200" not in run.stdout and "step 200/200" in run.stdout
    out = (await sock.execute(check)).stdout
    assert "next square: 1" in out
