"""Every field of a config whose stage records an identity is classified: it decides the stage's outputs (compared
before they are reused or continued), names an input compared by content, or changes no output. A new field fails
here until someone decides which, beside the config (`provenance.Classified`)."""

from __future__ import annotations

import dataclasses

import pytest

from datalever import evaluate, experiment, optim, profile, provenance, split, upsample
from datalever.train import config as train_config

CLASSIFIED = [
    (train_config.TrainConfig, train_config.TRAIN_SETTINGS),
    (train_config.LoraConfig, train_config.LORA_SETTINGS),
    (optim.OptimConfig, optim.OPTIM_SETTINGS),
    (profile.ProfileConfig, profile.PROFILE_SETTINGS),
    (upsample.UpsampleConfig, upsample.UPSAMPLE_SETTINGS),
    (split.SplitConfig, split.SPLIT_SETTINGS),
    (evaluate.EvalConfig, evaluate.EVAL_SETTINGS),
    (experiment.ExperimentConfig, experiment.config.EXPERIMENT_SETTINGS),
]


@pytest.mark.parametrize("config_class, classified", CLASSIFIED, ids=[c.__name__ for c, _ in CLASSIFIED])
def test_every_field_is_classified_once(config_class, classified):
    assert classified.unclassified(config_class) == []
    assert classified.unknown(config_class) == []


def test_an_unclassified_field_fails():
    """The check itself: a config that gained a field nobody classified, or that lists a field in two places."""

    @dataclasses.dataclass
    class Grown(train_config.TrainConfig):
        new_knob: float = 0.5

    assert train_config.TRAIN_SETTINGS.unclassified(Grown) == ["new_knob"]
    twice = dataclasses.replace(train_config.TRAIN_SETTINGS, ignored=(*train_config.TRAIN_SETTINGS.ignored, "seed"))
    assert twice.unclassified(train_config.TrainConfig) == ["seed"]
    renamed = dataclasses.replace(train_config.TRAIN_SETTINGS, decide=("gone", *train_config.TRAIN_SETTINGS.decide))
    assert renamed.unknown(train_config.TrainConfig) == ["gone"]


def test_every_deciding_train_setting_changes_the_resume_identity():
    """The lists drive the identity: a deciding setting moved away from its default gives another identity (where it
    is in effect), an ignored one never does."""
    base = train_config.TrainConfig()
    identity = train_config.resume_identity(base, {})
    changed = {
        "epochs": 2.0,
        "max_steps": 7,
        "stop_after_steps": 3,
        "batch_size": 16,
        "max_length": 64,
        "optim": optim.OptimConfig(lr=1e-3),
        "warmup_ratio": 0.5,
        "min_lr_ratio": 0.1,
        "max_grad_norm": 0.5,
        "lora": train_config.LoraConfig(enabled=True),
        "seed": 3,
        "dtype": "bfloat16",
        "mixed_precision": "bf16",
        "eval_every": 5,
        "attn_implementation": "eager",
        "tf32": False,  # True is "as before it existed" only where it is in effect (CUDA); on a CPU it is off
        "torch_compile": True,
        "save_dtype": "float16",
        "chat_template": "none",
    }
    in_effect_only = {"tf32"}  # without CUDA tf32 is never in effect: both values compute the same
    assert set(changed) == set(train_config.TRAIN_SETTINGS.decide)
    for name, value in changed.items():
        if name == "torch_compile":
            continue  # needs a compiler to construct; its effect is tested in test_speed_knobs
        other = train_config.resume_identity(dataclasses.replace(base, **{name: value}), {})
        assert (other != identity) or name in in_effect_only, name
    ignored = {
        "out": "elsewhere",
        "progress": False,
        "log_with": ["tensorboard"],
        "run_name": "a/b",
        "save_every": 3,
        "save_every_minutes": 1.0,
        "keep_last": 4,
        "keep_optimizer_state": True,
        "trust_remote_code": True,
        "overwrite": True,
        "micro_batch_size": 2,
        "group_by_length": False,
        "gradient_checkpointing": True,
        "on_conflict": "error",
    }
    assert set(ignored) == set(train_config.TRAIN_SETTINGS.ignored)
    for name, value in ignored.items():
        assert train_config.resume_identity(dataclasses.replace(base, **{name: value}), {}) == identity, name


def test_ignored_upsample_and_experiment_settings_are_what_the_refusals_skip():
    assert set(experiment.config.EXPERIMENT_SETTINGS.ignored) <= experiment.config.NOT_COMPARED
    assert set(upsample.UPSAMPLE_SETTINGS.ignored) <= set(provenance.NEVER_COMPARED)
    assert provenance.MISSING != None  # noqa: E711 - a setting one side lacks is never taken for None
