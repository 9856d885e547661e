#!/bin/bash
# Issue 24: which proxy finds the examples that matter? Every command that made docs/results/proxies/, in order.
# About 4 hours of two cores in all (the runs overlapped: each unit runs with one thread, so the numbers are the
# same whatever else runs beside it).
set -euo pipefail
cd "$(dirname "$0")/../../.."

# 1. Proxies: the demo family at three sizes, pretrained with embedded:demo-base's recipe (its pretrain.json:
#    1500 steps of arithmetic and copy drills, batch 16 x 256 tokens, lr 3e-3, seed 0). Each writes pretrain.json.
for preset in demo-small demo-large; do
  datalever model pretrain --preset $preset --steps 1500 --out runs/proxies/$preset-1500 --threads 1
done

# 2. Every proxy's split at three profile lengths (1/10, 1/3 and 1 epoch), on the embedded study's data and settings:
#    untrained and pretrained at each size, and the oracle (arm:base, the base arm's own fine-tuned model, seed 0).
#    Only the base arm trains (once: it needs no split), so the sweep is about the splits.
datalever experiment --config configs/embedded.yaml --run_dir runs/proxies/sweep --arms '[base]' --seeds '[0]' \
  --sweep '{proxy: ["preset:demo-small", "runs/proxies/demo-small-1500", "preset:demo", "embedded:demo-base", "preset:demo-large", "arm:base"], fraction: [0.1, 0.3333333333333333, 1.0]}' \
  --workers 2
datalever experiment --config configs/embedded.yaml --run_dir runs/proxies/sweep-large --arms '[base]' --seeds '[0]' \
  --sweep '{proxy: ["runs/proxies/demo-large-1500"], fraction: [0.1, 0.3333333333333333, 1.0]}' --workers 2

# All 21 splits in one table and figure (split_comparison.{md,json,png}), demo-base at 1/3 epoch (the study's) first.
runs=(); names=()
for proxy in embedded-demo-base preset-demo-small demo-small-1500 preset-demo preset-demo-large demo-large-1500 arm-base; do
  for fraction in 0.333333 0.1 1; do
    root=runs/proxies/sweep; [ $proxy = demo-large-1500 ] && root=runs/proxies/sweep-large
    label=$fraction; [ $fraction = 0.333333 ] && label=1/3
    runs+=("$root/sweep/proxy=$proxy,fraction=$fraction"); names+=("$proxy@$label")
  done
done
datalever compare-splits --out docs/results/proxies \
  --runs "[$(printf '"%s",' "${runs[@]}" | sed 's/,$//')]" --names "[$(printf '"%s",' "${names[@]}" | sed 's/,$//')]"

# 3. Downstream, at equal optimizer steps, 5 seeds: the oracle's split (arm:base at 1/3 epoch), and the proxy's whose
#    split differs most from demo-base's (see split_comparison.md).
datalever experiment --config configs/embedded.yaml --run_dir runs/proxies/downstream-oracle \
  --profile.proxy arm:base --arms '[base, hard, base-long, random]' --seeds '[0, 1, 2, 3, 4]' --workers 2
datalever experiment --config configs/embedded.yaml --run_dir runs/proxies/downstream-preset-demo \
  --profile.proxy preset:demo --arms '[hard, base-long, random]' --seeds '[0, 1, 2, 3, 4]' --workers 2

# 4. hard-synth's variants re-profiled with the same proxy (demo-base, 1/3 epoch): synth.json.
python docs/results/proxies/synth.py

# 4, second half: hard-synth against a base-long matched to its steps (an extra arm under base-long's name, so the
# report pairs them), 5 seeds; then against the study's hard arm, seed by seed.
datalever experiment --config configs/embedded.yaml --run_dir runs/proxies/downstream-synth \
  --arms '[hard-synth, base-long]' --extra_arms '[{name: base-long, data: base, match_steps_of: hard-synth}]' \
  --seeds '[0, 1, 2, 3, 4]' --workers 2
python docs/results/proxies/synth_vs_hard.py
