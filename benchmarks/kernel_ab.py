"""Usage: python3 benchmarks/kernel_ab.py CHECKPOINT_DIR (a `moelite realshape` folder).

In-process interleaved decode speed on a real-shape checkpoint: old default (fp32 slots, eager per expert) vs new
default (checkpoint-dtype slots, compiled one-call kernel)."""
import json, statistics, sys, time, torch, moelite
path = sys.argv[1]
torch.set_num_threads(2)
cfgs = {"fp32 eager (old default)": dict(expert_dtype="float32", expert_kernel="eager"),
        "bf16 compiled (new default)": dict()}
engs = {}
for n, c in cfgs.items():
    t0 = time.time(); engs[n] = moelite.load(path, expert_budget="100%", warm_start=True, **c); print(n, "load", round(time.time()-t0,1), "s", file=sys.stderr)
ids = list(range(5, 37))
for e in engs.values():
    e.generate(ids, max_tokens=4, temperature=0)
res = {n: [] for n in engs}
for r in range(4):
    for n, e in (engs.items() if r % 2 == 0 else reversed(list(engs.items()))):
        g = e.generate(ids, max_tokens=24, temperature=0)
        res[n].append(g.stats["decode_tok_s"])
out = {n: {"median_tok_s": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v],
           "slot_dtype": engs[n].stats()["expert_slot_dtype"], "kernel": engs[n].stats()["expert_kernel"]} for n, v in res.items()}
print(json.dumps(out))
