"""A kernel in another language: R (Debian's r-cran-irkernel), snapshotted in
the middle of a loop, then restored in place and forked. Nothing in the product
is specific to Python kernels; pickling tools cannot save an R session at all."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from .client import restore, snapshot
from .test_fork import connect, fork

pytestmark = [pytest.mark.criu, pytest.mark.timeout(300)]

IR_KERNELSPEC = Path("/usr/share/jupyter/kernels/ir")


@pytest.fixture
def r_kernel(jp_data_dir):
    """The R kernelspec Debian installs, seen by the test server (whose
    Jupyter paths are the test's own)."""
    if not IR_KERNELSPEC.is_dir() or not shutil.which("R"):
        pytest.fail("the R kernel is missing: make test installs r-cran-irkernel (scripts/install-system.sh)")
    shutil.copytree(IR_KERNELSPEC, jp_data_dir / "kernels" / "ir")
    return "ir"


# A loop of 100 steps, 0.1 s each, with a digest of its steps. IRkernel sends a
# top-level expression's output when it ends, so the test waits by time.
LOOP = """
h <- 0
for (i in 1:100) {
  h <- (h * 31 + i * i) %% 1000003
  Sys.sleep(0.05)
}
cat("result", h, "\\n")
"""


async def r_value(sock, expr: str, timeout: float = 60) -> str:
    """What ``cat(expr)`` prints (IRkernel shows values as display data)."""
    return (await sock.execute(f"cat({expr})", timeout)).stdout.strip()


def expected_digest() -> str:
    h = 0
    for i in range(1, 101):
        h = (h * 31 + i * i) % 1000003
    return str(h)


async def test_r_kernel_snapshot_mid_loop_then_restore_and_fork(jp_fetch, jp_ws_fetch, start_kernel, r_kernel):
    kernel_id, sock = await start_kernel(r_kernel)
    run = await sock.send_execute(LOOP)
    await asyncio.sleep(1.5)  # about step 30 of 100
    snap = await snapshot(jp_fetch, kernel_id)
    await sock.finish(run, timeout=60)
    assert run.stdout.split() == ["result", expected_digest()]
    await sock.execute("marker <- 'set after the snapshot'")

    # In place: the loop goes on from where the snapshot caught it.
    run.stdout, run.status, run.idle = "", None, False
    await restore(jp_fetch, snap["id"])
    await sock.finish(run, timeout=60)
    assert run.status == "ok"
    assert run.stdout.split() == ["result", expected_digest()]
    assert await r_value(sock, "exists('marker')") == "FALSE"

    # A fork finishes the same loop beside the original.
    forked = await connect(jp_ws_fetch, (await fork(jp_fetch, snap["id"]))["kernel_id"])
    assert await r_value(forked, "h") == expected_digest()
    assert await r_value(forked, "exists('marker')") == "FALSE"
    await forked.execute("h <- -1")
    assert await r_value(sock, "h") == expected_digest()


def r_notebook() -> str:
    return json.dumps(
        {
            "cells": [
                {"cell_type": "code", "metadata": {}, "source": "x <- 41", "outputs": [], "execution_count": None}
            ],
            "metadata": {"kernelspec": {"display_name": "R", "language": "R", "name": "ir"}},
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )
