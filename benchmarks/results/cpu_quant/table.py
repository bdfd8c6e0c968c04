"""The README's table from this folder's JSON files: python benchmarks/results/cpu_quant/table.py > table.md"""
import json
from pathlib import Path

here = Path(__file__).parent
rows = [("rs8", "bf16 experts and dense (the checkpoint's dtype)"), ("rs8_q8", "int8 experts, bf16 dense"),
        ("rs8_q4", "int4 experts, bf16 dense"), ("rs8_q8d", "int8 experts and dense (`--dense`)"),
        ("rs8_q4d", "int4 experts and dense (`--dense`)")]
print("| checkpoint | decode tok/s (round 1, round 2) | MB read per token | share of the read-bandwidth bound |")
print("|---|---:|---:|---:|")
base = None
for name, what in rows:
    runs = [json.loads(f.read_text())["summary"]["roofline"] for f in sorted(here.glob(f"roofline_{name}_r*.json"))]
    if not runs:
        continue
    tok = [r["decode_tok_s"] for r in runs]
    best = max(tok)
    base = base or best
    print(f"| {what} | {', '.join(f'{t:.1f}' for t in tok)} ({best / base:.2f}x) | {runs[0]['bytes_per_token'] / 1e6:.0f} "
          f"| {', '.join(format(r['roofline_ratio'], '.0%') for r in runs)} |")
for bits in (8, 4):
    f = here / f"quality_demo_int{bits}.json"
    if f.exists():
        d = json.loads(f.read_text())
        for name, t in d["rows"][0]["texts"].items():
            print(f"\nDemo model, int{bits} experts, {name} ({t.get('tokens')} tokens): " + json.dumps(
                {k: t[k] for k in t if k in ("perplexity", "perplexity_exact", "perplexity_ratio", "top1_agreement", "mean_kl")}))
