"""Soak test: many snapshot / restore / fork cycles against one real server,
looking for what leaks.

    python benchmarks/soak.py [--cycles 200] [--json test-artifacts/soak.json]

Starts one real ``jupyter server`` with jupyter_ckpt (its own temporary root,
runtime dir and store, removed at the end) and one small kernel. After a
warm-up of 25 cycles and one prune it counts what a leak would make grow: the server's open fds and
RSS, the processes descending from the server (and criu processes anywhere),
network namespaces, veth interfaces, nftables tables, mounts, connection files,
kernels and snapshots listed, and files under the store's state directory.
Then, each cycle: set ``x`` in the kernel, snapshot, change ``x``, restore in
place and check ``x``, fork (restore as a new kernel), check the fork answers,
shut the fork down; every 25 cycles the snapshots but the newest are deleted.
After the cycles (and up to 10 s for background work to settle) the same counts
again: a table, a verdict, and the figures as JSON.

Exit status 1 when a count grew (files under state/images, the kept images of
each kernel's latest snapshot, are reported but not judged) or the server's RSS
grew by 50 MiB or more; else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.servers import Server, descendants  # noqa: E402

RSS_GOAL_MIB = 50
PRUNE_EVERY = 25
SETTLE_S = 10.0
SNAPSHOT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
NOT_JUDGED = {"other jupyter servers", "state/images files", "store packs", "store manifests"}
MACHINE_WIDE = {"criu processes", "network namespaces", "veth interfaces", "nftables tables", "mounts"}
MUST_BE_ZERO = {"state/tmp files", "state/staging files"}


# -- measuring ---------------------------------------------------------------


def lines_of(*cmd: str) -> int | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return len([line for line in out.splitlines() if line.strip()])


def count_tree(path: Path) -> int:
    """Files and directories under ``path`` (not ``path`` itself)."""
    if not path.exists():
        return 0
    n = 0
    for _, dirs, files in os.walk(path):
        n += len(dirs) + len(files)
    return n


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def criu_processes() -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    n += f.read().strip() == "criu"
            except OSError:
                pass
    return n


def other_servers(own: int) -> int:
    """jupyter servers on this machine other than ours (their forks, mounts
    and nftables show in the machine-wide counts too)."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != own:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            n += any(
                a in (b"jupyter_server", b"jupyterlab") or a.endswith((b"/jupyter-server", b"/jupyter-lab"))
                for a in args[:4]
            )
    return n


def measure(server: Server, tmp: Path) -> dict[str, int | None]:
    pid = server.proc.pid
    state = tmp / "store" / "state"
    other_state = 0
    breakdown = {}
    if state.exists():
        for entry in state.iterdir():
            if entry.name == "images":
                continue
            n = 1 + (count_tree(entry) if entry.is_dir() else 0)
            breakdown[entry.name] = n
            other_state += n
    m: dict[str, int | None] = {
        "server fds": len(os.listdir(f"/proc/{pid}/fd")),
        "server RSS KiB": rss_kib(pid),
        "server descendants": len(descendants(pid)),
        "criu processes": criu_processes(),
        "other jupyter servers": other_servers(pid),
        "network namespaces": lines_of("ip", "netns", "list"),
        "veth interfaces": lines_of("ip", "-o", "link", "show", "type", "veth"),
        "nftables tables": lines_of("nft", "list", "tables"),
        "mounts": len(Path("/proc/self/mounts").read_text().splitlines()),
        "runtime files": count_tree(server.runtime),
        "kernels listed": len(server.call("GET", "/api/kernels", timeout=30)),
        "snapshots listed": len(server.call("GET", "/api/ckpt/snapshots", timeout=30)),
        "state files (excl. images)": other_state,
        "state/tmp files": count_tree(state / "tmp"),
        "state/staging files": count_tree(state / "staging"),
        "state/images files": count_tree(state / "images"),
        "store packs": len(list((tmp / "store" / "packs").glob("*.pack"))),
        "store manifests": len(list((tmp / "store" / "manifests").glob("*.manifest"))),
    }
    for name, n in sorted(breakdown.items()):
        m[f"  state/{name}"] = n
    return m


def leaks(before: dict, after: dict) -> list[str]:
    out = []
    for name in sorted(set(before) | set(after)):
        if name == "server RSS KiB" or name in NOT_JUDGED or name.startswith("  "):
            continue
        b, a = before.get(name) or 0, after.get(name) or 0
        if a > b or (name in MUST_BE_ZERO and a > 0):
            out.append(name)
    return out


# -- driving the server -------------------------------------------------------


def take(server: Server, kernel_id: str, label: str = "") -> dict:
    snap = server.call("POST", f"/api/ckpt/kernels/{kernel_id}/snapshots", {"label": label})
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while snap["status"] not in ("complete", "failed"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"snapshot {snap['id']} still {snap['status']} after {SNAPSHOT_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
        snap = server.call("GET", f"/api/ckpt/snapshots/{snap['id']}")
    if snap["status"] != "complete":
        raise RuntimeError(f"snapshot failed: {snap.get('error')}")
    return snap


def evaluate(client, code: str, expr: str | None = None, timeout: float = 60) -> str | None:
    """Run ``code`` and give ``expr``'s repr, read from the execute reply on the
    shell channel (not IOPub: right after a restore its subscription may not
    be back yet, and a missed message would read as a wrong value)."""
    msg_id = client.execute(code, silent=False, store_history=False, user_expressions={"v": expr} if expr else {})
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply to {code!r} in {timeout:.0f} s")
        reply = client.get_shell_msg(timeout=left)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    content = reply["content"]
    if content["status"] != "ok":
        raise RuntimeError(f"{code!r} failed: {content.get('ename')}: {content.get('evalue')}")
    if not expr:
        return None
    result = content["user_expressions"]["v"]
    if result["status"] != "ok":
        raise RuntimeError(f"{expr!r} failed: {result.get('ename')}: {result.get('evalue')}")
    return result["data"]["text/plain"]


def close_client(client) -> None:
    client.stop_channels()
    if getattr(client, "_created_context", False):
        client.context.destroy(linger=0)


def prune(server: Server, kernel_id: str) -> int:
    """Delete every snapshot but the kernel's newest; how many were deleted."""
    snaps = server.call("GET", "/api/ckpt/snapshots")  # newest first
    keep = next((s["id"] for s in snaps if s["kernel_id"] == kernel_id and s["status"] == "complete"), None)
    deleted = 0
    for s in snaps:
        if s["id"] != keep:
            server.call("DELETE", f"/api/ckpt/snapshots/{s['id']}")
            deleted += 1
    return deleted


def fork(server: Server, snapshot_id: str, stats: dict) -> str:
    """Restore as a new kernel; its id."""
    return server.call("POST", f"/api/ckpt/snapshots/{snapshot_id}/restore", {"mode": "new"})["kernel_id"]


def cycle(server: Server, client, kernel_id: str, n: int, stats: dict) -> None:
    evaluate(client, f"x = {n}; _soak = bytearray({(1 + n % 8) << 20}); _soak[::4096] = b'\\1' * len(_soak[::4096])")
    evaluate(client, "del _soak")
    snap = take(server, kernel_id, label=f"soak {n}")
    evaluate(client, "x = -1")
    out = server.call("POST", f"/api/ckpt/snapshots/{snap['id']}/restore", {"mode": "replace"})
    if out.get("kernel_id") != kernel_id:
        raise RuntimeError(f"restore in place answered {out}")
    got = evaluate(client, "", "x")
    if got != str(n):
        raise RuntimeError(f"cycle {n}: after restore x = {got}, expected {n}")
    fork_id = fork(server, snap["id"], stats)
    try:
        forked = server.client(fork_id)
        try:
            got = evaluate(forked, "", "x")
        finally:
            close_client(forked)
        if got != str(n):
            raise RuntimeError(f"cycle {n}: fork has x = {got}, expected {n}")
    finally:
        server.call("DELETE", f"/api/kernels/{fork_id}")


def stop(server: Server) -> None:
    """SIGTERM the server (it shuts its kernels down), then SIGKILL what is
    left of the processes it started, by pid."""
    if server.proc.poll() is None:
        tree = descendants(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tree = descendants(server.proc.pid)
            server.kill()
        for pid in tree:  # started by the server; gone unless it left them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- reporting ----------------------------------------------------------------


def table(before: dict, after: dict) -> str:
    rows = [f"{'measure':30} {'before':>10} {'after':>10} {'difference':>11}"]
    names = list(before) + [n for n in after if n not in before]
    for name in names:
        b, a = before.get(name), after.get(name)
        diff = "" if a is None or b is None else f"{a - b:+d}"
        note = ""
        if name in NOT_JUDGED:
            note = "  (not judged)"
        elif name == "server RSS KiB":
            note = f"  ({(a - b) / 1024:+.1f} MiB)"
        rows.append(f"{name:30} {fmt(b):>10} {fmt(a):>10} {diff:>11}{note}")
    return "\n".join(rows)


def fmt(v) -> str:
    return "n/a" if v is None else str(v)


WARM_UP_CYCLES = 25


def settle(server: Server, tmp: Path, timeout: float = 60.0) -> None:
    """Until the server's background work (collecting deleted snapshots'
    space) is over: the store's packs unchanged for 3 s."""
    deadline = time.monotonic() + timeout
    last, steady_since = None, time.monotonic()
    while time.monotonic() < deadline:
        packs = sorted(p.name for p in (tmp / "store" / "packs").glob("*"))
        if packs != last:
            last, steady_since = packs, time.monotonic()
        elif time.monotonic() - steady_since >= 3:
            return
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--json", default="test-artifacts/soak.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ckpt-soak-"))
    server = None
    client = None
    stats: dict = {}
    result: dict = {"cycles": args.cycles, "completed_cycles": 0, "stats": stats}
    t0 = time.monotonic()
    try:
        server = Server(tmp)
        print(f"server pid {server.proc.pid}, port {server.port}, in {tmp}", flush=True)
        kernel_id = server.call("POST", "/api/kernels", {"name": "python3"})["id"]
        client = server.client(kernel_id)

        # Warm-up: one prune period, so that the store and the server reach
        # the shape they keep (the live snapshot's chunks in their packs,
        # memory pools grown) before the counts are taken.
        for n in range(-WARM_UP_CYCLES, 0):
            cycle(server, client, kernel_id, n, stats)
        prune(server, kernel_id)
        settle(server, tmp)
        before = measure(server, tmp)
        start = time.monotonic()
        print(f"warm-up done in {start - t0:.1f} s; RSS {before['server RSS KiB'] / 1024:.1f} MiB", flush=True)

        for n in range(1, args.cycles + 1):
            cycle(server, client, kernel_id, n, stats)
            result["completed_cycles"] = n
            if n % PRUNE_EVERY == 0:
                prune(server, kernel_id)
            if n % 10 == 0:
                print(
                    f"cycle {n:4d}  elapsed {time.monotonic() - start:7.1f} s  "
                    f"RSS {rss_kib(server.proc.pid) / 1024:7.1f} MiB",
                    flush=True,
                )
        cycles_s = time.monotonic() - start
        prune(server, kernel_id)  # as after the last 25-cycle prune, whatever --cycles
        settle(server, tmp)

        deadline = time.monotonic() + SETTLE_S
        while True:
            after = measure(server, tmp)
            if not leaks(before, after) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

        found = leaks(before, after)
        rss_mib = (after["server RSS KiB"] - before["server RSS KiB"]) / 1024
        rss_ok = rss_mib < RSS_GOAL_MIB
        print()
        print(table(before, after))
        print()
        images = after["state/images files"] - before["state/images files"]
        print(
            f"kept images under state/images: {before['state/images files']} -> {after['state/images files']} "
            f"({images:+d}; not judged)"
        )
        print(
            "network namespaces, veth interfaces, nftables tables, mounts and criu processes are counted "
            "machine-wide: other servers running meanwhile (a test suite) show there too"
        )
        others = max(before["other jupyter servers"], after["other jupyter servers"])
        machine_wide = [n for n in found if n in MACHINE_WIDE]
        if others and machine_wide:
            print(
                f"other jupyter servers were running ({others}): the growth of {', '.join(machine_wide)} "
                "may be theirs; run the soak alone to be sure"
            )
        print(
            f"verdict: {'leaks found: ' + ', '.join(found) if found else 'no leaks found'}; "
            f"RSS growth {rss_mib:+.1f} MiB ({'meets' if rss_ok else 'misses'} the goal: under {RSS_GOAL_MIB} MiB); "
            f"{args.cycles} cycles in {cycles_s:.0f} s ({cycles_s / max(args.cycles, 1):.2f} s a cycle)"
        )
        result.update(
            before=before,
            after=after,
            difference={k: (after.get(k) or 0) - (before.get(k) or 0) for k in before.keys() | after.keys()},
            leaks=found,
            rss_growth_mib=round(rss_mib, 2),
            rss_goal_mib=RSS_GOAL_MIB,
            cycles_seconds=round(cycles_s, 2),
            passed=not found and rss_ok,
        )
        status = 0 if result["passed"] else 1
    except (Exception, KeyboardInterrupt) as e:
        detail = f"{e.url}: {e.read().decode(errors='replace')}" if isinstance(e, urllib.error.HTTPError) else ""
        print(f"soak failed after {result['completed_cycles']} cycles: {e!r} {detail}", file=sys.stderr, flush=True)
        result.update(error=f"{e!r} {detail}".strip(), passed=False)
        log = getattr(server, "log_path", None)  # tests.servers keeps the server's output there, if it does
        if log is not None and Path(log).exists():
            tail = Path(log).read_text(errors="replace").splitlines()[-40:]
            print(f"last lines of the server's log ({log}):", *tail, sep="\n", file=sys.stderr, flush=True)
        status = 1
    finally:
        if client is not None:
            try:
                close_client(client)
            except Exception:
                pass
        if server is not None:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
        result["wall_seconds"] = round(time.monotonic() - t0, 2)
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wall time {result['wall_seconds']:.0f} s; figures in {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
