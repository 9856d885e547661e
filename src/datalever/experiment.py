"""Experiment: one profile and split, then for every arm and seed the training set, fine-tuning and
evaluation, and a report with confidence intervals and paired comparisons.

Every stage writes into the run directory (its layout: `rundir.RunDir`). An arm/seed whose
eval/metrics.json exists is not run again; a killed arm resumes from its last training checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from datalever import checks, progress, rundir
from datalever.evaluate import EvalConfig
from datalever.evaluate import run as eval_run
from datalever.examples import (
    DataFormat,
    check_overlap,
    examples_written_by_datalever,
    load_examples,
    local_data,
    read_data,
    save_examples,
)
from datalever.optim import NAMES as OPTIMIZERS
from datalever.profile import ProfileConfig
from datalever.profile import run as profile_run
from datalever.report import write_report
from datalever.rundir import ArmDir, RunDir, SplitDir
from datalever.split import FEATURES, SplitConfig
from datalever.split import run as split_run
from datalever.synth import SPLITS, SynthConfig, run_synth
from datalever.tokens import Formatter
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
    """Split features for this arm: trajectory | final | relative | residual; None: the experiment's. The same
    profile is split again under splits/<features>/."""

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
class ExperimentConfig(DataFormat):
    """Profile, split, then train and evaluate every arm over every seed; write results and plots.

    Given data is read once, with the data options (schema, fields, template), into RUN/data/ as datalever files,
    which every stage then reads: train.jsonl, validation.jsonl, and one file per test set."""

    run_dir: str = "runs/experiment"
    """Run directory for every stage's files."""
    train_file: str | None = None
    """Training examples: a file, a datasets directory or a hub dataset (`openai/gsm8k:main`); default: generate
    the embedded dataset into RUN/data."""
    val_file: str | None = None
    """Validation examples (validation loss during training; choose hyperparameters on these)."""
    test_file: str | None = None
    """Test examples for the final accuracies (a test set named `test`)."""
    test_files: dict[str, str] | None = None
    """Several test sets by name, e.g. '{gsm8k: openai/gsm8k:main, math: data/math.jsonl}': each arm is evaluated
    on each, and the report has a column per test set (the first decides the paired comparisons). Each file's schema
    is detected from its columns, except a test set from the training data's own source (another split of it),
    which is read with the data options as the training and validation data are."""
    test_templates: dict[str, str] | None = None
    """Prompt templates for test sets by name, so that a test set is asked as the training data was, e.g. for
    MathInstruct training (Alpaca prompts): '{gsm8k: "### Instruction:\\n{question}\\n\\n### Response:\\n"}';
    default: each test set's own format's template."""
    train_split: str | None = None
    """Split of train_file when it holds several (a DatasetDict, a hub dataset); default: train."""
    val_split: str | None = None
    """Split of val_file when it holds several; default: validation."""
    test_split: str | None = None
    """Split of each test file when it holds several; default: test."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """Embedded dataset settings (used when train_file is not given; its `out` is RUN/data)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """Proxy settings (its run_dir and data are set by the experiment)."""
    features: str = "trajectory"
    """Split features: trajectory | final | relative | residual (the loss left after a fit on each response's mix of
    digits, letters and symbols: what the proxy finds hard beyond the composition of the text)."""
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
    """Target training settings for every arm (data, out, manifest, seed and run_name are set per arm)."""
    eval_split: str = "test"
    """Which split the reported accuracies use: test (final numbers) or validation (choosing settings)."""
    eval_max_new_tokens: int = 200
    """Generation cap for evaluation."""
    eval_batch_size: int = 64
    """Prompts per generation batch."""
    eval_limit: int | None = None
    """Evaluate only the first N examples (quick checks)."""
    curve_every: float = 1.0
    """Learning curves: validation accuracy (greedy, the eval settings) every this many epochs of the training data
    as given (the same optimizer steps in every arm, so arms are compared at equal steps), and at each arm's last
    step; 0: none. Where validation accuracy is the best so far, the test sets are evaluated too (test accuracy
    at the point chosen on validation). Needs val_file (the embedded data has one). Under DDP or FSDP the
    processes share each point's prompts (under FSDP they generate in lockstep from the sharded weights)."""
    curve_limit: int | None = None
    """Validation examples per curve point (the first N); default: all."""
    sweep: dict[str, list[float]] | None = None
    """Sweep points in one config: lists for epochs, m, fraction (the proxy's share of an epoch) and checkpoints
    (K), e.g. '{m: [1, 2, 4, 9]}' (the paper's 2x, 3x, 5x, 10x); every combination runs as an experiment of its own
    under RUN/sweep/<axis>=<value>,.../ and one report compares them (a table per point, and accuracy against
    compute: the frontier). An arm that trains the data as given (base, sam) does not depend on m, fraction or
    K: a later point links the earlier point's finished run of it (reused_from.json) instead of training it
    again."""
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
        checks.non_negative("curve_every", self.curve_every)
        checks.positive("curve_limit", self.curve_limit, optional=True)
        super().__post_init__()
        self._check_sweep()
        self._check_arms()
        self._check_seeds()
        self._check_files()
        self._check_stage_data_options()

    def _check_arms(self) -> None:
        if not self.arms:
            raise checks.ConfigError("arms is empty: name at least one arm (e.g. [base, hard])")
        if len(set(self.arms)) != len(self.arms):
            raise checks.ConfigError(f"arms names an arm twice: {self.arms}")
        for name in self.arms:
            arm = arm_spec(self, name)
            if arm.match_steps_of is not None and arm_spec(self, arm.match_steps_of).match_steps_of is not None:
                # The steps come from the other arm's data (its epoch length), not from its own matched length.
                raise checks.ConfigError(
                    f"arm {name}: match_steps_of names {arm.match_steps_of}, which matches another arm's steps "
                    "itself; name an arm that trains its own data"
                )

    def _check_sweep(self) -> None:
        for axis, values in (self.sweep or {}).items():
            checks.one_of("sweep axis", axis, SWEEP_AXES)
            if not isinstance(values, list) or not values or len(set(values)) != len(values):
                raise checks.ConfigError(f"sweep.{axis} must list distinct values, got {values!r}")
            for value in values:
                if axis in ("m", "checkpoints") and (isinstance(value, bool) or int(value) != value):
                    raise checks.ConfigError(f"sweep.{axis} takes whole numbers, got {value!r}")
        for point in sweep_points(self):  # each point is checked as a config of its own, before any work
            sweep_config(self, point)

    def _check_seeds(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise checks.ConfigError(f"seeds must name one seed at least, each once; got {self.seeds}")

    def _check_files(self) -> None:
        if self.test_file and self.test_files:
            raise checks.ConfigError("give test_file or test_files, not both (test_files: {test: FILE, ...})")
        for name in self.test_files or {}:
            if not ARM_NAME.fullmatch(str(name)) or name in ("train", "validation"):
                raise checks.ConfigError(
                    f"test set name {name!r}: use letters, digits, '.', '_' and '-', other than train and validation"
                )
        unknown = sorted(set(self.test_templates or {}) - set(test_sets(self)))
        if unknown:
            raise checks.ConfigError(
                f"test_templates names {unknown}, which are not test sets ({list(test_sets(self))})"
            )
        if self.train_file is None:
            if self.val_file or self.test_file or self.test_files:
                raise checks.ConfigError("val_file/test_file without train_file: give train_file too")
            return  # the embedded dataset is generated
        local_data("train_file", self.train_file)
        local_data("val_file", self.val_file, optional=True)
        for name, path in test_sets(self).items():
            local_data(f"test set {name}", path)
        if self.eval_split == "validation" and self.val_file is None:
            raise checks.ConfigError("eval_split=validation needs val_file")
        if self.eval_split == "test" and not test_sets(self):
            raise checks.ConfigError("eval_split=test needs test_file (or test_files)")

    def _check_stage_data_options(self) -> None:
        """The experiment reads the data once and sets each stage's inputs itself: data options given to a stage
        would be ignored, so they are refused, naming the top-level option to use."""
        stages = {"train": self.train, "profile": self.profile}
        for stage, cfg in stages.items():
            for option in ("schema", "fields", "template", "split") + (("val_split",) if stage == "train" else ()):
                default = "auto" if option == "schema" else None
                if getattr(cfg, option) != default:
                    top = {"split": "train_split", "val_split": "val_split"}.get(option, option)
                    raise checks.ConfigError(
                        f"{stage}.{option} is set by the experiment; give the experiment's own --{top} instead"
                    )


def arm_spec(cfg: ExperimentConfig, name: str) -> ArmConfig:
    extra = {a.name: a for a in cfg.extra_arms}
    if name in extra:
        return extra[name]
    if name in BUILTIN_ARMS:
        return BUILTIN_ARMS[name]
    raise checks.ConfigError(f"unknown arm {name!r}: built-in {sorted(BUILTIN_ARMS)}, or define it in extra_arms")


def test_sets(cfg: ExperimentConfig) -> dict[str, str]:
    """The test sets by name: test_files, or test_file as `test`."""
    if cfg.test_files:
        return dict(cfg.test_files)
    return {"test": cfg.test_file} if cfg.test_file else {}


def benchmarks(cfg: ExperimentConfig) -> list[str]:
    """What every arm is evaluated on, by name: the validation set, or each test set."""
    if cfg.eval_split == "validation":
        return ["validation"]
    return list(test_sets(cfg)) if cfg.train_file else ["test"]


def data_files(cfg: ExperimentConfig) -> dict[str, str]:
    """The run's data files in RUN/data, by role (train, validation) and test set name: the given data read
    once into datalever files, or the embedded dataset generated there."""
    run_dir = RunDir(cfg.run_dir)
    if cfg.train_file:
        return import_data(cfg, run_dir)
    if not run_dir.data_file("test").exists():  # synth writes test last
        run_synth(dataclasses.replace(cfg.synth, out=str(run_dir.data)))
    return {split: str(run_dir.data_file(split)) for split in SPLITS}


def import_data(cfg: ExperimentConfig, run_dir: RunDir) -> dict[str, str]:
    """Read each given data source with its options and write it to RUN/data/<name>.jsonl (atomically, every
    invocation: an edited source shows up as other data, which the stages refuse to mix with earlier results)."""
    fmt = cfg.data_format()
    sources = {
        "train": (cfg.train_file, fmt, cfg.train_split, "train", "--train_split"),
        "validation": (cfg.val_file, fmt, cfg.val_split, "validation", "--val_split"),
    }
    for name, path in test_sets(cfg).items():
        # A test set from the training data's own source (another split of it) is read with the same options;
        # another is detected from its columns (GSM8K, MATH, ...), whatever the training data's format.
        own = path in (cfg.train_file, cfg.val_file)
        template = (cfg.test_templates or {}).get(name)
        test_format = fmt if own else DataFormat()
        if template is not None:
            test_format = dataclasses.replace(test_format, template=template)
        sources[test_data_name(name)] = (path, test_format, cfg.test_split, "test", "--test_split")
    files = {}
    for name, (path, data_format, split, role, option) in sources.items():
        if path is None:
            continue
        target = run_dir.data_file(name)
        examples = read_data(path, data_format, split=split, default_split=role, split_option=option)
        if not _is_own_file(path, target):
            save_examples(str(target), examples)
        files[name] = str(target)
    rundir.record_provenance(run_dir.data, "import", cfg.data_format(), sources={k: v[0] for k, v in sources.items()})
    return files


def _is_own_file(path: str, target: Path) -> bool:
    """Whether `path` is the very datalever file the experiment would write (an earlier run's, or `data synth`'s):
    then it is read as it is. Other data inside RUN/data is refused: the experiment writes there, and
    `--overwrite` removes what it wrote."""
    source = Path(path).expanduser()
    if not source.exists() or not source.resolve().is_relative_to(target.parent.resolve()):
        return False
    made_here = any(rundir.provenance_files(target.parent, stage)[0].exists() for stage in ("synth", "import"))
    if source.resolve() == target.resolve() and made_here and examples_written_by_datalever(source):
        return True  # written by `data synth` or an earlier import: the experiment's own
    raise checks.ConfigError(
        f"{path} lies in {target.parent}, where the experiment writes the data it reads; keep your data elsewhere"
    )


def test_data_name(name: str) -> str:
    """The data file a test set is read into: test.jsonl for the one test set `test`, else test-<name>.jsonl."""
    return "test" if name == "test" else f"test-{name}"


def eval_data(cfg: ExperimentConfig, files: dict, benchmark: str) -> str:
    return files["validation" if benchmark == "validation" else test_data_name(benchmark)]


def prepare_arm_data(cfg: ExperimentConfig, arm: ArmConfig, seed: int, files: dict) -> ArmDir:
    """Upsample for this arm and seed into arms/<arm>/seed<S>/ (examples.jsonl + manifest.parquet)."""
    out = RunDir(cfg.run_dir).seed_dir(arm.name, seed)
    if not out.counts.exists():
        heldout = [f for name, f in files.items() if name != "train"]
        upsample_run(
            UpsampleConfig(
                run_dir=cfg.run_dir,
                arm=arm.data,
                m=cfg.m,
                seed=seed,
                synth_fn=arm.synth_fn,
                data=files["train"],
                heldout=heldout,
                split_table=str(split_dir(cfg, arm.features).split),
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
    tcfg.run_name = f"{Path(cfg.run_dir).name}/{arm.name}/seed{seed}"  # the trackers' run: experiment/arm/seed
    if arm.optimizer:
        tcfg.optim = dataclasses.replace(tcfg.optim, name=arm.optimizer)
    if arm.match_steps_of:
        other = arm_spec(cfg, arm.match_steps_of)
        other_dir = prepare_arm_data(cfg, other, seed, files)
        epoch_len = sum(rundir.read_manifest(other_dir.manifest).values())
        tcfg.max_steps = total_steps(cfg.train, epoch_len)
    return tcfg


def run_arm(cfg: ExperimentConfig, arm: ArmConfig, seed: int, files: dict) -> dict:
    """Train (or find trained) and evaluate on every benchmark; returns {benchmark: metrics}."""
    arm_dir = prepare_arm_data(cfg, arm, seed, files)
    names = benchmarks(cfg)
    if not all(arm_dir.eval_on(name).metrics.exists() for name in names):
        tcfg = arm_train_config(cfg, arm, seed, arm_dir, files)
        recorder = CurveRecorder.for_arm(cfg, tcfg, arm_dir, files)
        if recorder is None:
            train_run(tcfg)
        else:
            train_run(tcfg, on_step=recorder, checkpoint_steps=set(recorder.steps))
    results = {}
    for name in names:
        out = arm_dir.eval_on(name)
        if out.metrics.exists():
            results[name] = rundir.read_json(out.metrics)
            continue
        eval_cfg = EvalConfig(
            model=str(arm_dir.train.model),
            data=eval_data(cfg, files, name),
            out=str(out.root),
            max_new_tokens=cfg.eval_max_new_tokens,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            chat_template=cfg.train.chat_template,
            trust_remote_code=cfg.train.trust_remote_code,
            progress=cfg.progress,
        )
        with progress.context(f"eval {name}"):
            results[name] = eval_run(eval_cfg)
    return results


class CurveRecorder:
    """Validation accuracy along one arm's training (a `train.run` on_step hook), kept in the arm's curve.json.

    Each point records the optimizer step, the epoch, the tokens and FLOPs spent so far and the accuracy; a point
    whose validation accuracy is the best so far also records the test sets' accuracies (what the checkpoint chosen
    on validation scores on test). A resumed run finds its earlier points in the file; points are computed on the
    live model, and a checkpoint follows each, so a kill loses no point."""

    def __init__(self, cfg: ExperimentConfig, tcfg: TrainConfig, arm_dir: ArmDir, files: dict, steps: list[int]):
        self.cfg, self.tcfg, self.arm_dir, self.files, self.steps = cfg, tcfg, arm_dir, files, steps
        self.points = (
            {p["step"]: p for p in rundir.read_json(arm_dir.curve)["points"]} if arm_dir.curve.exists() else {}
        )
        self._formatter = None
        self._examples: dict[str, list] = {}  # by benchmark: read once, not at every point

    @classmethod
    def for_arm(cls, cfg: ExperimentConfig, tcfg: TrainConfig, arm_dir: ArmDir, files: dict) -> CurveRecorder | None:
        if not cfg.curve_every or not files.get("validation"):
            return None
        epoch_len = sum(rundir.read_manifest(arm_dir.manifest).values())
        n_train = len(load_examples(files["train"]))
        return cls(cfg, tcfg, arm_dir, files, curve_steps(cfg, tcfg, n_train, epoch_len))

    def __call__(self, step: int, record: dict, model, accelerator) -> None:
        if step not in self.steps or step in self.points:
            return
        point = {
            "step": step,
            "epoch": record["epoch"],
            "tokens": record["compute_tokens"],
            "flops": record["compute_flops"],
            "val_accuracy": self._accuracy(model, accelerator, "validation", self.cfg.curve_limit),
        }
        best = max((p["val_accuracy"] for p in self.points.values()), default=-1.0)
        # The checkpoint chosen on validation so far: its test accuracy (at the last step the evaluation stage
        # measures the same weights; the report takes its numbers).
        if point["val_accuracy"] > best and step != self.steps[-1]:
            point["test_accuracy"] = {
                name: self._accuracy(model, accelerator, name, self.cfg.eval_limit)
                for name in test_sets(self.cfg) or ["test"]
                if self.cfg.eval_split == "test"
            }
        self.points[step] = point
        if accelerator.is_main_process:
            rundir.write_json(self.arm_dir.curve, {"steps": self.steps, "points": sorted_points(self.points)})

    def _accuracy(self, model, accelerator, benchmark: str, limit: int | None) -> float:
        from datalever.evaluate import GenerationOptions, evaluate_during_training
        from datalever.models import load_tokenizer, resolve_model

        if self._formatter is None:
            tokenizer = load_tokenizer(resolve_model(self.tcfg.model, seed=self.tcfg.seed))
            self._formatter = Formatter(tokenizer, self.tcfg.chat_template)
        if benchmark not in self._examples:
            self._examples[benchmark] = load_examples(eval_data(self.cfg, self.files, benchmark))[:limit]
        examples = self._examples[benchmark]
        with progress.context(f"curve {benchmark}"):
            metrics, _ = evaluate_during_training(
                model,
                accelerator,
                self._formatter.tokenizer,
                examples,
                GenerationOptions(
                    max_new_tokens=self.cfg.eval_max_new_tokens,
                    batch_size=self.cfg.eval_batch_size,
                    progress=self.cfg.progress,
                ),
                formatter=self._formatter,
            )
        return metrics["accuracy"]


def sorted_points(points: dict) -> list[dict]:
    return [points[s] for s in sorted(points)]


def curve_steps(cfg: ExperimentConfig, tcfg: TrainConfig, n_train: int, epoch_len: int) -> list[int]:
    """Every `curve_every` epochs of the training data as given (n_train examples: one grid for all arms, so they
    meet at equal steps), up to and including the arm's last step."""
    last = total_steps(tcfg, epoch_len)
    # Rounded up as total_steps rounds an epoch count: the base arm's last step is a grid point.
    grid = (math.ceil(k * cfg.curve_every * n_train / tcfg.batch_size) for k in itertools.count(1))
    return sorted({*itertools.takewhile(lambda step: step <= last, grid), last})


def split_dir(cfg: ExperimentConfig, features: str | None) -> SplitDir:
    """Where the split with these features lives: the run directory for the experiment's own features."""
    own = features is None or features == cfg.features
    return RunDir(cfg.run_dir).split(None if own else features)


def run_method(cfg: ExperimentConfig, files: dict) -> None:
    """The shared front of every arm: one profile, and one split per set of features the arms use."""
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    with progress.context("profile"):
        profile_run(dataclasses.replace(cfg.profile, run_dir=cfg.run_dir, data=files["train"], progress=cfg.progress))
    for features in dict.fromkeys([cfg.features] + [a.features or cfg.features for a in arms]):
        out = split_dir(cfg, features)
        split_cfg = SplitConfig(
            run_dir=cfg.run_dir,
            features=features,
            stratify=cfg.stratify,
            seed=cfg.profile.seed,
            data=files["train"],
            out=str(out.root),
        )
        if out.summary.exists():
            # Left by an earlier invocation: reused only if made with these settings (else one line, refused). Its
            # paths are the experiment's own, inside the run directory: a run directory moved elsewhere continues.
            rundir.refuse_other_settings(out.root, "split", split_cfg, ignore=("run_dir", "data", "out"))
        else:
            split_run(split_cfg)


# Settings that only choose which arms and seeds to run, or how to show progress (more arms or seeds in the
# same run directory is more of the same work), and the stage settings the experiment sets itself for every
# arm. Every other setting decides the numbers.
NOT_COMPARED = {"run_dir", "arms", "seeds", "progress", "overwrite", "sweep"}  # each sweep point checks its own
NOT_COMPARED |= {f"train.{k}" for k in ("data", "manifest", "val_data", "out", "seed", "progress", "overwrite")}
NOT_COMPARED |= {f"train.{k}" for k in ("split", "val_split", "schema", "fields", "template", "run_name")}
# How often a run saves and what it keeps change no number.
NOT_COMPARED |= {f"train.{k}" for k in ("save_every", "save_every_minutes", "keep_last", "keep_optimizer_state")}
NOT_COMPARED |= {"train.log_with"}
NOT_COMPARED |= {f"profile.{k}" for k in ("split", "schema", "fields", "template")}
NOT_COMPARED |= {f"profile.{k}" for k in ("run_dir", "data", "progress")}


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
    named = {split: load_examples(path) for split, path in files.items() if path}  # datalever files in RUN/data
    overlaps = check_overlap(named, allow_overlap=cfg.allow_overlap)
    return {"splits": list(named), "overlaps": [o.to_dict() for o in overlaps]}


# What a sweep may vary: axis -> (the nested config holding it, or None for the experiment's own, field name).
SWEEP_AXES = {"epochs": ("train", "epochs"), "m": (None, "m"), "fraction": ("profile", "fraction"),
              "checkpoints": ("profile", "checkpoints")}  # fmt: skip


def sweep_points(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """Every combination of the sweep's values, in the order given (axes as listed)."""
    if not cfg.sweep:
        return []
    axes = list(cfg.sweep)
    return [dict(zip(axes, values)) for values in itertools.product(*(cfg.sweep[a] for a in axes))]


def point_name(point: dict[str, float]) -> str:
    """m=2,epochs=3: a sweep point's directory under RUN/sweep/."""
    return ",".join(f"{axis}={value:g}" for axis, value in point.items())


def sweep_config(cfg: ExperimentConfig, point: dict[str, float]) -> ExperimentConfig:
    """The experiment of one sweep point: the same settings with the point's values, in its own run directory."""
    sub = copy.deepcopy(cfg)
    for axis, value in point.items():
        holder_name, name = SWEEP_AXES[axis]
        holder = sub if holder_name is None else getattr(sub, holder_name)
        setattr(holder, name, int(value) if axis in ("m", "checkpoints") else float(value))
    changes = {"run_dir": str(RunDir(cfg.run_dir).sweep_point(point_name(point))), "sweep": None}
    return dataclasses.replace(sub, **changes)  # checked again as it is built


def run_sweep(cfg: ExperimentConfig) -> str:
    """Each sweep point as an experiment of its own, then one report over all of them."""
    from datalever.report import write_sweep_report

    run_dir = RunDir(cfg.run_dir)
    check_same_settings(cfg)
    rundir.record_provenance(run_dir.root, "experiment", cfg)
    done: list[dict[str, float]] = []
    for point in sweep_points(cfg):
        for earlier in done:
            reuse_unchanged_arms(cfg, earlier, point)
        with progress.context(point_name(point)):
            run(sweep_config(cfg, point))
        done.append(point)
    return write_sweep_report(run_dir.root, [point_name(point) for point in done])


def arm_axes(cfg: ExperimentConfig, arm: ArmConfig) -> set[str]:
    """The sweep axes an arm's training depends on. An arm that trains the data as given (base, sam) depends on
    the epochs only: not on m, nor on the profile behind the split (fraction, K). Any other arm, on all of them."""
    if arm.data != "base" or arm.synth_fn:
        return set(SWEEP_AXES)
    if arm.match_steps_of is not None:  # the length of another arm's data (never itself matched: _check_arms)
        return {"epochs"} | arm_axes(cfg, arm_spec(cfg, arm.match_steps_of))
    return {"epochs"}


def reuse_unchanged_arms(cfg: ExperimentConfig, earlier: dict[str, float], point: dict[str, float]) -> None:
    """Link into `point` the finished arms of an `earlier` sweep point that it would train again unchanged (base
    and sam across an m sweep): the same settings and seeds give the same run, so it is not repeated. Each
    reused arm records where it came from (reused_from.json)."""
    from accelerate import PartialState

    changed = sorted(axis for axis in point if point[axis] != earlier[axis])
    source_cfg, target_cfg = sweep_config(cfg, earlier), sweep_config(cfg, point)
    reused = [name for name in cfg.arms if not arm_axes(cfg, arm_spec(cfg, name)) & set(changed)]
    with PartialState().main_process_first():  # under DDP one process links; the others then find the links
        for name, seed in itertools.product(reused, cfg.seeds):
            source = RunDir(source_cfg.run_dir).seed_dir(name, seed)
            target = RunDir(target_cfg.run_dir).seed_dir(name, seed)
            finished = all(source.eval_on(b).metrics.exists() for b in benchmarks(cfg))
            if finished and not target.root.exists():
                link_tree(source.root, target.root, note={"source": str(source.root), "changed": changed})
                print(f"{name} seed {seed}: reused from {source.root} (it does not depend on {' or '.join(changed)})")


def link_tree(source: Path, target: Path, note: dict) -> None:
    """A copy of a directory made of hard links where the filesystem allows (a model's weights are not duplicated),
    with `note` as reused_from.json, built under a temporary name (rundir.atomic_dir): a crash never leaves a
    half-copied arm that looks finished."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)

    with rundir.atomic_dir(target, keep_existing=True) as tmp:
        shutil.copytree(source, tmp, copy_function=link, dirs_exist_ok=True)
        rundir.write_json(tmp / "reused_from.json", note)


def run(cfg: ExperimentConfig) -> str:
    if cfg.sweep:
        return run_sweep(cfg)
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
            with progress.context(f"{arm.name} seed{seed}"):
                run_arm(cfg, arm, seed, files)
    report = write_report(
        run_dir.root,
        [a.name for a in arms],
        cfg.seeds,
        controls=CONTROL_ARMS,
        eval_split=cfg.eval_split,
        benchmarks=benchmarks(cfg),
        data_checks={"overlap": overlap},
        split_arms=[a.name for a in arms if a.data != "base"],
    )
    return (
        report["markdown"] + f"\n\nresults: {run_dir.results_md} (plots: {run_dir.plot('*')}); "
        f"this invocation took {time.perf_counter() - t0:.0f} s"
    )
