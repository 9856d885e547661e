"""Resumable training checkpoints: weights, optimizer state, stream position, compute and RNG, saved together.

A checkpoint is a directory `TrainDir.checkpoint(step)`:

    model/                  the HF model (safetensors) or the peft adapter, with the tokenizer
    trainer_state.pt        step, stream position, optimizer state, compute, the run's identity
    rng-<rank>.pt           each process's RNG state

Every process writes into one temporary directory beside it (`.step-N.tmp`); trainer_state.pt is written last
(itself through a rename), so a temporary that holds it is complete; the temporary then replaces the final name in
one rename, so a directory under a step's name is always complete. Temporaries a killed save left are cleared at
the start of the next run (`clean_temporaries`). Under FSDP2 weights and optimizer state are gathered into their
full, unsharded form, so a checkpoint resumes on any number of processes.

When one is due: every `save_every` steps, at the steps a caller asks for, at the end, and every `save_every_minutes`
on the main process's clock (`SaveTimer`, its decision shared by every process).

A finished run is returned, never resumed: once its final model and summary are written its checkpoints' resume
state (trainer_state.pt, the optimizer state, and the RNG files) is deleted unless asked to keep it
(`drop_resume_state`); their weights (model/, the master weights in the dtype they trained in) stay, except those of
a last-step checkpoint that the final model/ holds as they are (no cast, no LoRA merge), which goes whole.

The final model (`save_final_model`) is a plain HF directory with its tokenizer, LoRA merged (the adapter saved
beside it), cast to `save_dtype`.
"""

from __future__ import annotations

import copy
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from datalever import rundir
from datalever.models import load_model
from datalever.optim import StepStats, is_dtensor
from datalever.rundir import CheckpointDir, ModelDir
from datalever.train.config import TrainConfig, cast_dtype, identity_differences

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Compute:
    """What a run spent: the currency for comparing arms and optimizers."""

    optimizer_steps: int = 0
    forwards: int = 0  # forward passes over micro-batches
    backwards: int = 0
    tokens: int = 0  # tokens through the forward passes (padding excluded)
    flops: float = 0.0  # estimate: 2*params*tokens per forward, 4*params*tokens per backward
    wall_s: float = 0.0

    def add_step(
        self, stats: StepStats, *, micro_batches: int, world: int, tokens: int, params: int, trainable: int
    ) -> None:
        """Count one optimizer step: `stats` of one process, which ran `micro_batches` micro-batches (as each of
        the `world` processes did); `tokens` in the whole batch, padding excluded."""
        passes_tokens = tokens * stats.forwards // micro_batches  # SAM: two passes over each token
        self.optimizer_steps += 1
        self.forwards += stats.forwards * world
        self.backwards += stats.backwards * world
        self.tokens += passes_tokens
        # Backward through frozen weights still costs activation gradients: ~2*params, plus 2*trainable for
        # weight grads.
        self.flops += 2 * params * passes_tokens + (2 * params + 2 * trainable) * passes_tokens


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves beside the weights and the optimizer state."""

    step: int = 0
    """Optimizer steps done."""
    position: int = 0
    """Examples drawn from the stream so far (all processes)."""
    compute: Compute = field(default_factory=Compute)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
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


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(path: Path, rank: int) -> None:
    """This process's RNG state; a process the checkpoint had none for (more processes now) takes rank 0's."""
    rng_file = CheckpointDir(path).rng(rank)
    if not rng_file.exists():
        rng_file = CheckpointDir(path).rng(0)
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))


# ----------------------------------------------------------------------------- gathering from FSDP2 shards


def full_state_dict(accelerator, model) -> dict:
    """The HF model's whole state dict (ResponseLoss's `model.` prefix stripped) for the main process to save;
    all processes call it (under FSDP2 the other processes get an empty dict).

    Under FSDP2 the shards are gathered one tensor at a time, so no process ever holds more than the
    main process's copy plus one full tensor. (Accelerate's get_state_dict returned the DTensor shards
    themselves on CPU processes, which safetensors cannot write.)
    """
    if not accelerator.is_fsdp2:
        return _strip_prefix(accelerator.get_state_dict(model))
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
    return _strip_prefix(out)


def _strip_prefix(state_dict: dict, prefix: str = "model.") -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def optimizer_format(accelerator) -> str:
    """How a checkpoint's optimizer state is keyed: by parameter name (gathered from FSDP2 shards) or by
    position (torch's own state_dict); a checkpoint is only resumed in the format it was saved in."""
    return "fsdp2-full" if accelerator.is_fsdp2 else "torch"


def opt_state_dict(accelerator, model, opt) -> dict:
    """The optimizer state as one process could load it. Under FSDP2 each torch optimizer's sharded
    state is gathered into a full, parameter-name-keyed state dict (torch.distributed.checkpoint), so
    a checkpoint does not depend on how many processes share the model."""
    if not accelerator.is_fsdp2:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return opt.state_dict(lambda o: get_optimizer_state_dict(model, o, options=options))


def load_opt_state_dict(accelerator, model, opt, state: dict) -> None:
    if not accelerator.is_fsdp2:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Every process reads the same full state from the checkpoint and keeps its own shard of it.
    options = StateDictOptions(full_state_dict=True)
    opt.load_state_dict(state, lambda o, sd: set_optimizer_state_dict(model, o, sd, options=options))


# ----------------------------------------------------------------------------- save


def save(
    layout: rundir.TrainDir, accelerator, model, opt, tokenizer, progress: Progress, *, identity: str, keep: int
) -> None:
    """Save `layout.checkpoint(progress.step)`, then keep only the newest `keep` checkpoints.

    Every process must call this: the weights and the optimizer state are gathered (collectives under FSDP)
    and each process writes its own RNG state into the shared temporary directory (a shared file system is
    assumed), which the main process then puts in place.
    """
    path = layout.checkpoint(progress.step)
    tmp = CheckpointDir(layout.checkpoint_temporary(progress.step))  # one name that every process knows
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp.root, ignore_errors=True)  # left by a save that was killed
        tmp.root.mkdir(parents=True)
        accelerator.unwrap_model(model).model.save_pretrained(tmp.model, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp.model)  # so a full fine-tune's checkpoint loads as it is
    optimizer_state = opt_state_dict(accelerator, model, opt)  # all processes: a collective under FSDP
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp.rng(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": progress.step,
            "position": progress.position,
            "optimizer": optimizer_state,
            "compute": dict(progress.compute.__dict__),
            "identity": identity,
            "world_size": accelerator.num_processes,
            "optimizer_format": optimizer_format(accelerator),
        }
        _save_last(state, tmp.trainer_state)
        rundir.replace_dir(tmp.root, path)
        prune(layout, keep)
    accelerator.wait_for_everyone()


def _save_last(state: dict, path: Path) -> None:
    """torch.save through a rename: the file's presence says that everything else in the directory is written."""
    part = path.with_name(f".{path.name}.part")
    torch.save(state, part)
    part.replace(path)


def _checkpoints(layout: rundir.TrainDir) -> list[Path]:
    """The finished checkpoints, oldest first (temporary directories and anything else left out)."""
    if not layout.checkpoints.is_dir():
        return []
    found = {}
    for path in layout.checkpoints.iterdir():
        step = path.name.rpartition("-")[2]
        if step.isdigit() and layout.checkpoint(int(step)) == path and CheckpointDir(path).trainer_state.exists():
            found[int(step)] = path
    return [found[step] for step in sorted(found)]


def latest(layout: rundir.TrainDir) -> Path | None:
    return next(reversed(_checkpoints(layout)), None)


def prune(layout: rundir.TrainDir, keep: int) -> None:
    done = _checkpoints(layout)
    for path in done[:-keep] if keep > 0 else done:
        shutil.rmtree(path, ignore_errors=True)


def clean_temporaries(layout: rundir.TrainDir) -> None:
    """Clear the temporary directories killed saves left under checkpoints/ (each up to a model and its optimizer
    state). One that is complete (trainer_state.pt, written last, is there) and newer than every checkpoint in
    place is the latest checkpoint itself, caught between `rundir.replace_dir`'s removal of an older directory of
    its name and its rename: it is put in place, not removed. Main process only, before the run's first save."""
    if not layout.checkpoints.is_dir():
        return
    newest = latest(layout)
    newest_step = int(newest.name.rpartition("-")[2]) if newest is not None else -1
    steps = {path: layout.temporary_step(path) for path in layout.checkpoints.iterdir()}
    temporaries = sorted(((step, path) for path, step in steps.items() if step is not None), reverse=True)
    for step, path in temporaries:  # newest first: only the newest complete one can be the latest checkpoint
        if step > newest_step and CheckpointDir(path).trainer_state.exists():
            rundir.replace_dir(path, layout.checkpoint(step))  # what is there under its name resumes nothing
            newest_step = step
        else:
            shutil.rmtree(path, ignore_errors=True)


def drop_resume_state(layout: rundir.TrainDir, same_as_model: int | None = None) -> None:
    """Delete the checkpoints' resume state (trainer_state.pt with the optimizer state, 2-3x the model's size under
    AdamW, and the RNG files), keeping their weights: for a finished run, which is returned and never resumed.
    `same_as_model`: the step whose checkpoint holds the very weights the final model/ holds (the last step, when
    model/ is saved in the master weights' dtype without a LoRA merge): that checkpoint goes whole, or a 3B run would
    keep 12 GB of float32 weights twice. Call only after the final model and the summary are written."""
    for path in _checkpoints(layout):
        CheckpointDir(
            path
        ).trainer_state.unlink()  # first: without it the directory is no longer a checkpoint to resume
        for rng_file in path.glob(CheckpointDir(path).rng("*").name):
            rng_file.unlink()
    if same_as_model is not None and layout.checkpoint(same_as_model).is_dir():
        shutil.rmtree(layout.checkpoint(same_as_model))
        if not any(layout.checkpoints.iterdir()):
            layout.checkpoints.rmdir()


# ----------------------------------------------------------------------------- resume


def read_state(path: Path, identity: str) -> dict:
    """The checkpoint's step, stream position, optimizer state and compute; refuses other settings or inputs."""
    state = torch.load(CheckpointDir(path).trainer_state, weights_only=True)
    if state.get("identity") != identity:
        diffs = identity_differences(state["identity"], identity) if state.get("identity") else ["no record"]
        raise RuntimeError(
            f"{path} was saved by a run with other settings or inputs ({'; '.join(diffs)}); "
            f"use a new output directory, or --overwrite true to train again there"
        )
    return state


def load_weights(path: Path, hf_model) -> None:
    """Load a checkpoint's weights (full model or LoRA adapter) into the unwrapped, unsharded model."""
    from safetensors.torch import load_file

    weights_file = ModelDir(CheckpointDir(path).model).weights
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

        result = set_peft_model_state_dict(hf_model, load_file(ModelDir(CheckpointDir(path).model).adapter_weights))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter weights do not match the model: {result.unexpected_keys[:5]}")


def restore(path: Path, state: dict, accelerator, model, opt) -> Progress:
    """Load the optimizer state (into the prepared model's optimizer) and this process's RNG state; the
    progress to continue from. `state` is `read_state`'s; its optimizer state is taken out of it."""
    saved_format = state.get("optimizer_format", "torch")
    if saved_format != optimizer_format(accelerator):
        mode = "without FSDP" if saved_format == "torch" else "under FSDP"
        raise RuntimeError(
            f"{path} holds optimizer state saved {mode}; resume it {mode} too, or start in a new output directory"
        )
    load_opt_state_dict(accelerator, model, opt, state.pop("optimizer"))  # popped: no second copy kept
    load_rng_state(path, accelerator.process_index)
    accelerator.print(f"resuming from {path} (step {state['step']})")
    return Progress(state["step"], state["position"], Compute(**state["compute"]))


# ----------------------------------------------------------------------------- when to save


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


# ----------------------------------------------------------------------------- the final model


def model_is_master_copy(cfg: TrainConfig) -> bool:
    """Whether the final model/ holds the master weights as they are (no cast, no LoRA merge): then it is the same
    as a checkpoint at the last step."""
    return not cfg.lora.enabled and cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype) is None


def save_final_model(layout: rundir.TrainDir, accelerator, model, tokenizer, cfg: TrainConfig, model_path: str) -> None:
    """The final model as a plain HF directory with its tokenizer (LoRA merged, the adapter saved beside it), in
    `save_dtype`.

    Every process calls it (the weights are gathered under FSDP); the main process writes.
    """
    state_dict = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return
    inner = accelerator.unwrap_model(model).model
    dtype = cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype)
    with rundir.atomic_dir(layout.model) as tmp:
        if cfg.lora.enabled:
            merged = merge_lora(layout, accelerator, inner, state_dict, cfg, model_path)
            weights = None if dtype is None else cast_weights(merged.state_dict(), dtype)  # None: the model's own
        else:
            merged, weights = inner, cast_weights(state_dict, dtype)
        merged.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        if dtype is not None:
            record_dtype(merged, tmp, dtype)
        tokenizer.save_pretrained(tmp)


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


def merge_lora(layout: rundir.TrainDir, accelerator, peft_model, state_dict: dict, cfg: TrainConfig, model_path: str):
    """Save the adapter; return the base model with the adapter merged in."""
    with rundir.atomic_dir(layout.adapter) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if accelerator.is_fsdp2:  # the live weights are shards: merge into a fresh copy of the base model
        from peft import PeftModel

        base = load_model(model_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        peft_model = PeftModel.from_pretrained(base, layout.adapter)
    return peft_model.merge_and_unload()
