#!/usr/bin/env bash
# The one prepared benchmark run for a lent GPU (one call, under 8 minutes on an H100):
#   bash bench/gpu.sh                       # GPU: Qwen2.5-1.5B-shape SFT at 4096 tokens (bf16, MFU, planned vs
#                                           # peak bytes), decode B=1/8/64 on 0.5B and 1.5B shapes, GRPO on 0.5B
#   XR_BENCH_SIZE=tiny bash bench/gpu.sh    # the same suite at the tests' tiny size (CPU, CI)
# Random weights only, nothing downloaded; imports jax, flax, optax, numpy, torch, transformers (no grain,
# no datasets). Writes $OUT/bench.json (a temp dir when OUT is unset) and prints the table last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t xr_bench_XXXX)}"
export OUT
"${PYTHON:-python3}" -m bench ${XR_BENCH_SIZE:+--size "$XR_BENCH_SIZE"} --out "$OUT" --reps "${XR_BENCH_REPS:-3}"
