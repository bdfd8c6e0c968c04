#!/usr/bin/env bash
# The AVX-512 kernels (bf16 dot products, VNNI) and fused q/k/v: decode roofline on the real-shape checkpoint for the
# AVX-512 and the AVX2 build (MOELITE_NATIVE=avx2), bf16 / int8 --dense / int4 --dense, two alternating rounds;
# 1 against 2 compute threads with expert reads running (25% budget) and without (100%); the demo model against
# the engine the CPU-speed issue started from (commit f284902), interleaved. Writes *.json / *.txt here.
# Usage: bash benchmarks/results/cpu_avx512/run.sh [RS8_DIR]   (default /tmp/rs8; made if absent)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
rs8=${1:-/tmp/rs8}
[ -f "$rs8/config.json" ] || moelite realshape "$rs8" --layers 8 --force
for v in q8d:8 q4d:4; do
  IFS=: read -r name bits <<< "$v"
  [ -f "${rs8}_$name/config.json" ] || moelite quantize "$rs8" "${rs8}_$name" --bits "$bits" --dense --force --json
done
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx_vnni)$' \
  | tr '\n' ' ' > "$here/cpu_flags.txt"
git -C "$repo" rev-parse --short HEAD > "$here/commit.txt"
bench() { moelite bench --cache-policy lru --no-prefetch-row --n-prompts 2 --out /tmp/cpu_avx512_bench --json "$@" | tail -1; }
for round in 1 2; do
  for m in "$rs8" "${rs8}_q8d" "${rs8}_q4d"; do
    for build in avx512 avx2; do
      MOELITE_NATIVE=$build bench --model "$m" --expert-budget 100% --roofline --max-tokens 48 \
        > "$here/roofline_$(basename "$m")_${build}_r$round.json"
    done
  done
done
# threads: the default is torch's (2 here) for models with hidden size > 1024
for round in 1 2; do
  for budget in 25% 100%; do
    for t in 1 2; do
      bench --model "$rs8" --expert-budget "$budget" --cache-policy score --no-upper-bound --num-threads "$t" \
        --max-tokens 32 > "$here/threads_${budget%\%}pct_t${t}_r$round.json"
    done
  done
done
# demo model: the engine of commit f284902 (before this issue's work) against this checkout, interleaved
base=/tmp/moelite-f284902
[ -d "$base" ] || git -C "$repo" worktree add -f "$base" f284902
: > "$here/demo_speed.txt"
for round in 1 2 3; do
  for budget in 25% 100%; do
    for c in "$base" "$repo"; do
      PYTHONPATH="$c" python3 "$repo/benchmarks/demo_speed.py" "dict(expert_budget='$budget')" 2>/dev/null \
        | sed "s|^|$(basename "$c") |" >> "$here/demo_speed.txt"
    done
  done
done
