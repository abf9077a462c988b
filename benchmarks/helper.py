"""What the helper adds: dump and restore of the same 1 GiB process tree, by a
root engine (CriuEngine) and by an ordinary user through jupyter-ckpt-helper
(HelperEngine), in the same run. Medians of --runs; restores are full (not
lazy) on both sides, as the helper's are.

    python benchmarks/helper.py --gib 1 --runs 5

Run as root: it makes a user (removed afterwards) and starts a helper of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A kernel-like tree: 1 GiB of memory that is not zeros, in its own pid and
# mount namespace under tini, as the provisioner starts kernels.
ALLOCATE = (
    "import os, time, sys; block = os.urandom(1 << 20); "
    "data = [bytearray(block) for _ in range(int(float(sys.argv[1]) * 1024))]; "
    "open(sys.argv[2], 'w').close(); time.sleep(3600)"
)
USER = "ckpt-bench-helper"


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def measure(engine, launch, gib: float, runs: int, work: Path) -> dict[str, list[float]]:
    """Dump then restore the tree ``runs`` times (each restore replaces the
    previous tree); seconds of each engine call, and CRIU's freeze."""
    from jupyter_ckpt.kernel_tree import KernelStdio, RestoredProcess, restore_tree

    ready = work / "ready"
    stdio = KernelStdio()
    pid = launch(stdio, ready)
    wait_for(ready)
    figures: dict[str, list[float]] = {"dump": [], "freeze": [], "restore": []}
    for run in range(runs):
        images = work / f"images-{run}"
        images.mkdir()
        started = time.monotonic()
        result = engine.dump(pid, images)
        figures["dump"].append(time.monotonic() - started)
        figures["freeze"].append(result.freeze_seconds)
        os.kill(pid, signal.SIGKILL)
        RestoredProcess(pid).wait()
        restored_work = work / f"restore-{run}"
        restored_work.mkdir()
        started = time.monotonic()
        tree = restore_tree(engine, images, restored_work, stdio.keys)
        figures["restore"].append(time.monotonic() - started)
        pid = tree.pid
        shutil.rmtree(images)
    os.kill(pid, signal.SIGKILL)
    return figures


def as_user(gib: float, runs: int, socket_path: str) -> None:
    """The user's side: launch, dump and restore through the helper."""
    from jupyter_ckpt.helper_client import HelperEngine

    engine = HelperEngine(socket_path=socket_path)
    work = Path(tempfile.mkdtemp(dir=os.path.expanduser("~")))

    def launch(stdio, ready: Path) -> int:
        cmd = [sys.executable, "-c", ALLOCATE, str(gib), str(ready)]
        pid = engine.launch(cmd, {"PATH": "/usr/bin:/bin"}, str(work), *stdio.write_fds.values(), True)
        stdio.close_write_ends()
        return pid

    print(json.dumps(measure(engine, launch, gib, runs, work)))


def as_root(gib: float, runs: int, python: str) -> dict[str, list[float]]:
    from jupyter_ckpt.engine import CriuEngine
    from jupyter_ckpt.provisioner import CheckpointableProvisioner

    engine = CriuEngine()
    work = Path(tempfile.mkdtemp())
    prefix, _ = CheckpointableProvisioner()._isolation_commands()
    assert prefix is not None

    def launch(stdio, ready: Path) -> int:
        unshare = subprocess.Popen(
            [*prefix, python, "-c", ALLOCATE, str(gib), str(ready)],
            stdin=subprocess.DEVNULL,
            stdout=stdio.write_fds["stdout"],
            stderr=stdio.write_fds["stderr"],
        )
        stdio.close_write_ends()
        for _ in range(500):
            children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.01)
        raise RuntimeError("no namespace init")

    try:
        return measure(engine, launch, gib, runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--as-user", help=argparse.SUPPRESS)  # the helper's socket, in the user's process
    args = parser.parse_args()
    if args.as_user:
        return as_user(args.gib, args.runs, args.as_user)

    from tests.users import RunningHelper, SharedPython, create_user, remove_user
    from tests.users import as_user as run_as

    python, helper = SharedPython(), RunningHelper()
    create_user(USER)
    try:
        root = as_root(args.gib, args.runs, python.python)
        done = run_as(
            USER,
            python.python,
            str(Path(__file__).resolve()),
            "--gib",
            str(args.gib),
            "--runs",
            str(args.runs),
            "--as-user",
            helper.socket,
            timeout=3600,
        )
        if done.returncode != 0:
            raise SystemExit(f"the user's side failed: {done.stderr[-3000:]}\n{helper.log()[-2000:]}")
        user = json.loads(done.stdout.strip().splitlines()[-1])
        print("".join(line + "\n" for line in helper.log().splitlines() if "images checked" in line), end="")
    finally:
        remove_user(USER)
        helper.close()
        python.close()
    rows = {}
    print(f"{args.gib:g} GiB process tree, medians of {args.runs} runs (seconds)")
    print(f"{'':10} {'root':>8} {'helper':>8} {'added':>8}")
    for name in ("freeze", "dump", "restore"):
        a, b = statistics.median(root[name]), statistics.median(user[name])
        rows[name] = {"root": round(a, 3), "helper": round(b, 3), "added": round(b - a, 3)}
        print(f"{name:10} {a:8.3f} {b:8.3f} {b - a:+8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gib": args.gib, "runs": args.runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
