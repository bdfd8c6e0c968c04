"""Interleaved before/after run of `moelite bench` from two checkouts of moelite (a refactor must not slow decode).

    python3 benchmarks/ab_bench.py --before /tmp/base --after . --rounds 5 \
        --before-args "--budgets 25% --policies lru --no-prefetch --no-upper-bound --n-prompts 4" \
        --after-args  "--expert-budget 25% --cache-policy lru --no-prefetch --no-upper-bound --n-prompts 4" \
        --out benchmarks/results/redesign/ab_bench.json

Each round runs the before checkout's bench, then the after one's (alternating which goes first), with PYTHONPATH
set to that checkout so each side runs its own code; flags are given per side because their names may differ.
The figure compared is the bench summary's `best_decode_tok_s` at the one budget asked for; the last line is JSON
with every round's value, the medians and their ratio (after / before), the commits and the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    except OSError:
        pass
    return "unknown"


def commit(path: Path) -> str:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def one(checkout: Path, args: str, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
    cmd = [sys.executable, "-m", "moelite.cli", "bench", *shlex.split(args), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"bench failed in {checkout}: {r.stderr[-2000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])["summary"]
    budgets = [k for k, v in summary.items() if isinstance(v, dict) and "best_decode_tok_s" in v]
    if len(budgets) != 1:
        raise SystemExit(f"give exactly one budget per side (found {budgets})")
    return float(summary[budgets[0]]["best_decode_tok_s"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", required=True, help="checkout of the code before the change")
    p.add_argument("--after", default=".", help="checkout of the code after the change")
    p.add_argument("--before-args", required=True, help="`moelite bench` arguments for the before checkout")
    p.add_argument("--after-args", required=True, help="`moelite bench` arguments for the after checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    a = p.parse_args()
    sides = {"before": (Path(a.before), a.before_args), "after": (Path(a.after), a.after_args)}
    runs: dict[str, list[float]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                path, args = sides[side]
                runs[side].append(one(path, args, Path(tmp) / f"{side}{r}"))
            print(f"round {r + 1}/{a.rounds}: before {runs['before'][-1]:.2f} tok/s, after {runs['after'][-1]:.2f} "
                  "tok/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {"date": time.strftime("%Y-%m-%d"), "before_commit": commit(Path(a.before)),
           "after_commit": commit(Path(a.after)), "cpu_flags": cpu_flags(), "threads": os.cpu_count(),
           "before_args": a.before_args, "after_args": a.after_args, "decode_tok_s": runs, "median": med,
           "ratio_after_over_before": med["after"] / med["before"]}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
