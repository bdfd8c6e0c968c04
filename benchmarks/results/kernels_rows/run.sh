#!/usr/bin/env bash
# After the GC fix, row-sequential kernels, the specialised 512-bit quantized loop and no readahead: the same runs as
# ../lean_decode/run.sh (roofline of the three real-shape checkpoints, the demo model against commit f284902
# interleaved; about 8 minutes), their results written here.
# Usage: bash benchmarks/results/kernels_rows/run.sh [/tmp/rs8]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/../lean_decode/run.sh" "${1:-/tmp/rs8}" "$here"
