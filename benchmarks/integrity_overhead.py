"""Expert checksum verification: its cost on the real-shape cache benchmark (issue 18: at most 3% of decode speed).

Each run is one configuration of `bash benchmarks/cache_realshape.sh` (real-shape checkpoint, 8 layers, 64 experts
top-8, routing replayed from the demo-model trace, 4 GiB memory cgroup, a fresh worker process from a dropped page
cache: `moelite.eval.bench.run_worker`), with verify_checksums on and off, alternated over several rounds so that a
load change on the machine hits both alike. Before the rounds it times the first load, which records the checksums
(every routed expert read once), and a second load, which reuses them. Writes results.json beside this script's
results folder and prints one JSON line.

`--compare read-chunk` instead compares the reader's chunked reads (expert_store.READ_CHUNK, 256 KiB) with one read
per contiguous range (the reader before this change), verification off in both, in the same alternated rounds.

    python3 benchmarks/integrity_overhead.py [--model /tmp/moelite-rs] [--rounds 8] [--max-tokens 32]
        [--expert-dtype float32|auto] [--compare verify|read-chunk]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import subprocess
import sys

from moelite.config import parse_budget
from moelite.eval.bench import MemoryCap, hardware, run_worker

ROOT = Path(__file__).resolve().parent
TRACE = ROOT / "results" / "cache" / "demo_trace.npz"
#: a bench worker whose reader reads READ_CHUNK bytes at a time (argv[1]); argv[2] is the worker's spec
CHUNK_WORKER = ("import sys, json; import moelite.core.expert_store as es; es.READ_CHUNK = int(sys.argv[1]); "
                "from moelite.eval import bench; print(json.dumps(bench.worker(json.loads(sys.argv[2]))))")


def chunk_worker(spec: dict, chunk: int, cap: MemoryCap) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHUNK_WORKER, str(chunk), json.dumps(spec)], capture_output=True,
                          text=True, preexec_fn=cap.preexec(), timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else {"survived": False, "error": proc.stderr[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/moelite-rs", help="real-shape checkpoint (moelite realshape DIR --layers 8)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="score,lru")
    ap.add_argument("--expert-dtype", default="float32", help="float32 as cache_realshape.sh; auto = bf16 slots")
    ap.add_argument("--cgroup-mem", default="4GiB")
    ap.add_argument("--out", default=str(ROOT / "results" / "integrity"))
    ap.add_argument("--compare", choices=("verify", "read-chunk"), default="verify")
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="moelite-integrity-bench-")  # a manifest of our own, not the user's
    os.environ["MOELITE_CACHE_DIR"] = cache
    common = {"model": str(Path(args.model).resolve()), "prompts": None, "n_prompts": args.n_prompts,
              "max_tokens": args.max_tokens, "prompt_tokens": 4, "replay": str(TRACE)}
    engine = {"expert_budget": args.budget, "expert_dtype": args.expert_dtype, "io_threads": 4}
    cap = MemoryCap(int(parse_budget(args.cgroup_mem)[1]))
    rows = []
    try:
        for label in ("first load (records the checksums)", "second load (reuses them)") if args.compare == "verify" \
                else ():
            t0 = time.perf_counter()
            r = run_worker(dict(common, n_prompts=1, max_tokens=2, engine=dict(engine, cache_policy="lru")), cap, 1800)
            rows.append({"kind": label, "load_s": r.get("load_s"), "wall_s": time.perf_counter() - t0,
                         "survived": r.get("survived"), "error": r.get("error")})
            print(json.dumps(rows[-1]), flush=True)
        for rnd in range(args.rounds):
            for policy in args.policies.split(","):
                for verify in ((True, False) if rnd % 2 == 0 else (False, True)):
                    if args.compare == "verify":
                        spec = dict(common, engine=dict(engine, cache_policy=policy, verify_checksums=verify))
                        r = run_worker(spec, cap, 1800)
                    else:  # "verify" True stands for the chunked reads here, False for one read per range
                        spec = dict(common, engine=dict(engine, cache_policy=policy, verify_checksums=False))
                        r = chunk_worker(spec, 256 << 10 if verify else 1 << 40, cap)
                    r.update(kind="decode", round=rnd, policy=policy, verify=verify)
                    rows.append(r)
                    print(json.dumps({k: r.get(k) for k in ("round", "policy", "verify", "decode_tok_s",
                                                             "decode_exact_hit_rate", "expert_bytes_read",
                                                             "checksum_seconds", "io_seconds", "stall_seconds",
                                                             "survived", "error")}), flush=True)
    finally:
        cap.close()
    summary = {}
    for policy in args.policies.split(","):
        on = [r["decode_tok_s"] for r in rows if r.get("policy") == policy and r.get("verify") and r.get("survived")]
        off = [r["decode_tok_s"] for r in rows if r.get("policy") == policy and r.get("verify") is False
               and r.get("survived")]
        ck = [r["checksum_seconds"] for r in rows if r.get("policy") == policy and r.get("verify") and r.get("survived")]
        pairs = [(a["decode_tok_s"], b["decode_tok_s"]) for a in rows for b in rows
                 if a.get("policy") == b.get("policy") == policy and a.get("round") == b.get("round")
                 and a.get("verify") is True and b.get("verify") is False and a.get("survived") and b.get("survived")]
        if on and off:
            summary[policy] = {"tok_s_on_median": statistics.median(on), "tok_s_off_median": statistics.median(off),
                               "change_of_medians": statistics.median(on) / statistics.median(off) - 1,
                               # each round's two runs are adjacent in time: their ratio cancels slow load changes
                               "paired_change_median": statistics.median(a / b - 1 for a, b in pairs),
                               "paired_changes": [a / b - 1 for a, b in pairs],
                               "tok_s_on": on, "tok_s_off": off, "checksum_seconds_per_run": ck}
    result = {"hardware": hardware("cpu"), "date": time.strftime("%Y-%m-%d %H:%M"), "cap": cap.note,
              "model": Path(args.model).name, "args": vars(args), "rows": rows, "summary": summary}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"results_{args.expert_dtype}.json" if args.compare == "verify" else f"read_chunk_{args.expert_dtype}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": {p: {k: v for k, v in s.items() if not isinstance(v, list)}
                                  for p, s in summary.items()}, "out": str(out)}))


if __name__ == "__main__":
    main()
