"""An experiment's settings: the arms (each a whole recipe: which data distribution, which optimizer, how long),
the seeds, the data, the stages' own settings, a sweep, and where and how its units run (the grid). Everything is
checked here, before any data is generated or model trained.

Beside the config, which of its settings decide the numbers (`EXPERIMENT_SETTINGS`): a rerun in the same run directory
with other values of those is refused (or, with `overwrite`, starts again); more arms or seeds, or another way of
running the units, is more of the same work.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field

from datalever import checks
from datalever.examples import DataFormat, local_data
from datalever.grid.slurm_config import SlurmConfig
from datalever.optim import NAMES as OPTIMIZERS
from datalever.profile import ProfileConfig
from datalever.provenance import Classified
from datalever.rundir import RunDir
from datalever.split import FEATURES, HARD_BY, SMALL_SOURCE_RULES, SMALL_SOURCES
from datalever.synth import SynthConfig
from datalever.train import TrainConfig
from datalever.upsample import DISTRIBUTIONS, MAX_M

LAUNCHERS = ("local", "slurm")

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

    @property
    def reads_split(self) -> bool:
        """Whether its training set is made from the split (any distribution but base, or variants of selected
        examples), and so depends on the profile; base, the data as given, needs none."""
        return self.data != "base" or bool(self.synth_fn)

    def __post_init__(self) -> None:
        # The name becomes a directory under arms/: one plain path component, never a way out of the run.
        if not ARM_NAME.fullmatch(self.name or ""):
            raise checks.ConfigError(
                f"arm name {self.name!r}: use letters, digits, '.', '_' and '-' (it names a directory under arms/)"
            )
        checks.one_of(f"arm {self.name}: data", self.data, DISTRIBUTIONS)
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
    val_holdout: float = 0.0
    """Without val_file: the share of train_file held out as the validation set (never trained on nor profiled), drawn
    as `datasets`' shuffle(seed=val_holdout_seed) orders the rows, the first 1 - val_holdout of them trained on: the
    prototype holds out 5% of MathInstruct with seed 42 (schedule_base.py of github.com/chrisVat/sam). 0: none."""
    val_holdout_seed: int = 42
    """The shuffle seed of val_holdout."""
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
    small_sources: str = "upsample"
    """With stratify, a source that small_source_rule calls small: upsample (whole, without clustering: the
    prototype's) | cluster (like any other) | keep (used once); see `datalever split --help`."""
    small_source_rule: str = "count"
    """With stratify, which sources are small: count (fewer usable examples than min_source_size) | mean (fewer rows
    than the mean source size, or than min_source_size: the prototype's rule, with min_source_size 78)."""
    min_source_size: int = 10
    """With stratify: the size below which a source is small."""
    hard_by: str = "loss"
    """Which cluster is hard: loss (the highest mean raw loss; residual: residual) | features (the highest mean of the
    clustered features: the prototype's; for relative features the highest mean ratio)."""
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
    lm_eval: bool = False
    """Also evaluate each arm's saved model with lm-evaluation-harness itself, offline, on each test set as the run
    holds it (`pip install 'datalever[lm-eval]'`): lm-eval's gsm8k for test sets whose answers follow `####` (strict
    and flexible match), its minerva_math for `\\boxed` answers (exact match and math-verify), each with lm-eval's
    own prompt, few-shot examples and extraction (lmeval.py names the task YAML mirrored and what changed to read
    local files). Written as lm_eval.json beside each evaluation's metrics.json; the report puts it beside
    datalever's accuracy: numbers comparable with published lm-eval results."""
    lm_eval_fewshot: dict[str, str] | None = None
    """Where lm-eval's gsm8k draws its few-shot examples for gsm8k-style test sets, by test set name, e.g.
    '{gsm8k: openai/gsm8k:main}' (GSM8K's train split, as lm-eval does) or a local copy of it (offline); a
    gsm8k-style test set without one is asked zero-shot. MATH-style test sets always get Minerva's 4 fixed
    examples, which ship with lm-eval."""
    curve_every: float = 1.0
    """Learning curves: validation accuracy (greedy, the eval settings) every this many epochs of the training data
    as given (the same optimizer steps in every arm, so arms are compared at equal steps), and at each arm's last
    step; 0: none. Where validation accuracy is the best so far, the test sets are evaluated too (test accuracy
    at the point chosen on validation). Needs val_file (the embedded data has one). Under DDP or FSDP the
    processes share each point's prompts (under FSDP they generate in lockstep from the sharded weights)."""
    curve_limit: int | None = None
    """Validation examples per curve point (the first N); default: all."""
    sweep: dict[str, list[float | str]] | None = None
    """Sweep points in one config: lists for epochs, m, fraction (the proxy's share of an epoch), checkpoints (K)
    and proxy (the profile's proxy: a model as profile.proxy takes it, or `arm:NAME`), e.g. '{m: [1, 2, 4, 9]}'
    (the paper's 2x, 3x, 5x, 10x); every combination runs as an experiment of its own under
    RUN/sweep/<axis>=<value>,.../ (a proxy named by its last path part: proxy=demo-large-1500) and one report
    compares them (a table per point, accuracy against compute: the frontier, and, where the points' splits differ,
    how: split_comparison.md). An arm that trains the data as given (base, sam) depends on none of m, fraction, K or
    proxy: a later point links the earlier point's finished run of it (reused_from.json) instead of training it
    again."""
    workers: int = 1
    """Units run at once on this machine: 1 runs them one at a time in this process (their bars on this terminal); N
    runs N at a time, each in a worker process of its own (its output in RUN/logs/<unit>.log), with cores / N threads
    each on a CPU. Any number of drivers on one run directory share the work: each unit is claimed before it runs."""
    gpus_per_run: int = 0
    """GPUs each unit sees (its own CUDA_VISIBLE_DEVICES; with several, the unit runs under torchrun, one process per
    device); 0: none (a CPU machine), or the one device of a single in-process run. With launcher slurm: GPUs per
    job."""
    launcher: str = "local"
    """Where units run: local (this machine: `workers`) | slurm (each unit a SLURM job through submitit: `slurm.*`).
    A rerun of the same command reattaches to the jobs it submitted, collects the finished ones and writes the report
    when every unit is finished."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM settings for launcher slurm: partition, account, qos, time_min, cpus_per_run, mem_per_run_gb,
    signal_delay_s, max_running, extra sbatch options, detach."""
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
        checks.one_of("small_sources", self.small_sources, SMALL_SOURCES)
        checks.one_of("small_source_rule", self.small_source_rule, SMALL_SOURCE_RULES)
        checks.positive("min_source_size", self.min_source_size)
        checks.one_of("hard_by", self.hard_by, HARD_BY)
        checks.non_negative("m", self.m)
        checks.at_most("m", self.m, MAX_M)
        checks.one_of("eval_split", self.eval_split, ("test", "validation"))
        checks.positive("eval_max_new_tokens", self.eval_max_new_tokens)
        checks.positive("eval_batch_size", self.eval_batch_size)
        checks.positive("eval_limit", self.eval_limit, optional=True)
        checks.non_negative("curve_every", self.curve_every)
        checks.positive("curve_limit", self.curve_limit, optional=True)
        checks.non_negative("val_holdout", self.val_holdout)
        if self.val_holdout >= 1:
            raise checks.ConfigError(f"val_holdout is a share of train_file below 1, got {self.val_holdout!r}")
        checks.non_negative("val_holdout_seed", self.val_holdout_seed)
        checks.positive("workers", self.workers)
        checks.non_negative("gpus_per_run", self.gpus_per_run)
        checks.one_of("launcher", self.launcher, LAUNCHERS)
        if self.launcher == "slurm" and self.workers != 1:
            raise checks.ConfigError("workers is for launcher local; with launcher slurm use slurm.max_running")
        super().__post_init__()
        self._check_sweep()
        self._check_arms()
        self._check_oracle()
        self._check_seeds()
        self._check_files()
        self._check_lm_eval()
        self._check_stage_data_options()

    def _check_lm_eval(self) -> None:
        """lm-eval runs after each arm's training: a missing install or a wrong few-shot file is said before any."""
        if self.lm_eval_fewshot and not self.lm_eval:
            raise checks.ConfigError("lm_eval_fewshot is for lm_eval: set lm_eval true too")
        if not self.lm_eval:
            return
        from datalever.lmeval import require_lm_eval

        require_lm_eval("lm_eval")
        unknown = sorted(set(self.lm_eval_fewshot or {}) - set(benchmarks(self)))
        if unknown:
            raise checks.ConfigError(
                f"lm_eval_fewshot names {unknown}, which are not what the arms are evaluated on ({benchmarks(self)})"
            )
        for name, path in (self.lm_eval_fewshot or {}).items():
            local_data(f"lm_eval_fewshot {name}", path)

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
                if (axis == "proxy") != isinstance(value, str) or isinstance(value, bool):
                    kind = "model names or paths" if axis == "proxy" else "numbers"
                    raise checks.ConfigError(f"sweep.{axis} takes {kind}, got {value!r}")
                if axis in ("m", "checkpoints") and int(value) != value:
                    raise checks.ConfigError(f"sweep.{axis} takes whole numbers, got {value!r}")
            names = [value_name(v) for v in values]
            if len(set(names)) != len(names):
                raise checks.ConfigError(
                    f"sweep.{axis}: {values} name the same sweep directory ({names}); give paths whose last parts "
                    "differ"
                )
        for point in sweep_points(self):  # each point is checked as a config of its own, before any work
            sweep_config(self, point)

    def _check_oracle(self) -> None:
        """profile.proxy arm:NAME profiles with that arm's fine-tuned model (seed profile.seed): an arm of this
        experiment whose training does not depend on the split, or the split would wait for itself."""
        name = oracle_arm(self.profile.proxy)
        if name is None:
            return
        if name not in self.arms:
            raise checks.ConfigError(f"profile.proxy {self.profile.proxy}: {name} is not one of the arms {self.arms}")
        arm = arm_spec(self, name)
        if arm.reads_split or arm.match_steps_of:
            raise checks.ConfigError(
                f"profile.proxy {self.profile.proxy}: arm {name} trains on data made from the split, which this "
                "proxy's profile makes; name an arm that trains the data as given (e.g. base)"
            )
        if self.profile.seed not in self.seeds:
            raise checks.ConfigError(
                f"profile.proxy {self.profile.proxy} is the arm's model of seed profile.seed={self.profile.seed}, "
                f"which is not one of the seeds {self.seeds}"
            )

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
            if self.val_file or self.test_file or self.test_files or self.val_holdout:
                raise checks.ConfigError("val_file/val_holdout/test_file without train_file: give train_file too")
            return  # the embedded dataset is generated
        local_data("train_file", self.train_file)
        local_data("val_file", self.val_file, optional=True)
        for name, path in test_sets(self).items():
            local_data(f"test set {name}", path)
        if self.val_file and self.val_holdout:
            raise checks.ConfigError("give val_file or val_holdout, not both")
        if self.eval_split == "validation" and self.val_file is None and not self.val_holdout:
            raise checks.ConfigError("eval_split=validation needs val_file (or val_holdout)")
        if self.eval_split == "test" and not test_sets(self):
            raise checks.ConfigError("eval_split=test needs test_file (or test_files)")

    def _check_stage_data_options(self) -> None:
        """The experiment reads the data once and sets each stage's inputs itself: data options given to a stage
        would be ignored, so they are refused, naming the top-level option to use."""
        stages = {"train": self.train, "profile": self.profile}
        for stage, cfg in stages.items():
            options = ("schema", "fields", "template", "on_conflict", "split") + (
                ("val_split",) if stage == "train" else ()
            )
            for option in options:
                default = {"schema": "auto", "on_conflict": "warn"}.get(option)
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


ORACLE_PREFIX = "arm:"  # profile.proxy arm:base: the base arm's own fine-tuned model as the proxy (it knows the task)


def oracle_arm(proxy: str) -> str | None:
    """The arm whose fine-tuned model profile.proxy names (`arm:NAME`), or None for any other model."""
    return proxy.removeprefix(ORACLE_PREFIX) if proxy.startswith(ORACLE_PREFIX) else None


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


EXPERIMENT_SETTINGS = Classified(
    decide=(
        "schema",
        "fields",
        "template",
        "train_file",
        "val_file",
        "val_holdout",
        "val_holdout_seed",
        "test_file",
        "test_files",
        "test_templates",
        "train_split",
        "val_split",
        "test_split",
        "synth",
        "profile",  # but the settings below that the experiment sets itself
        "features",
        "stratify",
        "small_sources",
        "small_source_rule",
        "min_source_size",
        "hard_by",
        "m",
        "extra_arms",
        "train",  # but the settings below that the experiment sets itself, or that change no number
        "eval_split",
        "eval_max_new_tokens",
        "eval_batch_size",
        "eval_limit",
        "lm_eval",  # lm-eval's accuracies in the report
        "lm_eval_fewshot",
        "curve_every",
        "curve_limit",
        "allow_overlap",  # the report records the check
    ),
    # Which units run (more arms or seeds in the same run directory is more of the same work), how they are shown,
    # and where they run; each sweep point checks its own settings.
    ignored=(
        "run_dir",
        "arms",
        "seeds",
        "progress",
        "overwrite",
        "sweep",
        "workers",
        "gpus_per_run",
        "launcher",
        "slurm",
        "on_conflict",  # conflicting labels refused or named: the data read is the same
    ),
)
NOT_COMPARED = set(EXPERIMENT_SETTINGS.ignored)
NOT_COMPARED |= {f"train.{k}" for k in ("data", "manifest", "val_data", "out", "seed", "progress", "overwrite")}
NOT_COMPARED |= {
    f"train.{k}" for k in ("split", "val_split", "schema", "fields", "template", "on_conflict", "run_name")
}
# How often a run saves and what it keeps change no number.
NOT_COMPARED |= {f"train.{k}" for k in ("save_every", "save_every_minutes", "keep_last", "keep_optimizer_state")}
NOT_COMPARED |= {"train.log_with"}
NOT_COMPARED |= {f"profile.{k}" for k in ("split", "schema", "fields", "template", "on_conflict")}
NOT_COMPARED |= {f"profile.{k}" for k in ("run_dir", "data", "progress")}


# What a sweep may vary: axis -> (the nested config holding it, or None for the experiment's own, field name).
SWEEP_AXES = {"epochs": ("train", "epochs"), "m": (None, "m"), "fraction": ("profile", "fraction"),
              "checkpoints": ("profile", "checkpoints"), "proxy": ("profile", "proxy")}  # fmt: skip
SPLIT_AXES = ("fraction", "checkpoints", "proxy")  # the axes that change the profile, and so the split


def sweep_points(cfg: ExperimentConfig) -> list[dict[str, float | str]]:
    """Every combination of the sweep's values, in the order given (axes as listed)."""
    if not cfg.sweep:
        return []
    axes = list(cfg.sweep)
    return [dict(zip(axes, values)) for values in itertools.product(*(cfg.sweep[a] for a in axes))]


def value_name(value: float | str) -> str:
    """A sweep value as its directory names it: a number as %g; a model by its last path part, with anything but
    letters, digits, '.', '_' and '-' as '-' (embedded:demo-base -> embedded-demo-base, arm:base -> arm-base)."""
    if not isinstance(value, str):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", value.rstrip("/").rsplit("/", 1)[-1]) or "-"


def point_name(point: dict[str, float | str]) -> str:
    """m=2,epochs=3: a sweep point's directory under RUN/sweep/."""
    return ",".join(f"{axis}={value_name(value)}" for axis, value in point.items())


def sweep_config(cfg: ExperimentConfig, point: dict[str, float | str]) -> ExperimentConfig:
    """The experiment of one sweep point: the same settings with the point's values, in its own run directory."""
    sub = copy.deepcopy(cfg)
    for axis, value in point.items():
        holder_name, name = SWEEP_AXES[axis]
        holder = sub if holder_name is None else getattr(sub, holder_name)
        setattr(
            holder, name, value if axis == "proxy" else int(value) if axis in ("m", "checkpoints") else float(value)
        )
    changes = {"run_dir": str(RunDir(cfg.run_dir).sweep_point(point_name(point))), "sweep": None}
    return dataclasses.replace(sub, **changes)  # checked again as it is built
