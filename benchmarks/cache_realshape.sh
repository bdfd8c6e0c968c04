#!/usr/bin/env bash
# Expert-cache benchmark on a real-shape checkpoint (Qwen3-30B-A3B expert shapes, 64 experts, top-8, 8 layers:
# 4.5 GiB of routed experts) whose routing replays a trace of the trained demo model, every configuration inside
# a 4 GiB memory cgroup (smaller than the 4.8 GB checkpoint; needs root for cgroups, otherwise it runs uncapped
# and says so). Results: benchmarks/results/cache/{results.json,hit_rate.png,decode.png} and a JSON last line.
#   bash benchmarks/cache_realshape.sh [WORKDIR]      (WORKDIR holds the 4.8 GB checkpoint; default /tmp/moelite-rs)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/moelite-rs}
OUT=benchmarks/results/cache
mkdir -p "$OUT"
# 1. routing of the trained demo model over the built-in three-domain prompts, twice (sampled, seeded)
[ -f "$OUT/demo_trace.npz" ] || moelite trace --out "$OUT/demo_trace.npz" --max-tokens 64 --repeat 2 --expert-budget 100%
# 2. the real-shape checkpoint (random weights), with the demo tokenizer
[ -f "$WORK/config.json" ] || moelite realshape "$WORK" --layers 8 --tokenizer-from moelite/demo_model
# 3. budgets x policies + baselines, each in a fresh process under the memory cap
moelite bench --model "$WORK" --replay "$OUT/demo_trace.npz" --expert-budget 12.5%,25% --cache-policy lru,score \
  --n-prompts 2 --max-tokens 16 --prompt-tokens 4 --no-upper-bound --expert-dtype float32 --io-threads 4 --cgroup-mem 4GiB --out "$OUT"
