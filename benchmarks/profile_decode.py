"""Where decode time goes: cProfile of greedy decoding (top functions by own and cumulative time) and a
torch.profiler table of operators, for any model, budget and device.

  python benchmarks/profile_decode.py --model moelite/demo_model --expert-budget 100% --tokens 32
  python benchmarks/profile_decode.py --model /tmp/rs --replay /tmp/trace.npz --device cuda --expert-budget 100%
Prints the tables, then one JSON line (tpot_ms, the ten most expensive functions).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moelite.eval.bench import hardware  # noqa: E402
from moelite.config import EngineConfig  # noqa: E402
from moelite.engine import Engine  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "moelite" / "demo_model"))
    p.add_argument("--expert-budget", default="100%")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replay", default=None, help="routing trace (.npz) to replay (real-shape checkpoints)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--substitution-alpha", type=float, default=0.0)
    p.add_argument("--cache-policy", default="lru")
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    cfg = EngineConfig(expert_budget=args.expert_budget, device=args.device, num_threads=args.num_threads,
                       warm_start=args.expert_budget == "100%", cache_policy=args.cache_policy,
                       prefetch=args.prefetch, substitution_alpha=args.substitution_alpha).validate()
    eng = Engine(args.model, cfg, progress=False)
    if args.replay:
        from moelite.core.traces import Trace, TraceReplay

        eng.manager.set_replay(TraceReplay(Trace.load(args.replay), eng.layout.layers, decode_only=True))
    eng.eos_ids = set()
    prompt = [3 + (7 * j) % 200 for j in range(16)]
    eng.generate(prompt, max_tokens=8, temperature=0)  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    g = eng.generate(prompt, max_tokens=args.tokens, temperature=0)
    prof.disable()
    wall = time.perf_counter() - t0
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print(s.getvalue())
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if args.device.startswith("cuda") else [])
    with torch.profiler.profile(activities=acts) as tp:
        eng.generate(prompt, max_tokens=8, temperature=0)
    sort = "cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(tp.key_averages().table(sort_by=sort, row_limit=args.top))
    st = pstats.Stats(prof)
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]  # by own time
    print(json.dumps({"hardware": hardware(args.device), "tpot_ms": round(1000 / g.stats["decode_tok_s"], 3) if g.stats.get("decode_tok_s") else None,
                      "wall_s": round(wall, 3), "tokens": args.tokens,
                      "top_own_time": [{"fn": f"{Path(k[0]).name}:{k[1]}:{k[2]}", "s": round(v[2], 4),
                                        "calls": v[1]} for k, v in top]}))
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
