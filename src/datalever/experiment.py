"""Experiment: one profile and split, then for every arm and seed the training set, fine-tuning and
evaluation, and a report with confidence intervals and paired comparisons.

Every stage writes into the run directory (its layout: `rundir.RunDir`). An arm/seed whose
eval/metrics.json exists is not run again; a killed arm resumes from its last training checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

from datalever import rundir
from datalever.evaluate import EvalConfig
from datalever.evaluate import run as eval_run
from datalever.profile import ProfileConfig
from datalever.profile import run as profile_run
from datalever.report import write_report
from datalever.rundir import ArmDir, RunDir, SplitDir
from datalever.split import SplitConfig
from datalever.split import run as split_run
from datalever.synth import SPLITS, SynthConfig, run_synth
from datalever.train import TrainConfig, total_steps
from datalever.train import run as train_run
from datalever.upsample import UpsampleConfig
from datalever.upsample import run as upsample_run


@dataclass
class ArmConfig:
    """One arm: which examples are upsampled and how the model is trained."""

    name: str = "hard"
    """Arm name (a directory under arms/)."""
    data: str = "base"
    """Training distribution: base (original) | hard | easy | random (upsampled as the upsample stage does)."""
    optimizer: str | None = None
    """Override the optimizer for this arm: adamw | muon | sam."""
    match_steps_of: str | None = None
    """Train as many optimizer steps as this arm does (e.g. base-long matches hard)."""
    synth_fn: str | None = None
    """Add synthesized variants of the selected examples, e.g. datalever.synth:variants."""
    features: str | None = None
    """Split features for this arm: trajectory | final | relative; None: the experiment's. The same profile is split
    again under splits/<features>/."""


BUILTIN_ARMS: dict[str, ArmConfig] = {
    "base": ArmConfig("base", "base"),
    "hard": ArmConfig("hard", "hard"),
    "random": ArmConfig("random", "random"),
    "easy": ArmConfig("easy", "easy"),
    "base-long": ArmConfig("base-long", "base", match_steps_of="hard"),
    "sam": ArmConfig("sam", "base", optimizer="sam"),
    "hard-muon": ArmConfig("hard-muon", "hard", optimizer="muon"),
    "hard-synth": ArmConfig("hard-synth", "hard", synth_fn="datalever.synth:variants"),
    "hard-final": ArmConfig("hard-final", "hard", features="final"),
}
# The controls every other arm is compared with, seed by seed, in the report.
CONTROL_ARMS = ("base", "random", "easy", "base-long", "sam")


@dataclass
class ExperimentConfig:
    """Profile, split, then train and evaluate every arm over every seed; write results and plots."""

    run_dir: str = "runs/experiment"
    """Run directory for every stage's files."""
    train_file: str | None = None
    """Training examples; default: generate the embedded dataset into RUN/data."""
    val_file: str | None = None
    """Validation examples (validation loss during training; choose hyperparameters on these)."""
    test_file: str | None = None
    """Test examples for the final accuracies."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """Embedded dataset settings (used when train_file is not given; its `out` is RUN/data)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Proxy settings (its run_dir and train_file are set by the experiment)."""
    features: str = "trajectory"
    """Split features: trajectory | final | relative."""
    stratify: bool = False
    """Cluster within each data source."""
    m: int = 1
    """Extra uses of each selected example (1: twice, 2: three times)."""
    arms: list[str] = field(default_factory=lambda: ["base", "hard", "random", "easy", "base-long", "sam"])
    """Arms to run, by name: base, hard, random, easy, base-long, sam, hard-muon, hard-synth, hard-final (hard by the
    final-loss split), or one of extra_arms."""
    extra_arms: list[ArmConfig] = field(default_factory=list)
    """Arms defined here in full (name, data, optimizer, match_steps_of, synth_fn, features)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Training seeds (model initialization of a preset, data order, the random arm's draw)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Target training settings for every arm (data, out, manifest, seed are set per arm)."""
    eval_split: str = "test"
    """Which split the reported accuracies use: test (final numbers) or validation (choosing settings)."""
    eval_max_new_tokens: int = 200
    """Generation cap for evaluation."""
    eval_batch_size: int = 64
    """Prompts per generation batch."""
    eval_limit: int | None = None
    """Evaluate only the first N examples (quick checks)."""
    progress: bool = True
    """Show progress bars."""


def arm_spec(cfg: ExperimentConfig, name: str) -> ArmConfig:
    extra = {a.name: a for a in cfg.extra_arms}
    if name in extra:
        return extra[name]
    if name in BUILTIN_ARMS:
        return BUILTIN_ARMS[name]
    raise ValueError(f"unknown arm {name!r}: built-in {sorted(BUILTIN_ARMS)}, or define it in extra_arms")


def data_files(cfg: ExperimentConfig) -> dict[str, str]:
    """The train/validation/test files, generating the embedded dataset if none are given."""
    if cfg.train_file:
        return {"train": cfg.train_file, "validation": cfg.val_file, "test": cfg.test_file}
    run_dir = RunDir(cfg.run_dir)
    if not run_dir.data_file("test").exists():  # synth writes test last
        run_synth(dataclasses.replace(cfg.synth, out=str(run_dir.data)))
    return {split: str(run_dir.data_file(split)) for split in SPLITS}


def prepare_arm_data(cfg: ExperimentConfig, arm: ArmConfig, seed: int, files: dict) -> ArmDir:
    """Upsample for this arm and seed into arms/<arm>/seed<S>/ (examples.jsonl + manifest.parquet)."""
    out = RunDir(cfg.run_dir).seed_dir(arm.name, seed)
    if not out.counts.exists():
        heldout = [f for f in (files.get("validation"), files.get("test")) if f]
        upsample_run(
            UpsampleConfig(
                run_dir=cfg.run_dir,
                arm=arm.data,
                m=cfg.m,
                seed=seed,
                synth_fn=arm.synth_fn,
                train_file=files["train"],
                heldout=heldout,
                split=str(split_dir(cfg, arm.features).split),
                out=str(out.root),
            )
        )
    return out


def arm_train_config(cfg: ExperimentConfig, arm: ArmConfig, seed: int, arm_dir: ArmDir, files: dict) -> TrainConfig:
    tcfg = copy.deepcopy(cfg.train)
    tcfg.data = str(arm_dir.examples)
    tcfg.manifest = str(arm_dir.manifest)
    tcfg.val_data = files.get("validation")
    tcfg.out = str(arm_dir.train.root)
    tcfg.seed = seed
    tcfg.progress = cfg.progress
    if arm.optimizer:
        tcfg.optim = dataclasses.replace(tcfg.optim, name=arm.optimizer)
    if arm.match_steps_of:
        other = arm_spec(cfg, arm.match_steps_of)
        other_dir = prepare_arm_data(cfg, other, seed, files)
        epoch_len = sum(rundir.read_manifest(other_dir.manifest).values())
        tcfg.max_steps = total_steps(cfg.train, epoch_len)
    return tcfg


def run_arm(cfg: ExperimentConfig, arm: ArmConfig, seed: int, files: dict) -> dict:
    arm_dir = prepare_arm_data(cfg, arm, seed, files)
    if arm_dir.eval.metrics.exists():
        return rundir.read_json(arm_dir.eval.metrics)
    train_run(arm_train_config(cfg, arm, seed, arm_dir, files))
    return eval_run(
        EvalConfig(
            model=str(arm_dir.train.model),
            data=files[cfg.eval_split],
            out=str(arm_dir.eval.root),
            max_new_tokens=cfg.eval_max_new_tokens,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            progress=cfg.progress,
        )
    )


def split_dir(cfg: ExperimentConfig, features: str | None) -> SplitDir:
    """Where the split with these features lives: the run directory for the experiment's own features."""
    own = features is None or features == cfg.features
    return RunDir(cfg.run_dir).split(None if own else features)


def run_method(cfg: ExperimentConfig, files: dict) -> None:
    """The shared front of every arm: one profile, and one split per set of features the arms use."""
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    profile_run(dataclasses.replace(cfg.profile, run_dir=cfg.run_dir, train_file=files["train"], progress=cfg.progress))
    for features in dict.fromkeys([cfg.features] + [a.features or cfg.features for a in arms]):
        out = split_dir(cfg, features)
        if out.summary.exists():
            check_existing_split(out, features, cfg.stratify)
        else:
            split_run(
                SplitConfig(
                    run_dir=cfg.run_dir,
                    features=features,
                    stratify=cfg.stratify,
                    seed=cfg.profile.seed,
                    train_file=files["train"],
                    out=str(out.root),
                )
            )


def check_existing_split(out: SplitDir, features: str, stratify: bool) -> None:
    """A split left by an earlier invocation is reused only if it was made with these settings."""
    import yaml

    recorded = yaml.safe_load(out.config.read_text()) if out.config.exists() else {}
    made = {"features": recorded.get("features"), "stratify": recorded.get("stratify")}
    if made != {"features": features, "stratify": stratify}:
        raise ValueError(
            f"{out.split} was made with {made}, not features={features!r}, "
            f"stratify={stratify}: use a new run_dir (arms already trained used that split)"
        )


def run(cfg: ExperimentConfig) -> str:
    run_dir = RunDir(cfg.run_dir)
    rundir.record_provenance(run_dir.root, "experiment", cfg)
    files = data_files(cfg)
    t0 = time.perf_counter()
    run_method(cfg, files)
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    for arm in arms:
        for seed in cfg.seeds:
            run_arm(cfg, arm, seed, files)
    report = write_report(
        run_dir.root, [a.name for a in arms], cfg.seeds, controls=CONTROL_ARMS, eval_split=cfg.eval_split
    )
    return (
        report["markdown"] + f"\n\nresults: {run_dir.results_md} (plots: {run_dir.plot('*')}); "
        f"this invocation took {time.perf_counter() - t0:.0f} s"
    )
