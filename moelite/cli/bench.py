"""`moelite bench`: decode speed and hit rate over expert budgets x cache policies, with baselines (moelite.eval.bench).

Contract: `add_arguments(p)` declares the flags: the engine flags as everywhere, except that --expert-budget and
--cache-policy take comma lists (one configuration each; every item checked at parse time). `run(args) -> int`
checks every configuration before any worker starts, runs them (a progress bar on stderr unless --json), prints the
table and ends with one JSON line (summary, hardware, cap, results file). `--summarize RESULTS_JSON` only re-reads an
earlier run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelite.cli.flags import (add_engine_flags, add_json_flag, add_model_flag, as_flag_error, engine_fields,
                               positive_float, positive_int)

NAME = "bench"
HELP = "benchmark expert budgets x cache policies (and baselines) in one run"


def add_arguments(p) -> None:
    add_model_flag(p)
    p.add_argument("--prefetch-row", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the best policy with prefetch at each budget")
    p.add_argument("--upper-bound", action=argparse.BooleanOptionalAction, default=True,
                   help="also run all experts resident (uncapped, warm) as the upper bound")
    p.add_argument("--roofline", action="store_true",
                   help="with the upper bound: measure this machine's read bandwidth (best of 1 and 2 threads over "
                        "1 GiB) and report the decode bound (weight bytes a token reads, in the checkpoint's dtype, "
                        "over it), the measured speed and their ratio")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file, one per line or JSON lines (default: the built-in three-domain prompts)")
    p.add_argument("--n-prompts", type=positive_int, default=6, help="prompts of the set to run")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens to generate per prompt")
    p.add_argument("--prompt-tokens", type=positive_int, default=None,
                   help="truncate prompts to this many tokens (default: whole prompts)")
    p.add_argument("--replay", default=None, metavar="NPZ",
                   help="routing trace to replay, for real-shape checkpoints (default: the model's own routing)")
    p.add_argument("--cgroup-mem", default=None, metavar="SIZE",
                   help="run every configuration inside a memory cgroup of this size (default: no cap)")
    p.add_argument("--timeout", type=positive_float, default=1800.0, help="seconds per configuration")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="folder for results.json and the plots")
    p.add_argument("--summarize", default=None, metavar="RESULTS_JSON",
                   help="only re-summarise an earlier run's results.json (no configurations are run)")
    add_json_flag(p)
    add_engine_flags(p, lists={"expert_budget": "10%,25%,50%", "cache_policy": "lru,lfu,score"})


def run(args) -> int:
    if args.summarize:
        from moelite.eval.bench import summarize

        result = summarize(args.summarize, echo=not args.json)
        where = Path(args.summarize)
    else:
        from moelite.eval.bench import BenchPlan, run_bench

        if args.roofline and not args.upper_bound:
            raise ValueError("--roofline: needs the all-resident row; drop --no-upper-bound")
        engine = engine_fields(args)
        del engine["expert_budget"], engine["cache_policy"]
        plan = BenchPlan(model=args.model, out=args.out, budgets=args.expert_budget, policies=args.cache_policy,
                         engine=engine, prompts=args.prompts, n_prompts=args.n_prompts, max_tokens=args.max_tokens,
                         prompt_tokens=args.prompt_tokens, replay=args.replay, prefetch_row=args.prefetch_row,
                         upper_bound=args.upper_bound, roofline=args.roofline, cgroup_mem=args.cgroup_mem,
                         timeout=args.timeout,
                         command="moelite bench " + " ".join(sys.argv[2:]))
        try:
            plan.validate()  # every configuration, before the first worker starts
        except ValueError as exc:
            raise as_flag_error(exc) from None
        result = run_bench(plan, progress=not args.json, echo=not args.json)
        where = Path(args.out) / "results.json"
    print(json.dumps({"summary": result["summary"], "hardware": result["hardware"], "cap": result["cap"],
                      "out": str(where)}))
    return 0
