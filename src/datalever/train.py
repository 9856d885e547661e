"""Fine-tune a causal LM on a dataset with the response-only loss (AdamW, Muon or SAM; full or LoRA).

`run` is three steps. `setup` starts the launch (`launch`: one code path through Accelerate for CPU,
one GPU, DDP and FSDP2), loads the model, its optimizer and the data, and picks up the latest
checkpoint if there is one. `train_loop` runs the optimizer steps: each takes the next `batch_size`
examples of a seeded stream (every example as many times per epoch as its multiplicity, reshuffled
each epoch), splits them over processes and micro-batches, and calls `optim.optimizer_step`; the
stream position, optimizer state, RNG and weights are checkpointed together (`checkpoint`), so a
killed run resumes where it stopped and ends where an uninterrupted run ends. A checkpoint is saved every
`save_every_minutes` (the main process's clock, its decision shared by every process), every `save_every` steps
and at the end; the newest `keep_last` are kept. `finish` saves the final model (in `save_dtype`) and the summary,
then deletes the checkpoints' optimizer state (a finished run is returned, never resumed) and a last-step
checkpoint whose weights model/ holds, and sends the final metrics to the trackers (`log_with`, the run named by
`run_name`).

The speed settings (attn_implementation, tf32, optim.fused, gradient_checkpointing, group_by_length,
torch_compile) choose kernels and schedules, never the data or the optimizer: at their defaults a CPU computes what
it computed before they existed, and those that pick other kernels enter the resume identity.

With N processes each step's batch is split evenly (batch_size must be a multiple of N) and the loss
is weighted so that the gradient equals the one a single process computes on the whole batch (SAM
under DDP excepted: each process perturbs with its own gradient; under FSDP SAM perturbs with the
whole batch's gradient, as one process does).

`out` holds one run. Before any model is loaded, `run` checks the options (bad values, missing inputs,
outputs that would overwrite an input) and what `out` already holds: train.meta.json records what made
the run there (`checkpoint.resume_identity`: the settings that decide the numbers and the contents of
the model, data and validation data). The same work is resumed or its summary returned; other work is
refused, or with `overwrite` replaced (only the paths train writes, `train_outputs`, are removed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from datalever import checkpoint, checks, launch, rundir
from datalever.checkpoint import Progress
from datalever.examples import DataFormat, Example, local_data, read_data
from datalever.launch import make_accelerator, prepare
from datalever.losses import ResponseLoss
from datalever.models import (
    DTYPES,
    EMBEDDED_PREFIX,
    count_parameters,
    is_preset,
    load_model,
    load_tokenizer,
    resolve_model,
)
from datalever.optim import (
    SAM,
    MultiOptimizer,
    OptimConfig,
    StepStats,
    build_optimizer,
    lr_factor,
    optimizer_step,
    set_lr,
)
from datalever.sampler import epoch_order
from datalever.tokens import Encoded, Formatter, Truncation, check_chat_template, collate, loss_positions

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

STAGE = "train"  # names its provenance files: train.config.yaml, train.meta.json
TRACKER_PROJECT = "datalever"  # the trackers' project (wandb's); TensorBoard writes under out/<this>/<run name>
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


# ----------------------------------------------------------------------------- data


class ExampleStream:
    """An endless seeded stream of example indices, epoch after epoch of `sampler.epoch_order`; position p
    says how many were drawn so far."""

    def __init__(self, multiplicities: Sequence[int], seed: int):
        self.multiplicities = list(multiplicities)
        self.seed = seed
        self.epoch_len = sum(self.multiplicities)
        if self.epoch_len <= 0:
            raise ValueError("every multiplicity is 0: an epoch would draw no example")
        self._cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.multiplicities, self.seed, epoch))
        return self._cache[1]

    def take(self, position: int, n: int) -> list[int]:
        return [self._order(p // self.epoch_len)[p % self.epoch_len] for p in range(position, position + n)]


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
    identity: str  # `checkpoint.resume_identity`: what a checkpoint or a finished run must share to be reused


def load_inputs(cfg: TrainConfig) -> TrainInputs:
    """Read the data and fingerprint the inputs (a local model directory by its files)."""
    model = checkpoint.model_identity(cfg.model)
    examples, multiplicities = load_training_data(cfg)
    val_examples = load_validation_data(cfg)
    fingerprints = {
        "model": model,
        "data": rundir.content_fingerprint(examples),
        "multiplicities": checkpoint.counts_fingerprint(multiplicities),
        "val_data": rundir.content_fingerprint(val_examples) if cfg.val_data else None,
    }
    return TrainInputs(examples, multiplicities, val_examples, checkpoint.resume_identity(cfg, fingerprints))


# ----------------------------------------------------------------------------- the output directory


class OtherRunError(RuntimeError):
    """`out` holds a run of other settings or inputs."""


def train_outputs(layout: rundir.TrainDir) -> list[Path]:
    """Every path train writes under `out`: all that `overwrite` removes (and all an input must stay clear of)."""
    config_file, meta_file = rundir.provenance_files(layout.root, STAGE)
    return [
        layout.checkpoints,
        layout.model,
        layout.adapter,
        layout.log,
        layout.summary,
        config_file,
        meta_file,
        layout.root / TRACKER_PROJECT,
        layout.root / "wandb",  # wandb's files (tracker_init_kwargs)
    ]


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


def input_paths(cfg: TrainConfig) -> dict[str, str]:
    """The options that name local inputs (a preset, embedded or hub model is no path of the user's)."""
    paths = {"data": cfg.data, "val_data": cfg.val_data, "manifest": cfg.manifest}
    local_model = not is_preset(cfg.model) and not cfg.model.startswith(EMBEDDED_PREFIX)
    if local_model and Path(cfg.model).expanduser().exists():
        paths["model"] = cfg.model
    return {option: path for option, path in paths.items() if path is not None}


def check_no_overlap(cfg: TrainConfig) -> None:
    """Refuse an `out` where train would write over, around or inside one of its inputs (`--model D/model --out D`
    would replace the model being fine-tuned)."""
    written = [path.resolve() for path in train_outputs(rundir.TrainDir(Path(cfg.out).expanduser()))]
    for option, given in input_paths(cfg).items():
        source = Path(given).expanduser().resolve()
        for path in written:
            if path == source or source.is_relative_to(path) or path.is_relative_to(source):
                raise checks.ConfigError(
                    f"out={cfg.out}: train would write {path}, which overlaps {option}={given}; "
                    f"choose an --out apart from the inputs"
                )


def other_run(layout: rundir.TrainDir, identity: str) -> str | None:
    """What `out` holds if it is other work than this run, in a phrase; None if it holds nothing of train's or a run
    of the same work (to resume, or finished)."""
    found = [path.name for path in train_outputs(layout) if path.exists()]
    if not found:
        return None
    meta_file = rundir.provenance_files(layout.root, STAGE)[1]
    recorded = rundir.read_json(meta_file).get("identity") if meta_file.exists() else None
    if recorded is None:  # made by an earlier version, or not by train: nothing says what made it
        return f"{', '.join(found)} but no record of the run that made them ({meta_file.name})"
    differences = checkpoint.identity_differences(recorded, identity)
    if not differences:
        return None
    shown = "; ".join(differences[:4]) + (f"; ... ({len(differences) - 4} more)" if len(differences) > 4 else "")
    return f"a training run with other settings or inputs ({shown})"


def remove_earlier_run(layout: rundir.TrainDir, accelerator: Accelerator) -> None:
    """Delete what train wrote in `out` (and the temporary files a killed write left beside them), nothing else."""
    if accelerator.is_main_process:
        for path in train_outputs(layout):
            for found in [path, *stale_temporaries(layout, path)]:
                remove_path(found)
    accelerator.wait_for_everyone()


def stale_temporaries(layout: rundir.TrainDir, output: Path) -> list[Path]:
    """The temporaries a killed atomic write of `output` left beside it (`rundir.atomic_dir`, `atomic_write_bytes`)."""
    return list(layout.root.glob(f".{output.name}.*.tmp"))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_temporaries(layout: rundir.TrainDir, accelerator: Accelerator) -> None:
    """Before a run starts or resumes: clear what killed writes left (a final model's or a checkpoint's temporary
    directory is as big as the model); a complete checkpoint caught before its rename is put in place instead
    (`checkpoint.clean_temporaries`). Only this run writes in `out`, so no temporary there is in use."""
    if accelerator.is_main_process:
        for path in train_outputs(layout):
            for found in stale_temporaries(layout, path):
                remove_path(found)
        checkpoint.clean_temporaries(layout)
    accelerator.wait_for_everyone()


def total_steps(cfg: TrainConfig, epoch_len: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * epoch_len / cfg.batch_size))


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """Warmup length: ceil(warmup_ratio * steps), as transformers' TrainingArguments counts it."""
    return math.ceil(cfg.warmup_ratio * steps)


def micro_batches(encoded: Sequence[Encoded], size: int, pad_id: int, device, sort: bool = True) -> list[dict]:
    # Sorting by length inside a step changes nothing in the gradient (it is a sum) but pads less: for micro-batches
    # of a fixed size, consecutive runs of the sorted rows pad the least.
    rows = sorted(encoded, key=lambda e: len(e.input_ids)) if sort else list(encoded)
    return [_on_device(collate(rows[i : i + size], pad_id), device) for i in range(0, len(rows), size)]


def _on_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch with its loss positions (found on the host: no synchronisation in the forward) on `device`."""
    batch["positions"] = loss_positions(batch["labels"])
    return {k: v.to(device) for k, v in batch.items()}


def scaled_loss_fn(scale: float) -> Callable:
    """The loss function for `optim.optimizer_step`: the micro-batch's response-loss sum times `scale`, and its
    response-token count."""

    def loss_fn(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = model(**batch)
        loss = sums.sum()
        # The count stays a device tensor: optimizer_step reads it once per pass, not once per micro-batch.
        return (loss if scale == 1.0 else loss * scale), counts.sum()

    return loss_fn


# ----------------------------------------------------------------------------- set-up


@dataclass
class TrainJob:
    """What `setup` made, for `train_loop` and `finish`."""

    cfg: TrainConfig
    layout: rundir.TrainDir
    accelerator: Accelerator
    model: torch.nn.Module  # ResponseLoss around the HF model, wrapped for the launch (DDP, FSDP2 or nothing)
    opt: MultiOptimizer | SAM
    tokenizer: Any
    model_path: str  # the resolved cfg.model
    n_params: int
    trainable: int  # trainable parameters (LoRA: the adapters)
    n_examples: int  # distinct training examples
    encoded: list[Encoded]  # the training examples, indexed by the stream
    val_encoded: list[Encoded]
    stream: ExampleStream
    steps: int
    warmup: int
    identity: str  # what a checkpoint must share to be resumed (`checkpoint.resume_identity`)
    progress: Progress  # where the run stands: updated by every step, saved by every checkpoint
    truncation: Truncation  # how many trained examples max_length cut


def apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    if targets is not None and list(targets) == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand: every linear layer but the output head
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_cfg)


def load_trainable_model(cfg: TrainConfig, accelerator: Accelerator):
    """(resolved model path, tokenizer, HF model in train mode, with LoRA adapters if asked)."""
    from accelerate.utils import set_seed

    with accelerator.main_process_first():  # a preset is built once, by the main process
        model_path = resolve_model(cfg.model, seed=cfg.seed)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    # transformers >= 5 loads a checkpoint in its stored dtype by default: a bf16 checkpoint would be
    # trained in pure bf16. cfg.dtype (float32 by default) keeps float32 master weights.
    hf_model = load_model(
        model_path,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    # Seeded after loading, so the LoRA init and dropout do not depend on whether a preset was just built.
    set_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        launch.enable_gradient_checkpointing(hf_model)
    if cfg.lora.enabled:
        hf_model = apply_lora(hf_model, cfg.lora)
    if cfg.torch_compile:  # last: the blocks compiled are the ones that train (LoRA layers and checkpointing in them)
        launch.compile_blocks(hf_model)
    hf_model.train()  # from_pretrained returns a model in eval mode (dropout off)
    return model_path, tokenizer, hf_model


def setup(cfg: TrainConfig, inputs: TrainInputs, *, replace: bool = False) -> TrainJob:
    """The launch, the model and its optimizer, the encoded data, and the progress of the latest checkpoint;
    `replace`: first delete the run of other work in `out` (`remove_earlier_run`)."""
    layout = rundir.TrainDir(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, trackers(cfg), str(layout.root))
    launch.set_tf32(cfg.tf32)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of the number of processes ({accelerator.num_processes})"
        )
    if replace:
        remove_earlier_run(layout, accelerator)
    remove_temporaries(layout, accelerator)
    model_path, tokenizer, hf_model = load_trainable_model(cfg, accelerator)
    n_params, trainable = count_parameters(hf_model), count_parameters(hf_model, trainable_only=True)
    last = checkpoint.latest(layout)
    saved = checkpoint.read_state(last, inputs.identity) if last is not None else None
    if last is not None:
        checkpoint.load_weights(last, hf_model)  # before wrapping: FSDP shards what is loaded here
    # The parameters move to the accelerator's device in `prepare`: the optimizer is told where they will train.
    opt = build_optimizer(hf_model, cfg.optim, device=accelerator.device)
    model = prepare(accelerator, ResponseLoss(hf_model), opt)

    formatter = Formatter(tokenizer, cfg.chat_template)
    encoded = [formatter.encode(ex, cfg.max_length) for ex in inputs.examples]
    val_encoded = [formatter.encode(ex, cfg.max_length) for ex in inputs.val_examples]
    stream = ExampleStream(inputs.multiplicities, seed=cfg.seed)
    steps = total_steps(cfg, stream.epoch_len)
    progress = checkpoint.restore(last, saved, accelerator, model, opt) if saved is not None else Progress()
    job = TrainJob(
        cfg=cfg,
        layout=layout,
        accelerator=accelerator,
        model=model,
        opt=opt,
        tokenizer=tokenizer,
        model_path=model_path,
        n_params=n_params,
        trainable=trainable,
        n_examples=len(inputs.examples),
        encoded=encoded,
        val_encoded=val_encoded,
        stream=stream,
        steps=steps,
        warmup=warmup_steps(cfg, steps),
        identity=inputs.identity,
        progress=progress,
        # Only the examples the stream draws (a manifest may give some multiplicity 0) are trained on.
        truncation=Truncation.of([e for e, m in zip(encoded, inputs.multiplicities) if m > 0], cfg.max_length),
    )
    start_logs(job, inputs.examples)
    return job


def start_logs(job: TrainJob, examples: list[Example]) -> None:
    """Cut the JSONL log back to the checkpoint, record the run's provenance and identity, say how much max_length
    cuts, start the trackers."""
    cfg, accelerator = job.cfg, job.accelerator
    if accelerator.is_main_process:
        checkpoint.truncate_log(job.layout.log, job.progress.step)  # lines after the checkpoint are redone
        rundir.record_provenance(
            job.layout.root,
            STAGE,
            cfg,
            identity=json.loads(job.identity),
            data_fingerprint=rundir.fingerprint(examples),
            model_path=job.model_path,
            n_params=job.n_params,
            total_steps=job.steps,
            world_size=accelerator.num_processes,
            truncation=dataclasses.asdict(job.truncation),
        )
        if job.truncation.warning():
            log.warning("train: %s", job.truncation.warning())
    accelerator.wait_for_everyone()
    accelerator.init_trackers(TRACKER_PROJECT, config=tracked_config(cfg), init_kwargs=tracker_init_kwargs(cfg))


# ----------------------------------------------------------------------------- trackers


def run_name(cfg: TrainConfig) -> str:
    """cfg.run_name, or one from `out`: <run>/<arm>/seed<S> for an experiment's arm (`rundir.RunDir.seed_dir`'s
    train/), else out's last two path components."""
    if cfg.run_name:
        return cfg.run_name
    parts = Path(cfg.out).expanduser().resolve().parts[1:]  # without the root ("/")
    if len(parts) >= 5 and parts[-1] == "train" and parts[-2].startswith("seed") and parts[-4] == "arms":
        return "/".join((parts[-5], parts[-3], parts[-2]))
    return "/".join(parts[-2:])


def tracker_init_kwargs(cfg: TrainConfig) -> dict:
    """What Accelerate hands the trackers it builds itself (TensorBoard's is built in `trackers`): the run's name,
    and for wandb its files under `out` (out/wandb/), not in whatever directory the command was started from."""
    name = run_name(cfg)
    return {"wandb": {"name": name, "dir": str(rundir.TrainDir(cfg.out).root)}, "mlflow": {"run_name": name}}


def trackers(cfg: TrainConfig) -> list | None:
    """cfg.log_with for Accelerate, with TensorBoard's tracker built here to write into out/datalever/<run name>
    (Accelerate's own writes into out/datalever, one directory whatever the run's name)."""
    from accelerate.utils import is_tensorboard_available

    if not cfg.log_with or not is_tensorboard_available():  # without it Accelerate's own refusal names the package
        return cfg.log_with
    from accelerate.tracking import TensorBoardTracker

    logging_dir = str(rundir.TrainDir(cfg.out).root / TRACKER_PROJECT)
    return [TensorBoardTracker(run_name(cfg), logging_dir) if str(t) == "tensorboard" else t for t in cfg.log_with]


def tracked_config(cfg: TrainConfig) -> dict:
    """Every setting, flattened (optim.lr), as trackers take hyperparameters: lists as text (TensorBoard keeps only
    numbers, text and booleans), the run name as in effect."""
    flat = rundir.flatten(rundir.to_jsonable(cfg))
    flat["run_name"] = run_name(cfg)
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()}


def log_final_metrics(job: TrainJob, summary: dict) -> None:
    """The run's outcome at its last step, for the trackers' comparisons of runs (a None loss left out)."""
    metrics = {
        "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"],
        "final_steps": summary["steps"],
        "final_wall_s": summary["compute"]["wall_s"],
    }
    job.accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=job.steps)


# ----------------------------------------------------------------------------- the loop


def clock() -> float:
    """Seconds on a monotonic clock: what `SaveTimer` reads (a test replaces it)."""
    return time.monotonic()


class SaveTimer:
    """Whether a checkpoint is due by time: `minutes` since the last save (or the loop's start), on the main
    process's clock. Under several processes its decision is broadcast to all: their clocks differ a little, and a
    save that some processes start and others do not (its gathers are collectives) would hang them all."""

    def __init__(self, minutes: float, accelerator: Accelerator):
        self.seconds = minutes * 60
        self.accelerator = accelerator
        self.last = clock()

    def due(self) -> bool:
        if not self.seconds:
            return False
        due = clock() - self.last >= self.seconds
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            # One int per step, beside a step's own collectives (its gradients' all-reduce): no measurable cost.
            flag = torch.tensor([int(due)], device=self.accelerator.device)
            due = bool(broadcast(flag, from_process=0).item())
        return due

    def saved(self) -> None:
        self.last = clock()


def checkpoint_due(job: TrainJob, checkpoint_steps: set[int], timer: SaveTimer) -> bool:
    """The same answer on every process: steps all know; the timer's decision is the main process's."""
    step, every = job.progress.step, job.cfg.save_every
    return (every and step % every == 0) or step == job.steps or step in checkpoint_steps or timer.due()


def train_loop(job: TrainJob, on_step: Callable | None, checkpoint_steps: set[int]) -> None:
    """Optimizer steps up to `job.steps`: each logged, shown to `on_step`, checkpointed when due."""
    from tqdm.auto import tqdm

    cfg, progress = job.cfg, job.progress
    timer = SaveTimer(cfg.save_every_minutes, job.accelerator)
    show = cfg.progress and job.accelerator.is_local_main_process
    bar = tqdm(total=job.steps, initial=progress.step, desc=f"train {cfg.optim.name}", disable=not show)
    start = time.perf_counter() - progress.compute.wall_s  # a resumed run continues the checkpoint's clock
    while progress.step < job.steps:
        t0 = time.perf_counter()
        stats, tokens = train_step(job)
        progress.compute.wall_s = time.perf_counter() - start
        record = log_step(job, stats, tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_step is not None:
            hook_start = time.perf_counter()
            on_step(progress.step, record, job.model, job.accelerator)
            start += time.perf_counter() - hook_start  # compute.wall_s counts training, not the caller's hook
        if checkpoint_due(job, checkpoint_steps, timer):
            sync_log(job)
            checkpoint.save(
                job.layout,
                job.accelerator,
                job.model,
                job.opt,
                job.tokenizer,
                progress,
                identity=job.identity,
                keep=cfg.keep_last,
            )
            timer.saved()
    bar.close()


def sync_log(job: TrainJob) -> None:
    """Put the log on disk before the checkpoint that resumes after its last line: a power loss can then tear only
    lines that the resume redoes."""
    if job.accelerator.is_main_process and job.layout.log.exists():
        with open(job.layout.log, "a") as f:
            os.fsync(f.fileno())


def train_step(job: TrainJob) -> tuple[StepStats, int]:
    """The next optimizer step, on the next `batch_size` examples of the stream, counted in `job.progress`:
    its stats (the whole batch's losses) and the batch's tokens (all processes, padding excluded)."""
    cfg, progress = job.cfg, job.progress
    idx = job.stream.take(progress.position, cfg.batch_size)
    progress.position += cfg.batch_size
    set_lr(job.opt, lr_factor(progress.step, job.steps, job.warmup, cfg.min_lr_ratio))
    stats, n_micro = optimize_batch(job, idx)
    progress.step += 1
    tokens = sum(len(job.encoded[i].input_ids) for i in idx)
    progress.compute.add_step(
        stats,
        micro_batches=n_micro,
        world=job.accelerator.num_processes,
        tokens=tokens,
        params=job.n_params,
        trainable=job.trainable,
    )
    return stats, tokens


def optimize_batch(job: TrainJob, idx: list[int]) -> tuple[StepStats, int]:
    """One optimizer update on the batch `idx` (all processes' examples), this process taking its share in
    micro-batches: the update's stats with the losses of the whole batch, and this process's micro-batch count."""
    accelerator, cfg = job.accelerator, job.cfg
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [job.encoded[i] for i in idx[rank::world]]
    # Every process knows the whole batch, hence the global response-token count: scaling this process's
    # loss sum by world * n_mine / n_all makes DDP's gradient mean equal the token-weighted mean of the
    # whole batch, i.e. exactly what one process computes with the same batch.
    n_resp = [response_tokens(job.encoded[i]) for i in idx]
    n_all, n_mine = sum(n_resp), sum(n_resp[rank::world])
    scale = world * n_mine / n_all if world > 1 and n_all > 0 else 1.0
    batches = micro_batches(
        mine, cfg.micro_batch_size, job.tokenizer.pad_token_id, accelerator.device, sort=cfg.group_by_length
    )
    # n_mine is this process's loss-carrying tokens, known before the first forward: each micro-batch's loss is
    # normalized before its backward (required under FSDP, where .grad already mixes all processes). Counted from
    # the encoded lengths, it is exactly the labels' count (`response_tokens`) without reading the device.
    stats = optimizer_step(
        job.model,
        job.opt,
        batches,
        scaled_loss_fn(scale),
        n_tokens=n_mine,
        accelerator=accelerator,
        max_grad_norm=cfg.max_grad_norm,
    )
    if world > 1:
        stats = batch_losses(accelerator, stats)
    return stats, len(batches)


def response_tokens(encoded: Encoded) -> int:
    """The loss-carrying positions of an example, as `tokens.collate` labels them (none when max_length cut the
    response away), from its lengths alone."""
    return max(encoded.n_response, 0)


def batch_losses(accelerator: Accelerator, stats: StepStats) -> StepStats:
    """`stats` with the whole batch's losses: each process's are its loss * world * n_mine / n_all, so their
    mean over the processes is the batch loss."""
    sam_loss = stats.sam_loss if stats.sam_loss is not None else 0.0
    both = torch.tensor([stats.loss, sam_loss], dtype=torch.float64, device=accelerator.device)
    both = accelerator.reduce(both, reduction="mean")
    return dataclasses.replace(
        stats, loss=float(both[0]), sam_loss=float(both[1]) if stats.sam_loss is not None else None
    )


def log_step(job: TrainJob, stats: StepStats, tokens_per_s: float) -> dict:
    """The step's log record (with the validation loss when due), appended to the JSONL log and sent to the
    trackers."""
    cfg, step = job.cfg, job.progress.step
    record = {
        "step": step,
        "epoch": job.progress.position / job.stream.epoch_len,
        "loss": stats.loss,
        "lr": job.opt.param_groups[0]["lr"],
        "grad_norm": stats.grad_norm,
        "tokens_per_s": tokens_per_s,
        **{f"compute_{k}": v for k, v in job.progress.compute.__dict__.items()},
    }
    if stats.sam_loss is not None:
        record["sam_loss"] = stats.sam_loss
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == job.steps:
        record["val_loss"] = validation_loss(
            job.model, job.val_encoded, job.tokenizer.pad_token_id, job.accelerator, cfg.micro_batch_size
        )
    if job.accelerator.is_main_process:
        with open(job.layout.log, "a") as f:
            f.write(json.dumps(record) + "\n")
    job.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
    return record


@torch.no_grad()
def validation_loss(
    model, val_encoded: Sequence[Encoded], pad_id: int, accelerator, batch_size: int = 8
) -> float | None:
    """Token-weighted mean response loss over the validation examples, through the prepared model.

    Each process scores every world_size-th example; all processes run the same number of forward
    passes (a short one pads with a repeated batch whose result is dropped), as DDP and FSDP need.
    """
    scorable = [e for e in val_encoded if not e.fully_truncated]
    if not scorable:
        return None
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = scorable[rank::world]
    n_batches = math.ceil(math.ceil(len(scorable) / world) / batch_size)
    batches = micro_batches(mine, batch_size, pad_id, accelerator.device) if mine else []
    filler = micro_batches(scorable[:1], 1, pad_id, accelerator.device)[0]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    for i in range(n_batches):
        sums, counts = model(**(batches[i] if i < len(batches) else filler))
        if i < len(batches):
            total += torch.stack([sums.sum().double(), counts.sum().double()])
    model.train(was_training)
    if world > 1:
        total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1]) if total[1] > 0 else None


# ----------------------------------------------------------------------------- the end


def finish(job: TrainJob) -> dict:
    """Save the final model and the summary, written last (its presence marks a finished run)."""
    accelerator = job.accelerator
    final_loss, final_val_loss = final_losses(job.layout.log)
    summary = {
        "steps": job.steps,
        "n_params": job.n_params,
        "trainable_params": job.trainable,
        "examples": job.n_examples,
        "epoch_len": job.stream.epoch_len,
        "compute": job.progress.compute.__dict__,
        "final_train_loss": final_loss,
        "final_val_loss": final_val_loss,
        "optimizer": job.cfg.optim.name,
        "lora": job.cfg.lora.enabled,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "truncation": dataclasses.asdict(job.truncation),
    }
    save_model(job)
    if accelerator.is_main_process:
        rundir.write_json(job.layout.summary, summary)
        # Only now: until the summary marks the run finished, a kill resumes it from the last checkpoint.
        if not job.cfg.keep_optimizer_state:
            checkpoint.drop_resume_state(job.layout, same_as_model=job.steps if model_is_master_copy(job.cfg) else None)
    accelerator.wait_for_everyone()
    return summary


def model_is_master_copy(cfg: TrainConfig) -> bool:
    """Whether the final model/ holds the master weights as they are (no cast, no LoRA merge): then it is the same
    as a checkpoint at the last step."""
    return not cfg.lora.enabled and checkpoint.cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype) is None


def final_losses(log_path: Path) -> tuple[float | None, float | None]:
    """The last training loss and the last validation loss in the JSONL log."""
    loss = val_loss = None
    for record in checkpoint.read_log(log_path) if log_path.exists() else []:
        val_loss = record.get("val_loss", val_loss)
        loss = record.get("loss", loss)
    return loss, val_loss


def save_model(job: TrainJob) -> None:
    """The final model as a plain HF directory with its tokenizer (LoRA merged, the adapter saved beside it), in
    `save_dtype`.

    Every process calls it (the weights are gathered under FSDP); the main process writes.
    """
    state_dict = checkpoint.full_state_dict(job.accelerator, job.model)
    if not job.accelerator.is_main_process:
        return
    inner = job.accelerator.unwrap_model(job.model).model
    cfg = job.cfg
    dtype = checkpoint.cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype)
    with rundir.atomic_dir(job.layout.model) as tmp:
        if cfg.lora.enabled:
            model = merge_lora(job, inner, state_dict)
            weights = None if dtype is None else cast_weights(model.state_dict(), dtype)  # None: the model's own
        else:
            model, weights = inner, cast_weights(state_dict, dtype)
        model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        if dtype is not None:
            record_dtype(model, tmp, dtype)
        job.tokenizer.save_pretrained(tmp)


def cast_weights(state_dict: dict, dtype: str | None) -> dict:
    """The floating-point tensors in `dtype` (None: as they are). Tensors that share storage (tied weights) stay one
    tensor, so save_pretrained still sees them tied."""
    if dtype is None:
        return state_dict
    target = getattr(torch, dtype)
    cast: dict[tuple, torch.Tensor] = {}

    def one(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if key not in cast:
            cast[key] = v.to(target)
        return cast[key]

    return {k: one(v) for k, v in state_dict.items()}


def record_dtype(model, directory: Path, dtype: str) -> None:
    """config.json as save_pretrained wrote it but with the saved weights' dtype (it records the live model's), so
    that a loader asking for the stored dtype gets `dtype`."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(directory)


def merge_lora(job: TrainJob, peft_model, state_dict: dict):
    """Save the adapter; return the base model with the adapter merged in."""
    with rundir.atomic_dir(job.layout.adapter) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if job.accelerator.is_fsdp2:  # the live weights are shards: merge into a fresh copy of the base model
        from peft import PeftModel

        base = load_model(job.model_path, dtype=job.cfg.dtype, trust_remote_code=job.cfg.trust_remote_code)
        peft_model = PeftModel.from_pretrained(base, job.layout.adapter)
    return peft_model.merge_and_unload()


# ----------------------------------------------------------------------------- run


def run(cfg: TrainConfig, on_step: Callable | None = None, checkpoint_steps: set[int] | None = None) -> dict:
    """Train, checkpoint, resume if a checkpoint of the same work exists; returns the summary (also written to out).

    `on_step(step, record, model, accelerator)` runs after every optimizer step, before that step's
    checkpoint (the profile stage records losses there); `checkpoint_steps` adds steps at which a
    resumable checkpoint is saved.
    """
    check_inputs(cfg)
    inputs = load_inputs(cfg)
    layout = rundir.TrainDir(cfg.out)
    other = other_run(layout, inputs.identity)
    if other and not cfg.overwrite:
        raise OtherRunError(
            f"{layout.root} holds {other}: use a new --out, or --overwrite true to delete train's files there "
            f"and train again"
        )
    if other is None and layout.summary.exists():
        return rundir.read_json(layout.summary)  # the same work, finished before: nothing to do
    job = setup(cfg, inputs, replace=other is not None)
    train_loop(job, on_step, checkpoint_steps or set())
    summary = finish(job)
    log_final_metrics(job, summary)
    # Not accelerator.end_training(): it also destroys the process group, which a caller running several
    # stages in one torchrun (profile, then every arm) still needs.
    for tracker in job.accelerator.trackers:
        tracker.finish()
    return summary
