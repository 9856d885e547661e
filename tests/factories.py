"""Builders shared by the tests: a training config on a tiny preset, and reading what a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from datalever.optim import OptimConfig
from datalever.rundir import TrainDir
from datalever.train import TrainConfig


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
