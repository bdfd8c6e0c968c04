#!/usr/bin/env bash
# Lean decode + the 512-bit quantized kernel: roofline (every expert resident, batch 1) of the three real-shape
# checkpoints, and the demo model against commit f284902 interleaved. About 8 minutes.
# Usage: bash benchmarks/results/lean_decode/run.sh [/tmp/rs8 [OUT]]   (results into OUT, default this folder;
# checkpoints as in benchmarks/results/cpu_avx512/run.sh;
# the f284902 checkout at /tmp/moelite-f284902: git worktree add /tmp/moelite-f284902 f284902)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
rs8=${1:-/tmp/rs8}
here=$(cd "${2:-$(dirname "$0")}" && pwd)
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx_vnni)$' \
  | tr '\n' ' ' > "$here/cpu_flags.txt"
git -C "$repo" rev-parse --short HEAD > "$here/commit.txt"
bench() { moelite bench --cache-policy lru --no-prefetch-row --n-prompts 2 --out /tmp/lean_decode_bench --json "$@" | tail -1; }
for m in "$rs8" "${rs8}_q8d" "${rs8}_q4d"; do
  bench --model "$m" --expert-budget 100% --roofline --max-tokens 48 > "$here/roofline_$(basename "$m").json"
done
: > "$here/demo_speed.txt"
for round in 1 2 3; do
  for c in /tmp/moelite-f284902 "$repo"; do
    for budget in 25% 100%; do
      PYTHONPATH="$c" python3 "$repo/benchmarks/demo_speed.py" "dict(expert_budget='$budget')" 2>/dev/null \
        | sed "s|^|$(basename "$c") |" >> "$here/demo_speed.txt"
    done
  done
done
