#!/usr/bin/env python3
"""make mutation: mutmut over the modules that hold the logic (pyproject.toml's
[tool.mutmut]), then the score per module and the surviving mutants.

A mutant is killed when a test fails (or times out) with it in place; the score
is killed / (all mutants mutmut ran, survivors and mutants no test reaches
included). Exits 1 when a module scores under --min-score. The survivors'
names go to test-artifacts/mutation-survivors.txt (`mutmut show NAME` prints
the change)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def results() -> tuple[dict[str, Counter], list[str]]:
    """Each module's mutants by status, and the names of the survivors."""
    from mutmut.stats import status_by_exit_code

    by_module: dict[str, Counter] = {}
    survivors: list[str] = []
    for meta in sorted((ROOT / "mutants" / "jupyter_ckpt").glob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        statuses = {name: status_by_exit_code[code] if code is not None else "not run" for name, code in codes.items()}
        by_module[meta.name.removesuffix(".py.meta")] = Counter(statuses.values())
        survivors += [name for name, status in statuses.items() if status == "survived"]
    return by_module, survivors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--report-only", action="store_true", help="report the last run's results")
    parser.add_argument("--min-score", type=float, default=80.0)
    args = parser.parse_args()
    if not args.report_only:
        mutmut = Path(sys.executable).with_name("mutmut")
        run = subprocess.run([str(mutmut), "run", "--max-children", str(os.cpu_count() or 1)], cwd=ROOT)
        if run.returncode not in (0, 1):
            return run.returncode
    by_module, survivors = results()
    if not by_module:
        print("no mutation results: run `make mutation`", file=sys.stderr)
        return 1
    print(f"{'module':16} {'mutants':>7} {'killed':>7} {'survived':>8} {'no tests':>8} {'not run':>7} {'score':>6}")
    failing = []
    for module, counts in by_module.items():
        ran = sum(v for k, v in counts.items() if k not in ("not run", "skipped"))
        killed = sum(counts[k] for k in KILLED)
        score = 100.0 * killed / ran if ran else 0.0
        print(
            f"{module:16} {ran + counts['not run']:>7} {killed:>7} {counts['survived']:>8} "
            f"{counts['no tests']:>8} {counts['not run']:>7} {score:>5.1f}%"
        )
        if score < args.min_score or counts["not run"]:
            failing.append(module)
    out = ROOT / "test-artifacts" / "mutation-survivors.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(f"{name}\n" for name in sorted(survivors)))
    print(f"survivors: {out.relative_to(ROOT)} ({len(survivors)})")
    if failing:
        print(f"under {args.min_score:g}% (or not all run): {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
