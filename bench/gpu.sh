#!/usr/bin/env bash
# The one prepared benchmark run for a lent GPU (one call, under 8 minutes on one H100/H200):
#   bash bench/gpu.sh                       # GPU: the side-by-side suite (python -m bench: Qwen2.5-1.5B-shape
#                                           # SFT at 4096 tokens, decode B=1/8/64 on 0.5B and 1.5B shapes, GRPO
#                                           # on 0.5B), then bench.gpu_rows (xr_jax only): 7B-shape decode at
#                                           # B=64, prompt 1024 + 256 new; a GRPO rollout from fp32 master weights
#                                           # cast to bf16, 8 prompts x 8; SFT of the 3B recipe at its production
#                                           # tokens per device with the remat `xr-jax plan` picked (attention
#                                           # auto, then the Triton kernel A100s run); the decode's
#                                           # optimised GPU HLO in $OUT/decode_7b.hlo.txt, read by bench.compiled
#   XR_BENCH_SIZE=tiny bash bench/gpu.sh    # the same at the tests' tiny size (CPU, CI)
# Knobs: XR_BENCH_REPS (suite rounds, default 2), XR_BENCH_LAYERS (cut the 7B decode model to N layers),
# XR_BENCH_BUDGET_S (default 450: gpu_rows skips the rows it has no time left for, and says so).
# Random weights only, nothing downloaded or installed; imports jax, flax, optax, numpy, torch, transformers
# (no grain, no datasets). Writes $OUT/bench.json and $OUT/gpu_rows.json (a temp dir when OUT is unset) and
# prints the tables last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t xr_bench_XXXX)}"
export OUT
START=$(date +%s)
"${PYTHON:-python3}" -m bench ${XR_BENCH_SIZE:+--size "$XR_BENCH_SIZE"} --out "$OUT" --reps "${XR_BENCH_REPS:-2}"
"${PYTHON:-python3}" -m bench.gpu_rows ${XR_BENCH_SIZE:+--size "$XR_BENCH_SIZE"} ${XR_BENCH_LAYERS:+--layers "$XR_BENCH_LAYERS"} \
  --out "$OUT" --deadline "$((START + ${XR_BENCH_BUDGET_S:-450}))"
