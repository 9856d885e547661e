"""Builders shared by the tests: data, a training config on a tiny preset, reading what a run wrote, hand-made arm
results for the report, and the loss engine's brute-force reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from datalever import synth
from datalever.optim import OptimConfig
from datalever.rundir import TrainDir
from datalever.tokens import IGNORE, encode_example
from datalever.train import TrainConfig


def synth_splits(tmp_path_factory, n_train: int = 64, n_val: int = 16, n_test: int = 16) -> dict[str, str]:
    """The embedded generator's train/validation/test files (seed 0) in a fresh directory."""
    return synth.write_splits(str(tmp_path_factory.mktemp("data")), n_train=n_train, n_val=n_val, n_test=n_test, seed=0)


def train_config(files: dict, out, **kw) -> TrainConfig:
    """A seconds-long run of the tiny preset on `files` (synth.write_splits): 8 steps of 8 examples, AdamW 3e-3, no
    warmup, validated on the validation split; `kw` overrides any option."""
    base = dict(
        model="preset:tiny",
        data=files["train"],
        val_data=files["validation"],
        out=str(out),
        max_steps=8,
        batch_size=8,
        micro_batch_size=4,
        warmup_ratio=0.0,
        optim=OptimConfig(name="adamw", lr=3e-3),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in TrainDir(out).log.read_text().splitlines()]


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_weights(a_dir, b_dir) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def brute_force_loss(model, tokenizer, ex, max_length: int) -> float:
    """The loss engine's reference (S2L's way): one example alone, batch size 1, no padding, the model's own
    `labels=` mean loss over the response."""
    enc = encode_example(tokenizer, ex, max_length)
    ids = torch.tensor([enc.input_ids])
    labels = ids.clone()
    labels[0, : max(enc.n_prompt, 1)] = IGNORE
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def comparable_results(run_dir) -> dict:
    """An experiment's results.json without what differs between two runs of the same work: clocks, versions, where
    the plots are, and the markdown (its table has a wall-clock column; every number it shows is in the rest)."""
    from datalever.rundir import RunDir

    def strip(value):
        if isinstance(value, dict):
            return {
                k: strip(v) for k, v in value.items() if "wall" not in k and k not in ("versions", "plots", "markdown")
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(RunDir(run_dir).results_json.read_text()))


def write_arm_results(run_dir, arm: str, seed: int, metrics: dict, benchmark: str = "test"):
    """Hand-made results of one arm and seed, as the report reads them: the evaluation's metrics on `benchmark`, a
    training summary with unit compute and a one-step log. Returns the arm and seed's ArmDir."""
    from datalever import rundir
    from datalever.rundir import RunDir

    d = RunDir(run_dir).seed_dir(arm, seed)
    rundir.write_json(d.eval_on(benchmark).metrics, metrics)
    compute = {k: 1 for k in ("optimizer_steps", "forwards", "backwards", "tokens", "flops", "wall_s")}
    rundir.write_json(d.train.summary, {"compute": compute, "final_val_loss": 1.0})
    d.train.log.write_text('{"step": 1, "loss": 1.0}\n')
    return d
