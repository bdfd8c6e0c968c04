"""The README's tables from this folder's files: python benchmarks/results/cpu_avx512/table.py"""
import json
import re
import statistics
from pathlib import Path

here = Path(__file__).parent
before = here.parent / "cpu_quant"


def roof(f):
    try:
        return json.loads(f.read_text())["summary"]["roofline"]
    except (OSError, ValueError, KeyError):
        return None


def fmt(runs, key="decode_tok_s", spec=".1f"):
    return ", ".join(format(r[key], spec) for r in runs) or "-"


print("| checkpoint | MB read per token | before: AVX2 kernels, commit 0d2478c (tok/s) | AVX-512 build (tok/s) "
      "| share of the bound | AVX2 build (tok/s) | share of the bound |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, what in (("rs8", "bf16 experts and dense"), ("rs8_q8d", "int8 experts and dense (`--dense`)"),
                   ("rs8_q4d", "int4 experts and dense (`--dense`)")):
    old = [r for r in (roof(f) for f in sorted(before.glob(f"roofline_{name}_r*.json"))) if r]
    new = {b: [r for r in (roof(f) for f in sorted(here.glob(f"roofline_{name}_{b}_r*.json"))) if r]
           for b in ("avx512", "avx2")}
    mb = (new["avx512"] or new["avx2"] or old)[0]["bytes_per_token"] / 1e6
    print(f"| {what} | {mb:.0f} | {fmt(old)} | {fmt(new['avx512'])} | {fmt(new['avx512'], 'roofline_ratio', '.0%')} "
          f"| {fmt(new['avx2'])} | {fmt(new['avx2'], 'roofline_ratio', '.0%')} |")
print("\nRead bandwidth measured in each run (GB/s, 1 and 2 threads):")
for f in sorted(here.glob("roofline_*.json")):
    r = roof(f)
    if r:
        print(f"- {f.stem}: {r['read_gbps_by_threads']}")

print("\n| budget | compute threads | decode tok/s (round 1, round 2) | decode hit rate |")
print("|---|---:|---:|---:|")
for budget in ("25", "100"):
    for t in (1, 2):
        runs = []
        for f in sorted(here.glob(f"threads_{budget}pct_t{t}_r*.json")):
            try:
                s = json.loads(f.read_text())["summary"][f"{budget}%"]
                runs.append((s["best_decode_tok_s"], s.get("best_online_hit_rate")))
            except (OSError, ValueError, KeyError):
                pass
        if runs:
            print(f"| {budget}% | {t} | {', '.join(f'{a:.2f}' for a, _ in runs)} | "
                  f"{', '.join(f'{b:.1%}' for _, b in runs if b is not None)} |")

demo = here / "demo_speed.txt"
if demo.exists():
    got = {}
    for line in demo.read_text().splitlines():
        m = re.match(r"(\S+) \S+ \{'expert_budget': '(\S+)'\} \[(.*)\]", line)
        if m:
            got.setdefault((m.group(1), m.group(2)), []).extend(float(x) for x in m.group(3).split(","))
    print("\n| demo model, budget | commit f284902 (median tok/s, n) | this checkout (median tok/s, n) | ratio |")
    print("|---|---:|---:|---:|")
    for budget in ("25%", "100%"):
        a, b = got.get(("moelite-f284902", budget), []), got.get(("main", budget), [])
        if a and b:
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {budget} | {ma:.1f} ({len(a)}) | {mb:.1f} ({len(b)}) | {mb / ma:.2f}x |")
