#!/usr/bin/env bash
# The measurements that need a GPU, in one short run (a few minutes on one GPU): the loss engine
# against the S2L-style loop and the ceiling where batching pays (issue #2's 10x goal), in float32
# and bf16. Run from the repository root with the project installed:
#   bash benchmarks/device_check.sh [OUT_DIR]
set -euo pipefail
out="${1:-${OUT:-runs/device_check}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
for dtype in float32 bfloat16; do
  python benchmarks/loss_engine.py --device cuda --dtype "$dtype" --n 2048 --s2l-n 256 --rounds 3 \
    2>&1 | grep -v "Loading weights\|Writing model" | tee "$out/loss_engine_$dtype.md"
done
