"""In-process interleaved decode speed of CPU expert/dense paths on a real-shape checkpoint, every expert resident.

    python3 benchmarks/kernel_ab.py CHECKPOINT_DIR [--configs fp32-eager,bf16-compiled,native] [--rounds 4]
        [--max-tokens 24] [--threads 2]

Configurations (EngineConfig overrides):
  fp32-eager     float32 slots, one F.linear pair per expert, float32 dense weights (the path before issue 14)
  bf16-compiled  bf16 slots, torch.compile one-call kernel, float32 dense weights (issue 14's first step)
  native         the default now: bf16 slots and bf16 dense weights, moelite's native AVX2 kernels
Engines are loaded once; their generations alternate (order reversed every other round). The last line is JSON:
median decode tok/s per configuration, every run, the slot dtype, kernel and dense dtype, the CPU flags."""
import argparse, json, statistics, sys, time

import torch

import moelite
from moelite.core.cpu_kernels import cpu_flags

CONFIGS = {"fp32-eager": dict(expert_dtype="float32", expert_kernel="eager", dense_dtype="float32"),
           "bf16-compiled": dict(expert_kernel="compiled", dense_dtype="float32"),
           "native": dict()}

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("path")
p.add_argument("--configs", default=",".join(CONFIGS))
p.add_argument("--rounds", type=int, default=4)
p.add_argument("--max-tokens", type=int, default=24)
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
engs = {}
for n in args.configs.split(","):
    t0 = time.time()
    engs[n] = moelite.load(args.path, expert_budget="100%", warm_start=True, num_threads=args.threads, **CONFIGS[n])
    print(n, "load", round(time.time() - t0, 1), "s", file=sys.stderr)
ids = list(range(5, 37))
for e in engs.values():
    e.eos_ids = set()
    e.generate(ids, max_tokens=4, temperature=0)
res = {n: [] for n in engs}
for r in range(args.rounds):
    for n, e in (engs.items() if r % 2 == 0 else reversed(list(engs.items()))):
        res[n].append(e.generate(ids, max_tokens=args.max_tokens, temperature=0).stats["decode_tok_s"])
        print(n, round(res[n][-1], 2), file=sys.stderr)
out = {n: {"median_tok_s": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v],
           **{k: engs[n].stats()[k] for k in ("expert_slot_dtype", "expert_kernel", "dense_dtype")}}
       for n, v in res.items()}
print(json.dumps({"model": args.path, "threads": args.threads, "max_tokens": args.max_tokens,
                  "cpu_flags": list(cpu_flags()), "torch": torch.__version__, "configs": out}))
