"""What a run reads: its options checked, the training examples with their multiplicities (a manifest from
`datalever upsample`, else 1 each), the validation examples, and the run's resume identity (the settings that decide
the numbers with fingerprints of what the model and the data hold)."""

from __future__ import annotations

from dataclasses import dataclass

from datalever import checks, provenance, rundir
from datalever.examples import Example, local_data, read_data
from datalever.models import is_preset, model_identity, resolve_model
from datalever.train.config import TrainConfig, resume_identity
from datalever.train.outputs import check_no_overlap


def check_inputs(cfg: TrainConfig) -> None:
    """Before anything is read: the options' values (again: a stage may have set fields after construction), the
    inputs exist, and no output would land on an input."""
    cfg.check()
    if cfg.data is None:
        raise checks.ConfigError("data is required: the training examples to fine-tune on (--data FILE)")
    local_data("data", cfg.data)
    local_data("val_data", cfg.val_data, optional=True)
    checks.existing_path("manifest", cfg.manifest, optional=True)
    if not is_preset(cfg.model):  # a missing local model directory is refused here (a preset is built later)
        resolve_model(cfg.model)
    check_no_overlap(cfg)


def load_training_data(cfg: TrainConfig) -> tuple[list[Example], list[int]]:
    """Examples and their multiplicities (1 each, unless a manifest says otherwise)."""
    on_duplicate = "keep_first" if cfg.manifest else "error"
    examples = read_data(cfg.data, cfg.data_format(), split=cfg.split, default_split="train", on_duplicate=on_duplicate)
    if not cfg.manifest:
        return examples, [1] * len(examples)
    multiplicity = rundir.read_manifest(cfg.manifest)
    missing = [ex.id for ex in examples if ex.id not in multiplicity]
    if missing:
        raise ValueError(f"{cfg.manifest}: {len(missing)} training examples have no multiplicity (first: {missing[0]})")
    return examples, [multiplicity[ex.id] for ex in examples]


def load_validation_data(cfg: TrainConfig) -> list[Example]:
    if not cfg.val_data:
        return []
    return read_data(
        cfg.val_data, cfg.data_format(), split=cfg.val_split, default_split="validation", split_option="--val_split"
    )


@dataclass
class TrainInputs:
    """The data a run trains and validates on, and its identity (settings and input contents)."""

    examples: list[Example]
    multiplicities: list[int]
    val_examples: list[Example]
    identity: str  # `config.resume_identity`: what a checkpoint or a finished run must share to be reused


def load_inputs(cfg: TrainConfig) -> TrainInputs:
    """Read the data and fingerprint the inputs (a local model directory by its files)."""
    model = model_identity(cfg.model)
    examples, multiplicities = load_training_data(cfg)
    val_examples = load_validation_data(cfg)
    fingerprints = {
        "model": model,
        "data": provenance.content_fingerprint(examples),
        "multiplicities": provenance.counts_fingerprint(multiplicities),
        "val_data": provenance.content_fingerprint(val_examples) if cfg.val_data else None,
    }
    return TrainInputs(examples, multiplicities, val_examples, resume_identity(cfg, fingerprints))
