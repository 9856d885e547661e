#!/bin/bash
# Issue 22 item 1: the embedded study's base/hard/random arms under each small-source handling, with the prototype's
# rule (sources below the mean source size, or below 78 rows, are small); sources = the problem kinds.
set -e
cd "$(dirname "$0")/../../.."  # the repository root
R=runs/ablation-small  # docs/results/small-sources/ holds the files it wrote (results, splits, per-arm metrics)
mkdir -p $R
.venv/bin/datalever data synth --out $R/data --n_train 2000 --n_val 300 --n_test 500 --seed 0
common=(--config configs/embedded.yaml --train_file $R/data/train.jsonl --val_file $R/data/validation.jsonl
  --test_file $R/data/test.jsonl --fields '{source: kind}' --stratify true --small_source_rule mean
  --min_source_size 78 --seeds '[0, 1, 2]' --workers 2 --progress false --arms '[base, hard, random]')
.venv/bin/datalever experiment "${common[@]}" --run_dir $R/upsample --small_sources upsample > $R/upsample.log 2>&1
for rule in cluster keep; do
  mkdir -p $R/$rule/arms
  cp -al $R/upsample/arms/base $R/$rule/arms/base   # base trains the data as given: the same run in every rule
  .venv/bin/datalever experiment "${common[@]}" --run_dir $R/$rule --small_sources $rule > $R/$rule.log 2>&1
done
echo done
