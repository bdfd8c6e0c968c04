#!/usr/bin/env bash
# O_DIRECT reads, the CPU hybrid fix, small experts read inline and the "auto" default budget: cold read latency of
# one expert (page cache vs O_DIRECT) on the real-shape checkpoint, and the demo model against commit f284902
# interleaved at 25%, 100% and each checkout's default budget (f284902: 25%; now: auto). About 6 minutes.
# Usage: bash benchmarks/results/odirect/run.sh [/tmp/moelite-h2h/rs-qwen3-64e]
#   (the checkpoint that benchmarks/head_to_head.py writes; the f284902 checkout at /tmp/moelite-f284902:
#    git worktree add /tmp/moelite-f284902 f284902). Needs root for cold reads (drop_caches).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
here=$(cd "$(dirname "$0")" && pwd)
ck=${1:-/tmp/moelite-h2h/rs-qwen3-64e}
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx_vnni)$' \
  | tr '\n' ' ' > "$here/cpu_flags.txt"
git -C "$repo" rev-parse --short HEAD > "$here/commit.txt"
python3 "$repo/benchmarks/read_latency.py" "$ck" --experts 40 --rounds 3 > "$here/read_latency.txt"
: > "$here/demo_speed.txt"
for round in 1 2 3; do
  for c in /tmp/moelite-f284902 "$repo"; do
    for kw in "dict(expert_budget='25%')" "dict(expert_budget='100%')" "dict()"; do
      PYTHONPATH="$c" python3 "$repo/benchmarks/demo_speed.py" "$kw" 2>/dev/null \
        | sed "s|^|$(basename "$c") |" >> "$here/demo_speed.txt"
    done
  done
done
