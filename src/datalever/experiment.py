"""Experiment: one profile and split, then for every arm and seed the training set, fine-tuning and
evaluation, and a report with confidence intervals and paired comparisons.

Every stage writes into the run directory (its layout: `rundir.RunDir`). An arm/seed whose
eval/metrics.json exists is not run again; a killed arm resumes from its last training checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import time
from dataclasses import dataclass, field

from datalever import checks, rundir
from datalever.evaluate import EvalConfig
from datalever.evaluate import run as eval_run
from datalever.examples import check_overlap, load_examples
from datalever.optim import NAMES as OPTIMIZERS
from datalever.profile import ProfileConfig
from datalever.profile import run as profile_run
from datalever.report import write_report
from datalever.rundir import ArmDir, RunDir, SplitDir
from datalever.split import FEATURES, SplitConfig
from datalever.split import run as split_run
from datalever.synth import SPLITS, SynthConfig, run_synth
from datalever.train import TrainConfig, total_steps
from datalever.train import run as train_run
from datalever.upsample import ARMS as upsample_arms
from datalever.upsample import MAX_M, UpsampleConfig
from datalever.upsample import run as upsample_run

ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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

    def __post_init__(self) -> None:
        # The name becomes a directory under arms/: one plain path component, never a way out of the run.
        if not ARM_NAME.fullmatch(self.name or ""):
            raise checks.ConfigError(
                f"arm name {self.name!r}: use letters, digits, '.', '_' and '-' (it names a directory under arms/)"
            )
        checks.one_of(f"arm {self.name}: data", self.data, upsample_arms)
        if self.optimizer is not None:
            checks.one_of(f"arm {self.name}: optimizer", self.optimizer, OPTIMIZERS)
        if self.features is not None:
            checks.one_of(f"arm {self.name}: features", self.features, FEATURES)


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
    allow_overlap: bool = False
    """Run even when the train, validation and test files share examples (same content id or same prompt up to
    case and spacing); without it such an experiment is refused. The report records the check either way."""
    overwrite: bool = False
    """Rerun with settings that differ from the ones recorded in run_dir: delete the outputs the experiment wrote
    there and start again (without it such a rerun is refused, so no result is reused under other settings)."""

    def __post_init__(self) -> None:
        """The whole experiment is checked here, before any data is generated or model trained."""
        checks.one_of("features", self.features, FEATURES)
        checks.non_negative("m", self.m)
        checks.at_most("m", self.m, MAX_M)
        checks.one_of("eval_split", self.eval_split, ("test", "validation"))
        checks.positive("eval_max_new_tokens", self.eval_max_new_tokens)
        checks.positive("eval_batch_size", self.eval_batch_size)
        checks.positive("eval_limit", self.eval_limit, optional=True)
        self._check_arms()
        self._check_seeds()
        self._check_files()

    def _check_arms(self) -> None:
        if not self.arms:
            raise checks.ConfigError("arms is empty: name at least one arm (e.g. [base, hard])")
        if len(set(self.arms)) != len(self.arms):
            raise checks.ConfigError(f"arms names an arm twice: {self.arms}")
        for name in self.arms:
            arm = arm_spec(self, name)
            if arm.match_steps_of is not None:
                arm_spec(self, arm.match_steps_of)

    def _check_seeds(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise checks.ConfigError(f"seeds must name one seed at least, each once; got {self.seeds}")

    def _check_files(self) -> None:
        if self.train_file is None:
            if self.val_file or self.test_file:
                raise checks.ConfigError("val_file/test_file without train_file: give train_file too")
            return  # the embedded dataset is generated
        checks.existing_path("train_file", self.train_file)
        checks.existing_path("val_file", self.val_file, optional=True)
        checks.existing_path("test_file", self.test_file, optional=True)
        eval_file = {"test": self.test_file, "validation": self.val_file}[self.eval_split]
        if eval_file is None:
            option = "test_file" if self.eval_split == "test" else "val_file"
            raise checks.ConfigError(f"eval_split={self.eval_split} needs {option}")


def arm_spec(cfg: ExperimentConfig, name: str) -> ArmConfig:
    extra = {a.name: a for a in cfg.extra_arms}
    if name in extra:
        return extra[name]
    if name in BUILTIN_ARMS:
        return BUILTIN_ARMS[name]
    raise checks.ConfigError(f"unknown arm {name!r}: built-in {sorted(BUILTIN_ARMS)}, or define it in extra_arms")


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
        split_cfg = SplitConfig(
            run_dir=cfg.run_dir,
            features=features,
            stratify=cfg.stratify,
            seed=cfg.profile.seed,
            train_file=files["train"],
            out=str(out.root),
        )
        if out.summary.exists():
            # Left by an earlier invocation: reused only if made with these settings (else one line, refused).
            rundir.refuse_other_settings(out.root, "split", split_cfg)
        else:
            split_run(split_cfg)


# Settings that only choose which arms and seeds to run, or how to show progress (more arms or seeds in the
# same run directory is more of the same work), and the stage settings the experiment sets itself for every
# arm. Every other setting decides the numbers.
NOT_COMPARED = {"run_dir", "arms", "seeds", "progress", "overwrite"}
NOT_COMPARED |= {f"train.{k}" for k in ("data", "manifest", "val_data", "out", "seed", "progress", "overwrite")}
NOT_COMPARED |= {f"profile.{k}" for k in ("run_dir", "train_file", "progress")}


def check_same_settings(cfg: ExperimentConfig) -> None:
    """Results in run_dir are reused only if made with these settings; otherwise refuse, or with
    `overwrite` delete what the experiment wrote there and start again."""
    run_dir = RunDir(cfg.run_dir)
    if not rundir.refuse_other_settings(run_dir.root, "experiment", cfg, ignore=NOT_COMPARED):
        return
    for path in run_dir.experiment_outputs():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_splits_apart(cfg: ExperimentConfig, files: dict) -> dict:
    """Train, validation and test must not share examples: a shared example makes a validation or test
    score measure memory. Refused unless allow_overlap; the result goes into the report either way."""
    named = {split: load_examples(path) for split, path in files.items() if path}
    overlaps = check_overlap(named, allow_overlap=cfg.allow_overlap)
    return {"splits": list(named), "overlaps": [o.to_dict() for o in overlaps]}


def run(cfg: ExperimentConfig) -> str:
    run_dir = RunDir(cfg.run_dir)
    check_same_settings(cfg)
    rundir.record_provenance(run_dir.root, "experiment", cfg)
    files = data_files(cfg)
    overlap = check_splits_apart(cfg, files)
    t0 = time.perf_counter()
    run_method(cfg, files)
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    for arm in arms:
        for seed in cfg.seeds:
            run_arm(cfg, arm, seed, files)
    report = write_report(
        run_dir.root,
        [a.name for a in arms],
        cfg.seeds,
        controls=CONTROL_ARMS,
        eval_split=cfg.eval_split,
        data_checks={"overlap": overlap},
    )
    return (
        report["markdown"] + f"\n\nresults: {run_dir.results_md} (plots: {run_dir.plot('*')}); "
        f"this invocation took {time.perf_counter() - t0:.0f} s"
    )
