"""What a training run is asked to do (`TrainConfig`, `LoraConfig`) and, beside it, which of those settings decide
the numbers: the resume identity a checkpoint or a finished run must share to be continued or returned.

Every field of TrainConfig is in one of three lists (`TRAIN_SETTINGS`): settings that decide what a run computes
(its weights, its logged losses and its summary: compared by value), inputs (compared by what they hold: a moved copy
is the same work, data edited in place is not) and settings that change no number. A new field fails
tests/test_identity.py until it is put in one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datalever import checks, launch, rundir
from datalever.examples import DataFormat
from datalever.launch import resolve_mixed_precision, tf32_in_effect
from datalever.models import DIRECTORY, DTYPES
from datalever.optim import OptimConfig, settings_in_effect
from datalever.provenance import MISSING, Classified, differences, file_sha256
from datalever.tokens import check_chat_template

MIXED_PRECISIONS = ("no", "bf16", "auto")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt, e.g. [q_proj, v_proj], or [all-linear]; None picks peft's default for the architecture."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        checks.positive("lora.r", self.r)
        checks.positive("lora.alpha", self.alpha)
        checks.non_negative("lora.dropout", self.dropout)
        if self.dropout >= 1:  # dropout 1 zeroes every adapter input: the adapters would never learn
            raise checks.ConfigError(f"lora.dropout must be < 1, got {self.dropout!r}")


@dataclass
class TrainConfig(DataFormat):
    """Fine-tune a causal LM on prompt/response examples with the loss on response tokens only."""

    model: str = "embedded:demo-base"
    """HF checkpoint directory or hub id; `preset:NAME` builds a small model from scratch (once, into the preset cache
    $DATALEVER_CACHE/presets); `embedded:demo-base` is the pretrained demo model shipped with the package."""
    data: str | None = None
    """Training examples: a JSONL, JSON, Parquet or CSV file, a datasets directory, or a hub dataset
    (`openai/gsm8k:main`, name:config); required."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset); default: train."""
    out: str = "runs/train"
    """Output directory: checkpoints, the final model, train_log.jsonl, train_summary.json. A run there of the same
    settings and inputs is resumed (or, finished, returned); one of others is refused unless `overwrite`."""
    manifest: str | None = None
    """Optional multiplicity manifest (from `datalever upsample`): draw each example that many times per epoch without
    copying the data."""
    val_data: str | None = None
    """Validation examples for the periodic validation loss (read with the same data options)."""
    val_split: str | None = None
    """Split of `val_data` when it holds several; default: validation."""
    chat_template: str = "auto"
    """How examples are rendered: auto (the tokenizer's chat template where it has one, else plain text) | none |
    FILE (a Jinja chat template). With a template the loss covers the assistant turns only; see `tokens.Formatter`."""
    epochs: float = 3.0
    """Passes over the (multiplicity-weighted) training data; fractions allowed."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    stop_after_steps: int | None = None
    """End the run after this many optimizer steps while its schedule (warmup, cosine) runs over all of them (epochs or
    max_steps): a part of a longer run, as a proxy profiled from the early checkpoints of a multi-epoch run is (the
    profile's schedule_epochs). None: the run ends where its schedule does."""
    batch_size: int = 32
    """Examples per optimizer step, over all processes."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass on one process (gradient accumulation fills the batch)."""
    max_length: int = 512
    """Maximum tokens per example (prompt + response); longer examples are cut from the right."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer: adamw | muon | sam, learning rate and its own settings."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear learning-rate warmup before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at lr * min_lr_ratio."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient to this global norm; None disables clipping."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings."""
    seed: int = 0
    """Seed for the model preset, the data order and dropout."""
    eval_every: int = 0
    """Compute the validation loss every this many steps (0: only at the end)."""
    save_every: int = 0
    """Also save a resumable checkpoint every this many optimizer steps (0: by time only, `save_every_minutes`, and at
    the end). A step count fits no default: a step takes 0.1 s on a CPU demo and seconds for a 3B model."""
    save_every_minutes: float = 30.0
    """Save a resumable checkpoint once this many minutes have passed since the last one (0: never by time). The
    default bounds what a kill or a preemption loses to half an hour of training on any model or hardware, while a
    checkpoint of a 3B model with AdamW state (~36 GB) costs about a minute to write: a few percent of the time.
    The main process's clock decides, for every process (they save together)."""
    keep_last: int = 1
    """How many resumable checkpoints to keep (the newest; older ones are deleted as new ones are saved)."""
    keep_optimizer_state: bool = False
    """Keep the checkpoints' resume state (trainer_state.pt: the optimizer state, 2-3x the model's size under AdamW;
    the RNG files) after the run has finished. False: once the final model and train_summary.json are written it is
    deleted, and the checkpoints keep their weights only (checkpoints/step-N/model, the master weights), except one at
    the last step whose weights model/ already holds (saved in the master dtype, no LoRA), which goes whole: a
    finished run is returned by a rerun, never resumed."""
    mixed_precision: str = "auto"
    """no | bf16 | auto (bf16 autocast on a GPU that supports it, else float32)."""
    dtype: str = "float32"
    """Dtype of the trained weights: float32 (master weights; autocast does the bf16 math) | bfloat16 | auto (the
    checkpoint's)."""
    save_dtype: str = "auto"
    """Dtype of the final model (model/): auto (bfloat16 when the run computed in bf16, i.e. bf16 mixed precision or
    dtype bfloat16: half the size of float32 and what inference loads; else the weights' own dtype, float32 on a CPU)
    | float32 | bfloat16 | float16. Checkpoints keep the master weights as they trained."""
    attn_implementation: str = "sdpa"
    """Attention kernels: sdpa (PyTorch's scaled_dot_product_attention, flash/memory-efficient kernels on a GPU) |
    flash_attention_2 (the flash-attn package; a CUDA GPU and bf16) | eager (the model's own matmul-softmax-matmul)."""
    tf32: bool = True
    """On CUDA, float32 matmuls in TensorFloat-32 (tensor cores, 10-bit mantissa): faster where float32 math remains
    (mixed_precision no); false: IEEE float32. No effect on a CPU."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward instead of keeping them: about a third more compute for
    much less activation memory (bigger micro-batches, longer sequences). The same numbers."""
    group_by_length: bool = True
    """Sort each step's examples (this process's share) by length before cutting them into micro-batches, so rows of
    similar length are padded together; the step's gradient is the same sum. Never across steps: which examples a
    step takes, and the order of the steps, stay the seeded stream's. False: micro-batches in stream order."""
    torch_compile: bool = False
    """torch.compile every transformer block (in place: the same module names and checkpoints). The first steps pay
    the compilation (and a recompilation for new shapes); later ones run the fused kernels. Dropout inside the blocks
    (LoRA's) then draws other masks than without compiling."""
    log_with: list[str] | None = None
    """Accelerate trackers, e.g. [tensorboard] (pip install 'datalever[tensorboard]', written under
    out/datalever/<run_name>) or [wandb] (project datalever, its files under out/wandb/); they get the full config,
    every step's scalars and at the end the final metrics (final_train_loss, final_val_loss, final_steps,
    final_wall_s). The JSONL log is always written."""
    run_name: str | None = None
    """The run's name in the trackers (wandb's run name, TensorBoard's run directory); default: from `out`,
    <run>/<arm>/seed<S> for an experiment's arm (out RUN/arms/<arm>/seed<S>/train), else out's last two path
    components (runs/train)."""
    progress: bool = True
    """Show progress bars."""
    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint (only for checkpoints you trust)."""
    overwrite: bool = False
    """If `out` holds a run of other settings or inputs (what train.meta.json records), delete what train wrote there
    (checkpoints/, model/, adapter/, train_log.jsonl, train_summary.json, train.config.yaml, train.meta.json, the
    trackers' logs) and train again; without it such a run is refused. A run of the same work is always resumed or
    returned, never redone."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse values that cannot work (the input paths are checked by `run`: a config may name data that a
        stage generates later)."""
        DataFormat.__post_init__(self)
        check_chat_template(self.chat_template)
        for name in ("batch_size", "micro_batch_size", "max_length", "epochs", "keep_last"):
            checks.positive(name, getattr(self, name))
        checks.positive("max_steps", self.max_steps, optional=True)
        checks.positive("stop_after_steps", self.stop_after_steps, optional=True)
        checks.positive("max_grad_norm", self.max_grad_norm, optional=True)  # a negative norm would flip the step
        checks.non_negative("eval_every", self.eval_every)
        checks.non_negative("save_every", self.save_every)
        checks.non_negative("save_every_minutes", self.save_every_minutes)
        for name in ("warmup_ratio", "min_lr_ratio"):
            checks.non_negative(name, getattr(self, name))
            checks.at_most(name, getattr(self, name), 1)
        checks.non_negative("seed", self.seed)
        checks.at_most("seed", self.seed, 2**32 - 1)  # numpy's seed range (accelerate seeds numpy too)
        checks.one_of("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        checks.one_of("dtype", self.dtype, DTYPES)
        checks.one_of("save_dtype", self.save_dtype, SAVE_DTYPES)
        check_run_name(self.run_name)
        for name in ("tf32", "gradient_checkpointing", "group_by_length", "torch_compile", "keep_optimizer_state"):
            checks.one_of(name, getattr(self, name), (True, False))
        launch.check_attention(self.attn_implementation, self.mixed_precision, self.dtype)
        if self.torch_compile:
            launch.check_compile_available()
        self.lora.check()


def check_run_name(name: str | None) -> None:
    """A run name becomes TensorBoard's run directory under out/datalever: relative, and never a way out of it."""
    if name is None:
        return
    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise checks.ConfigError(f"run_name must be a relative name without '..' (e.g. exp1/base/seed0), got {name!r}")


# ----------------------------------------------------------------------------- which settings decide the numbers

TRAIN_SETTINGS = Classified(
    # What a run computes: its weights, its logged losses and its summary. A run (finished or checkpointed) is resumed
    # or returned only for the same values (and inputs of the same content).
    decide=(
        "epochs",
        "max_steps",
        "stop_after_steps",  # enters the identity only when set: runs recorded before it existed ran to the end
        "batch_size",
        "max_length",
        "optim",
        "warmup_ratio",
        "min_lr_ratio",
        "max_grad_norm",
        "lora",
        "seed",
        "dtype",
        "mixed_precision",
        "eval_every",  # which steps the log holds a validation loss for
        "attn_implementation",
        "tf32",
        "torch_compile",
        "save_dtype",  # the final model's weights; only as it is in effect (`cast_dtype`), None (as trained) left out
        "chat_template",  # the tokens and the loss mask; a template file by its content (`chat_template_identity`)
    ),
    # What they name counts, not their paths (`inputs.load_inputs`: the model's files, the data's content, the
    # multiplicities); the data options (split, schema, fields, template) decide what is read, hence that content.
    inputs=("model", "data", "val_data", "manifest", "split", "val_split", "schema", "fields", "template"),
    # Change no number: where the run writes and how it is shown, when it saves and what it keeps; like the number of
    # processes, micro_batch_size and group_by_length (how a batch is split into passes: the gradient is the same sum,
    # only its rounding moves), and gradient_checkpointing (the same kernels, run again in the backward).
    ignored=(
        "out",
        "progress",
        "log_with",
        "run_name",
        "save_every",
        "save_every_minutes",
        "keep_last",
        "keep_optimizer_state",
        "trust_remote_code",
        "overwrite",
        "micro_batch_size",
        "group_by_length",
        "gradient_checkpointing",
        "on_conflict",  # whether conflicting labels are refused or only named: the data that is read is the same
    ),
)
LORA_SETTINGS = Classified(decide=("enabled", "r", "alpha", "dropout", "target_modules"), ignored=())
# The speed settings that pick other kernels or another float32 precision, hence other rounding, as they computed
# before they existed: each enters the identity only with another value, so the runs recorded then keep theirs.
KERNELS_BEFORE = {"attn_implementation": "sdpa", "tf32": False, "torch_compile": False}
IDENTITY_FORMAT = 2  # 1: settings only (paths, no contents); such checkpoints cannot be checked and are refused


def resume_identity(cfg: TrainConfig, inputs: dict[str, str | None]) -> str:
    """What a TrainConfig computes, as one string to compare on resume: the settings that decide the numbers and
    `inputs`, what the model spec stands for and the fingerprints of the data (`inputs.load_inputs`)."""
    decide = [name for name in TRAIN_SETTINGS.decide if name != "chat_template"]
    settings = {k: v for k, v in rundir.to_jsonable(cfg).items() if k in decide}
    # Values that a setting makes unused change nothing: epochs under max_steps, the settings of adapters that are
    # never made, of an optimizer that is not built.
    if cfg.max_steps is not None:
        settings["epochs"] = None
    if not cfg.lora.enabled:
        settings["lora"] = {"enabled": False}
    settings["optim"] = settings_in_effect(settings["optim"])
    # bf16 autocast and float32 compute give other numbers: a run continues only with the one it was made with.
    settings["mixed_precision"] = resolve_mixed_precision(cfg.mixed_precision)
    _keep_other_kernels(settings)
    # The final model as trained computes as before save_dtype existed: the setting enters only where it casts.
    settings["save_dtype"] = cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype)
    if settings["save_dtype"] is None:
        del settings["save_dtype"]
    if settings["stop_after_steps"] is None:
        del settings["stop_after_steps"]
    # The rendering decides the tokens and the loss mask. Plain text ("none") is what runs did before the option
    # existed, so it enters only otherwise; a template file by its content (edited in place, it is other work).
    template = chat_template_identity(getattr(cfg, "chat_template", "none"))
    if template is not None:
        settings["chat_template"] = template
    return json.dumps({"format": IDENTITY_FORMAT, "settings": settings, "inputs": inputs}, sort_keys=True)


def chat_template_identity(option: str) -> str | None:
    """None for plain text, "auto" (the tokenizer's template: the model's identity covers it), or a file's hash."""
    if option == "none":
        return None
    if option == "auto":
        return "auto"
    return "file:" + file_sha256(Path(option).expanduser())[:16]


def _keep_other_kernels(settings: dict) -> None:
    """Drop the kernel settings that compute as before they existed (`KERNELS_BEFORE`); tf32 as it is in effect."""
    settings["tf32"] = tf32_in_effect(settings["tf32"])
    for name, before in KERNELS_BEFORE.items():
        if settings[name] == before:
            del settings[name]


def cast_dtype(save_dtype: str, mixed_precision: str, dtype: str) -> str | None:
    """The dtype the final model is cast to when saved, None for none (the weights' own dtype, `dtype`).

    auto: bfloat16 where the run computed in bf16 (bf16 autocast over float32 master weights: what inference loads,
    at half the size), else as trained."""
    if save_dtype == "auto":
        save_dtype = "bfloat16" if resolve_mixed_precision(mixed_precision) == "bf16" else dtype
    return None if save_dtype in (dtype, "auto") else save_dtype


def identity_differences(saved: str | dict, now: str | dict) -> list[str]:
    """What differs between two `resume_identity`s, one short phrase per setting or input."""
    saved = json.loads(saved) if isinstance(saved, str) else saved
    now = json.loads(now) if isinstance(now, str) else now
    if saved.get("format") != now.get("format"):
        return ["made by an earlier datalever version, whose record holds no input contents"]
    diffs = [f"{k} {_shown(old)} -> {_shown(new)}" for k, old, new in differences(saved["settings"], now["settings"])]
    for name in sorted(saved["inputs"].keys() | now["inputs"].keys()):
        old, new = saved["inputs"].get(name), now["inputs"].get(name)
        if old != new:
            diffs.append(f"{name}: {_input_change(name, old, new)}")
    return diffs


def _shown(value) -> str:
    return "unused" if value is MISSING else repr(value)  # left out as unused (lora off, another optimizer)


def _input_change(name: str, old: str | None, new: str | None) -> str:
    if old is None or new is None:
        return "none before" if old is None else "none now"
    if name == "model" and not (old.startswith(DIRECTORY) and new.startswith(DIRECTORY)):
        return f"{old!r} -> {new!r}"  # specs (preset, hub id) or a spec for a directory: say which
    return "other content"
