#!/usr/bin/env bash
# The measurements that need a GPU (scoring, training and generation at the paper's scale), in one run
# of under 8 minutes on one H200. Every table goes into one markdown file, $out/device_check.md; each
# benchmark's own output is kept beside it. Run from the repository root with the project installed:
#   bash benchmarks/device_check.sh [OUT_DIR]
# A benchmark that fails or runs past its share of the time is reported as such and the others still run.
set -uo pipefail
out="${1:-${OUT:-runs/device_check}}"
mkdir -p "$out"
report="$out/device_check.md"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

run() {  # run NAME SECONDS COMMAND...: the command's markdown into $out/NAME.md and the report
  local name=$1 limit=$2
  shift 2
  echo "## $name" >>"$report"
  if timeout "$limit" "$@" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$out/$name.md"; then
    cat "$out/$name.md" >>"$report"
  else
    { cat "$out/$name.md"; echo; echo "**$name failed or ran past ${limit} s**"; } >>"$report"
  fi
  echo >>"$report"
}

{
  echo "# Device check"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  echo
} >"$report"

# Scoring: the loss engine against the S2L-style loop and the plain-forward ceiling (goal: >= 0.85x the ceiling).
for dtype in float32 bfloat16; do
  run "loss_engine_$dtype" 90 python benchmarks/loss_engine.py --device cuda --dtype "$dtype" --n 2048 \
    --s2l-n 256 --rounds 3
done
# Training: qwen3-0.6b shape, sequence 512: tokens/s, MFU, run/bare, SAM/AdamW, Muon/AdamW, LoRA.
run train_step 180 python benchmarks/train_step.py --device cuda --dtype bf16 --json "$out/train_step.json"
# Generation: qwen3-0.6b shape, GSM8K-length prompts, 256 new tokens: tokens/s against the bandwidth bound
# (512 prompts rather than GSM8K's 1,319 test problems, to fit the time; the rate is per batch of 64).
run generate 180 python benchmarks/generate.py --device cuda --preset qwen3-0.6b --n 512 --batch_size 64 --rounds 1
echo "report: $report"
