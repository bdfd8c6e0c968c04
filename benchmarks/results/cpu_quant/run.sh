#!/usr/bin/env bash
# Quantized experts on the CPU: decode speed (roofline) on the real-shape checkpoint, and quality on the demo model.
# Writes *.json here. Usage: bash benchmarks/results/cpu_quant/run.sh [RS8_DIR]  (default /tmp/rs8; made if absent)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rs8=${1:-/tmp/rs8}
[ -f "$rs8/config.json" ] || moelite realshape "$rs8" --layers 8 --force
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512_bf16|avx512_vnni|avx_vnni)$' \
  | tr '\n' ' ' > "$here/cpu_flags.txt"
for v in q8:8: q4:4: q8d:8:--dense q4d:4:--dense; do
  IFS=: read -r name bits dense <<< "$v"
  [ -f "${rs8}_$name/config.json" ] || moelite quantize "$rs8" "${rs8}_$name" --bits "$bits" $dense --force --json
done
# decode with every expert resident, alternating the checkpoints, two rounds
for round in 1 2; do
  for m in "$rs8" "${rs8}_q8" "${rs8}_q4" "${rs8}_q8d" "${rs8}_q4d"; do
    moelite bench --model "$m" --expert-budget 100% --cache-policy lru --no-prefetch-row --roofline --n-prompts 2 \
      --max-tokens 48 --out "/tmp/cpu_quant_bench" --json | tail -1 > "$here/roofline_$(basename "$m")_r$round.json"
  done
done
# quality on the demo model: WikiText-2 test, against the unquantized model
for bits in 8 4; do
  q=/tmp/demo_q$bits
  [ -f "$q/config.json" ] || moelite quantize moelite/demo_model "$q" --bits "$bits" --force --json
  moelite eval --model "$q" --reference moelite/demo_model --score-tokens 4096 --speed-prompts 0 --json \
    | tail -1 > "$here/quality_demo_int$bits.json"
done
