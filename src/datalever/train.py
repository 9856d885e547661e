"""Fine-tune a causal LM on a dataset with the response-only loss (AdamW, Muon or SAM; full or LoRA).

One code path through Accelerate for CPU, one GPU, DDP and FSDP. The loop is plain on purpose:
each optimizer step takes the next `batch_size` examples of a seeded stream (every example as
many times per epoch as its multiplicity, reshuffled each epoch), splits them over processes and
micro-batches, and calls `optim.optimizer_step`. The stream position, optimizer state, RNG and
weights are checkpointed together, so a killed run resumes where it stopped and ends where an
uninterrupted run ends.

Launch: `python -m datalever train ...` (one process: CPU or one GPU), `torchrun --nproc_per_node N
-m datalever train ...` (DDP; on a machine without GPUs the processes talk over gloo), or
`accelerate launch --config_file configs/accelerate/fsdp2.yaml -m datalever train ...` (FSDP2: parameters,
gradients and optimizer state sharded; checkpoints hold the full state, so a run resumes on any number
of processes). With N processes each step's batch is split evenly
(batch_size must be a multiple of N) and the loss is weighted so that the gradient equals the one a
single process computes on the whole batch (SAM under DDP excepted: each process perturbs with its own
gradient; under FSDP SAM perturbs with the whole batch's gradient, as one process does).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from datalever import rundir
from datalever.examples import Example, load_examples
from datalever.losses import ResponseLoss
from datalever.models import count_parameters, load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig, build_optimizer, is_dtensor, lr_factor, optimizer_step, set_lr
from datalever.sampler import MultiplicitySampler
from datalever.tokens import IGNORE, Encoded, collate, encode_example


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


@dataclass
class TrainConfig:
    """Fine-tune a causal LM on prompt/response examples with the loss on response tokens only."""

    model: str = "embedded:demo-base"
    """HF checkpoint directory or hub id; `preset:NAME` builds a small model from scratch; `embedded:demo-base` is the
    pretrained demo model shipped with the package."""
    data: str = "runs/demo/data/train.jsonl"
    """Training examples (JSONL, JSON, Parquet, CSV or a datasets directory)."""
    out: str = "runs/train"
    """Output directory: checkpoints, the final model, train_log.jsonl, train_summary.json."""
    models_dir: str | None = None
    """Where `preset:NAME` models are built (default: beside `out`)."""
    manifest: str | None = None
    """Optional multiplicity manifest (from `datalever upsample`): draw each example that many times per epoch without
    copying the data."""
    val_data: str | None = None
    """Validation examples for the periodic validation loss."""
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
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 1
    """How many resumable checkpoints to keep."""
    mixed_precision: str = "auto"
    """no | bf16 | auto (bf16 autocast on a GPU that supports it, else float32)."""
    dtype: str = "float32"
    """Dtype of the trained weights: float32 (master weights; autocast does the bf16 math) | bfloat16 | auto (the
    checkpoint's)."""
    log_with: list[str] | None = None
    """Accelerate trackers, e.g. [tensorboard] (pip install 'datalever[tensorboard]') or [wandb]; written under `out`;
    the JSONL log is always written."""
    progress: bool = True
    """Show progress bars."""
    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint (only for checkpoints you trust)."""


@dataclass
class Compute:
    """What a run spent: the currency for comparing arms and optimizers."""

    optimizer_steps: int = 0
    forwards: int = 0  # forward passes over micro-batches
    backwards: int = 0
    tokens: int = 0  # tokens through the forward passes (padding excluded)
    flops: float = 0.0  # estimate: 2*params*tokens per forward, 4*params*tokens per backward
    wall_s: float = 0.0


# ----------------------------------------------------------------------------- data stream


class ExampleStream:
    """An endless seeded stream of example indices; position p says how many were drawn so far."""

    def __init__(self, multiplicities: Sequence[int], seed: int):
        self.sampler = MultiplicitySampler(list(multiplicities), seed=seed)
        self.epoch_len = sum(multiplicities)
        if self.epoch_len <= 0:
            raise ValueError("every multiplicity is 0: an epoch would draw no example")
        self._cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.sampler.epoch_indices(epoch))
        return self._cache[1]

    def take(self, position: int, n: int) -> list[int]:
        return [self._order(p // self.epoch_len)[p % self.epoch_len] for p in range(position, position + n)]


def load_training_data(cfg: TrainConfig) -> tuple[list[Example], list[int]]:
    """Examples and their multiplicities (1 each, unless a manifest says otherwise)."""
    examples = load_examples(cfg.data, on_duplicate="keep_first" if cfg.manifest else "error")
    if not cfg.manifest:
        return examples, [1] * len(examples)
    import pyarrow.parquet as pq

    table = pq.read_table(cfg.manifest).to_pydict()
    mult = dict(zip(table["id"], table["multiplicity"]))
    missing = [ex.id for ex in examples if ex.id not in mult]
    if missing:
        raise ValueError(f"{cfg.manifest}: {len(missing)} training examples have no multiplicity (first: {missing[0]})")
    return examples, [int(mult[ex.id]) for ex in examples]


def total_steps(cfg: TrainConfig, epoch_len: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * epoch_len / cfg.batch_size))


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """Warmup length: ceil(warmup_ratio * steps), as transformers' TrainingArguments counts it."""
    return math.ceil(cfg.warmup_ratio * steps)


def micro_batches(encoded: Sequence[Encoded], size: int, pad_id: int, device) -> list[dict]:
    # Sorting by length inside a step changes nothing in the gradient (it is a sum) but pads less.
    rows = sorted(encoded, key=lambda e: len(e.input_ids))
    return [
        {k: v.to(device) for k, v in collate(rows[i : i + size], pad_id).items()} for i in range(0, len(rows), size)
    ]


def response_loss_fn(model, batch) -> tuple[torch.Tensor, int]:
    sums, counts = model(**batch)
    return sums.sum(), int(counts.sum())


def scaled_loss_fn(scale: float) -> Callable:
    """`response_loss_fn` with the loss sum multiplied by `scale` (1: unchanged, bit for bit)."""
    if scale == 1.0:
        return response_loss_fn

    def fn(model, batch):
        sums, counts = model(**batch)
        return sums.sum() * scale, int(counts.sum())

    return fn


# ----------------------------------------------------------------------------- model set-up


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


def _no_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return False
    try:
        from accelerate.utils import is_mlu_available, is_npu_available

        return not (is_npu_available() or is_mlu_available())
    except ImportError:
        return True


def fsdp_requested() -> bool:
    """An Accelerate FSDP config is in effect (`accelerate launch --config_file fsdp.yaml` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(cfg: TrainConfig, project_dir: str):
    """An Accelerator set up from the environment (torchrun / accelerate launch / plain python).

    Accelerate only treats a torchrun launch as multi-process CPU (gloo) when asked with `cpu=True`;
    without it, N processes on a machine without GPUs each train alone. So `cpu=True` is passed
    exactly when several processes were launched and there is no accelerator device.

    FSDP: only Accelerate's FSDP2 (`fsdp_version: 2`) is supported; its sharded parameters are what
    Muon, SAM and the sharded checkpoints here are written for. Accelerate turns FSDP on only for
    accelerator devices, while torch's FSDP2 also shards over gloo on CPUs: on a machine without
    GPUs the FSDP plugin is switched on by hand, so the same code path runs (and is tested) there.
    """
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    fsdp = fsdp_requested()
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(
            "datalever supports FSDP through Accelerate's FSDP2 only: set `fsdp_version: 2` in the "
            "Accelerate config (FSDP_VERSION=2)"
        )
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and _no_accelerator_device()
    accelerator = Accelerator(mixed_precision=mp, log_with=cfg.log_with, project_dir=project_dir, cpu=cpu)
    if fsdp and cpu and not accelerator.is_fsdp2:
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # What Accelerate itself does on GPUs: the plugin on the accelerator state, the type in both shared states.
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the same environment
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.is_fsdp2 and accelerator.mixed_precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # FSDP2 does mixed precision by casting the gathered weights, not by autocast. Accelerate's policy
        # would also reduce gradients in bf16 and cast every unit's outputs, the root's float32 per-example
        # loss sums included, to bf16. Here gradients are reduced in float32 (as under DDP) and outputs are
        # left as computed: blocks hand on bf16 activations, the loss module its float32 sums.
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    return accelerator


def prepare(accelerator, model: ResponseLoss, opt):
    """Wrap the model for the launch (DDP, FSDP2 or nothing) and point the optimizer at the wrapped parameters.

    Under FSDP2, Accelerate replaces every parameter by a sharded DTensor and re-points the torch
    optimizers passed with the model at the new parameters, in place; our Multi/SAM wrappers hold those
    same optimizer objects, so they follow. Elsewhere the parameters stay the same objects.
    """
    if accelerator.is_fsdp2:
        # Accelerate's transformer-block wrap policy looks for the HF model's block classes on the root module.
        model._no_split_modules = getattr(model.model, "_no_split_modules", None)
        return accelerator.prepare(model, *opt.torch_optimizers())[0]
    return accelerator.prepare(model)


# ----------------------------------------------------------------------------- checkpoints

# Settings that decide the trajectory: a checkpoint made with other values is not resumed.
_RESUME_KEYS = (
    "model",
    "data",
    "manifest",
    "epochs",
    "max_steps",
    "batch_size",
    "max_length",
    "optim",
    "warmup_ratio",
    "min_lr_ratio",
    "max_grad_norm",
    "lora",
    "seed",
    "dtype",
)


def _resume_identity(cfg: TrainConfig) -> str:
    full = rundir.to_jsonable(cfg)
    return json.dumps({k: full[k] for k in _RESUME_KEYS}, sort_keys=True)


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _strip_prefix(state_dict: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def full_state_dict(accelerator, model) -> dict:
    """The model's whole state dict for the main process to save; all processes call it (under FSDP2 the
    other processes get an empty dict).

    Under FSDP2 the shards are gathered one tensor at a time, so no process ever holds more than the
    main process's copy plus one full tensor. (Accelerate's get_state_dict returned the DTensor shards
    themselves on CPU processes, which safetensors cannot write.)
    """
    if not accelerator.is_fsdp2:
        return accelerator.get_state_dict(model)
    # Tied weights (embedding = head) are one parameter under two names: gather it once and give both names
    # the same tensor, so save_pretrained sees the shared storage and drops the copy. The names come from the
    # module tree, the same on every process, so every process runs the same sequence of collectives.
    first_name: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        alias[name] = first_name.setdefault(id(param), name)
    out: dict = {}
    for key, value in model.state_dict().items():
        if alias.get(key, key) != key:
            if accelerator.is_main_process:
                out[key] = out[alias[key]]
            continue
        full = value.full_tensor() if is_dtensor(value) else value
        if accelerator.is_main_process:
            out[key] = full.detach().to("cpu", copy=True)
    return out


def save_checkpoint(
    path: Path,
    accelerator,
    model,
    opt,
    step: int,
    position: int,
    compute: Compute,
    identity: str = "",
    keep: int = 1,
    tokenizer=None,
) -> None:
    """Weights (safetensors), optimizer state, stream position; RNG per process; written to a temp dir, then renamed.

    Every process must call this: the weights and the optimizer state are gathered (collectives under FSDP)
    and each process writes its own RNG state (a shared file system is assumed).
    """
    tmp = path.with_name(path.name + ".tmp")
    state_dict = _strip_prefix(full_state_dict(accelerator, model))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        inner = accelerator.unwrap_model(model).model
        inner.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")  # so a full fine-tune's checkpoint loads as it is
    optimizer_state = opt_state_dict(accelerator, model, opt)  # all processes: a collective under FSDP
    if accelerator.is_main_process:
        state = {
            "step": step,
            "position": position,
            "optimizer": optimizer_state,
            "compute": dict(compute.__dict__),
            "identity": identity,
            "world_size": accelerator.num_processes,
            "optimizer_format": optimizer_format(accelerator),
        }
        torch.save(state, tmp / "trainer_state.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        prune_checkpoints(path.parent, keep)
    accelerator.wait_for_everyone()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp") and (p / "trainer_state.pt").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def opt_state_dict(accelerator, model, opt) -> dict:
    """The optimizer state as one process could load it. Under FSDP2 each torch optimizer's sharded
    state is gathered into a full, parameter-name-keyed state dict (torch.distributed.checkpoint), so
    a checkpoint does not depend on how many processes share the model."""
    if not accelerator.is_fsdp2:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return opt.state_dict(lambda o: get_optimizer_state_dict(model, o, options=options))


def optimizer_format(accelerator) -> str:
    """How a checkpoint's optimizer state is keyed: by parameter name (gathered from FSDP2 shards) or by
    position (torch's own state_dict); a checkpoint is only resumed in the format it was saved in."""
    return "fsdp2-full" if accelerator.is_fsdp2 else "torch"


def load_opt_state_dict(accelerator, model, opt, state: dict) -> None:
    if not accelerator.is_fsdp2:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Every process reads the same full state from the checkpoint and keeps its own shard of it.
    options = StateDictOptions(full_state_dict=True)
    opt.load_state_dict(state, lambda o, sd: set_optimizer_state_dict(model, o, sd, options=options))


def read_trainer_state(path: Path, identity: str | None = None) -> dict:
    """The checkpoint's step, stream position, optimizer state and compute; refuses other settings."""
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if identity is not None and state.get("identity") and state["identity"] != identity:
        raise RuntimeError(
            f"{path} was saved by a run with other settings; use a new output directory "
            f"(saved: {state['identity']}; now: {identity})"
        )
    return state


def load_checkpoint_weights(path: Path, hf_model) -> None:
    """Load a checkpoint's weights (full model or LoRA adapter) into the unwrapped, unsharded model."""
    from safetensors.torch import load_file

    weights_file = path / "model" / "model.safetensors"
    if weights_file.exists():
        result = hf_model.load_state_dict(load_file(weights_file), strict=False)
        # save_pretrained leaves out tied copies (e.g. the output head of a tied model): those may be missing.
        tied = set(
            getattr(hf_model, "all_tied_weights_keys", None) or getattr(hf_model, "_tied_weights_keys", None) or ()
        )
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{weights_file} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
    else:  # a peft adapter directory
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(hf_model, load_file(path / "model" / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter weights do not match the model: {result.unexpected_keys[:5]}")


def load_rng_state(path: Path, rank: int) -> None:
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.exists():
        rng_file = path / "rng-0.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    done = sorted(
        (p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1])
    )
    for p in done[:-keep] if keep > 0 else done:
        shutil.rmtree(p, ignore_errors=True)


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written before a kill, redone after the resume)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    rundir.atomic_write_text(log_path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- the loop


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


def run(cfg: TrainConfig, on_step: Callable | None = None, checkpoint_steps: set[int] | None = None) -> dict:
    """Train, checkpoint, resume if a checkpoint exists; returns the summary (also written to out).

    `on_step(step, record, model, accelerator)` runs after every optimizer step, before that step's
    checkpoint (the profile stage records losses there); `checkpoint_steps` adds steps at which a
    resumable checkpoint is saved.
    """
    from accelerate.utils import set_seed

    out = Path(cfg.out)
    if (out / "train_summary.json").exists():
        return rundir.read_json(out / "train_summary.json")  # finished before: nothing to do
    accelerator = make_accelerator(cfg, str(out))
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the number of processes ({world})")
    if accelerator.is_main_process:
        model_path = resolve_model(cfg.model, cfg.models_dir or out.parent / "models", seed=cfg.seed)
    accelerator.wait_for_everyone()  # a preset is built once, by the main process
    model_path = resolve_model(cfg.model, cfg.models_dir or out.parent / "models", seed=cfg.seed)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    # transformers >= 5 loads a checkpoint in its stored dtype by default: a bf16 checkpoint would be
    # trained in pure bf16. cfg.dtype (float32 by default) keeps float32 master weights.
    hf_model = load_model(model_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    # Seeded after loading, so the LoRA init and dropout do not depend on whether a preset was just built.
    set_seed(cfg.seed)
    if cfg.lora.enabled:
        hf_model = apply_lora(hf_model, cfg.lora)
    hf_model.train()  # from_pretrained returns a model in eval mode (dropout off)
    n_params = count_parameters(hf_model)
    trainable = count_parameters(hf_model, trainable_only=True)
    identity = _resume_identity(cfg)
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    saved = read_trainer_state(last, identity) if last is not None else None
    if last is not None:
        load_checkpoint_weights(last, hf_model)  # before wrapping: FSDP shards what is loaded here
    opt = build_optimizer(hf_model, cfg.optim)
    model = prepare(accelerator, ResponseLoss(hf_model), opt)

    examples, mult = load_training_data(cfg)
    encoded = [encode_example(tokenizer, ex, cfg.max_length) for ex in examples]
    val_encoded = (
        [encode_example(tokenizer, ex, cfg.max_length) for ex in load_examples(cfg.val_data)] if cfg.val_data else []
    )
    stream = ExampleStream(mult, seed=cfg.seed)
    steps = total_steps(cfg, stream.epoch_len)
    warmup = warmup_steps(cfg, steps)

    step, position, compute = 0, 0, Compute()
    log_path = out / "train_log.jsonl"
    if saved is not None:
        saved_format = saved.get("optimizer_format", "torch")
        if saved_format != optimizer_format(accelerator):
            mode = "without FSDP" if saved_format == "torch" else "under FSDP"
            raise RuntimeError(
                f"{last} holds optimizer state saved {mode}; resume it {mode} too, or start in a new output directory"
            )
        load_opt_state_dict(accelerator, model, opt, saved.pop("optimizer"))  # popped: no second copy kept
        load_rng_state(last, rank)
        step, position, compute = saved["step"], saved["position"], Compute(**saved["compute"])
        accelerator.print(f"resuming from {last} (step {step})")
    if accelerator.is_main_process:
        _truncate_log(log_path, step)  # lines after the checkpoint are redone
        rundir.record_provenance(
            out,
            "train",
            cfg,
            data_fingerprint=rundir.fingerprint(examples),
            model_path=model_path,
            n_params=n_params,
            total_steps=steps,
            world_size=world,
        )
    accelerator.wait_for_everyone()
    accelerator.init_trackers(
        "datalever",
        config={
            "lr": cfg.optim.lr,
            "optimizer": cfg.optim.name,
            "batch_size": cfg.batch_size,
            "lora": cfg.lora.enabled,
        },
    )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=step,
        desc=f"train {cfg.optim.name}",
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    start = time.perf_counter() - compute.wall_s
    while step < steps:
        t0 = time.perf_counter()
        idx = stream.take(position, cfg.batch_size)
        position += cfg.batch_size
        set_lr(opt, lr_factor(step, steps, warmup, cfg.min_lr_ratio))
        mine = [encoded[i] for i in idx[rank::world]]
        # Every process knows the whole batch, hence the global response-token count: scaling this process's
        # loss sum by world * n_mine / n_all makes DDP's gradient mean equal the token-weighted mean of the
        # whole batch, i.e. exactly what one process computes with the same batch.
        n_resp = [max(encoded[i].n_response, 0) for i in idx]
        n_all, n_mine = sum(n_resp), sum(n_resp[rank::world])
        scale = world * n_mine / n_all if world > 1 and n_all > 0 else 1.0
        batches = micro_batches(mine, cfg.micro_batch_size, tokenizer.pad_token_id, accelerator.device)
        # This process's loss-carrying tokens, counted before the first forward: each micro-batch's loss is
        # normalized before its backward (required under FSDP, where .grad already mixes all processes).
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        stats = optimizer_step(
            model,
            opt,
            batches,
            scaled_loss_fn(scale),
            accelerator=accelerator,
            max_grad_norm=cfg.max_grad_norm,
            n_tokens=n_tokens,
        )
        loss, sam_loss = stats.loss, stats.sam_loss
        if world > 1:  # stats are this process's loss * world * n_mine / n_all: their mean is the batch loss
            both = torch.tensor(
                [loss, sam_loss if sam_loss is not None else 0.0], dtype=torch.float64, device=accelerator.device
            )
            both = accelerator.reduce(both, reduction="mean")
            loss = float(both[0])
            sam_loss = float(both[1]) if sam_loss is not None else None
        step += 1
        n_tok = sum(len(encoded[i].input_ids) for i in idx)  # all processes, padding excluded
        passes_tok = n_tok * stats.forwards // len(batches)  # SAM: two passes over each token
        compute.optimizer_steps = step
        compute.forwards += stats.forwards * world
        compute.backwards += stats.backwards * world
        compute.tokens += passes_tok
        # Backward through frozen weights still costs activation gradients: ~2*params, plus 2*trainable for
        # weight grads.
        compute.flops += 2 * n_params * passes_tok + (2 * n_params + 2 * trainable) * passes_tok
        compute.wall_s = time.perf_counter() - start
        record = {
            "step": step,
            "epoch": position / stream.epoch_len,
            "loss": loss,
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": stats.grad_norm,
            "tokens_per_s": n_tok / max(time.perf_counter() - t0, 1e-9),
            **{f"compute_{k}": v for k, v in compute.__dict__.items()},
        }
        if sam_loss is not None:
            record["sam_loss"] = sam_loss
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
            record["val_loss"] = validation_loss(
                model, val_encoded, tokenizer.pad_token_id, accelerator, cfg.micro_batch_size
            )
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_step is not None:
            hook_start = time.perf_counter()
            on_step(step, record, model, accelerator)
            start += time.perf_counter() - hook_start  # compute.wall_s counts training, not the caller's hook
        if (cfg.save_every and step % cfg.save_every == 0) or step == steps or step in (checkpoint_steps or ()):
            save_checkpoint(
                ckpt_dir / f"step-{step}",
                accelerator,
                model,
                opt,
                step,
                position,
                compute,
                identity,
                cfg.keep_checkpoints,
                tokenizer,
            )
    bar.close()
    summary = finish(
        cfg, accelerator, model, tokenizer, compute, steps, n_params, trainable, examples, mult, model_path
    )
    # Not accelerator.end_training(): it also destroys the process group, which a caller running several
    # stages in one torchrun (profile, then every arm) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
    return summary


def finish(cfg, accelerator, model, tokenizer, compute, steps, n_params, trainable, examples, mult, model_path) -> dict:
    """Save the final model as a plain HF directory (LoRA merged) and the summary, written last."""
    out = Path(cfg.out)
    last_val = last_loss = None
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            last_val = rec.get("val_loss", last_val)
            last_loss = rec.get("loss", last_loss)
    summary = {
        "steps": steps,
        "n_params": n_params,
        "trainable_params": trainable,
        "examples": len(examples),
        "epoch_len": sum(mult),
        "compute": compute.__dict__,
        "final_train_loss": last_loss,
        "final_val_loss": last_val,
        "optimizer": cfg.optim.name,
        "lora": cfg.lora.enabled,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
    }
    state_dict = _strip_prefix(full_state_dict(accelerator, model))  # all processes (a collective under FSDP)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).model
        final = out / "model"
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.lora.enabled:
            inner.save_pretrained(out / "adapter", state_dict=state_dict, safe_serialization=True)
            if accelerator.is_fsdp2:  # the live weights are shards: merge into a fresh copy of the base model
                from peft import PeftModel

                base = load_model(model_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
                inner = PeftModel.from_pretrained(base, out / "adapter")
            inner = inner.merge_and_unload()
            inner.save_pretrained(tmp, safe_serialization=True)
        else:
            inner.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        rundir.write_json(out / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
