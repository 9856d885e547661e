"""Data commands: generate the embedded dataset, check a dataset file, build a model preset."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datalever import rundir, synth
from datalever.examples import load_examples


@dataclass
class SynthConfig:
    """Generate math word problems in GSM8K format (question; worked answer ending `#### N`)."""

    out: str = "runs/demo/data"
    """Directory for train.jsonl, validation.jsonl and test.jsonl."""
    n_train: int = 2000
    """Training problems."""
    n_val: int = 300
    """Validation problems (for choosing hyperparameters)."""
    n_test: int = 500
    """Test problems (for the final numbers only)."""
    seed: int = 0
    """Generator seed: the same seed gives the same files."""
    mix: tuple[float, float, float] = (0.6, 0.25, 0.15)
    """Shares of easy, medium and hard problems."""


def run_synth(cfg: SynthConfig) -> str:
    paths = synth.write_splits(
        cfg.out, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed, mix=tuple(cfg.mix)
    )
    rundir.write_yaml(Path(cfg.out) / "synth.config.yaml", cfg)
    return "\n".join(f"{split}: {path}" for split, path in paths.items())


@dataclass
class CheckConfig:
    """Load a dataset as training would, and report what was found (or exactly what is wrong)."""

    path: str = "runs/demo/data/train.jsonl"
    """Dataset file or directory (JSONL, JSON, Parquet, CSV, a datasets directory) or hub name."""
    schema: str = "auto"
    """auto | gsm8k | alpaca | prompt_response | datalever."""
    split: str | None = None
    """Split to read from a DatasetDict directory or hub dataset."""


def run_check(cfg: CheckConfig) -> str:
    examples = load_examples(cfg.path, schema=cfg.schema, split=cfg.split)
    sources = Counter(ex.source or "(none)" for ex in examples)
    lines = [
        f"{cfg.path}: {len(examples)} examples",
        "sources: " + ", ".join(f"{k}={v}" for k, v in sources.most_common()),
        f"fingerprint: {rundir.fingerprint(examples)}",
    ]
    if examples:
        ex = examples[0]
        lines += ["first example:", f"  id: {ex.id}", f"  prompt: {ex.prompt!r}", f"  response: {ex.response!r}"]
    return "\n".join(lines)


@dataclass
class ModelBuildConfig:
    """Build a small model from scratch (a real HF architecture) with a locally trained tokenizer."""

    preset: str = "demo"
    """Preset name: tiny, tiny-neox, tiny-qwen3, demo, pythia-70m."""
    out: str = "runs/models/demo"
    """Output HF checkpoint directory."""
    seed: int = 0
    """Initialization seed."""


def run_model_build(cfg: ModelBuildConfig) -> str:
    from datalever.models import build_preset, count_parameters, load_model

    path = build_preset(cfg.preset, cfg.out, seed=cfg.seed)
    return f"{path}: {count_parameters(load_model(str(path))):,} parameters"
