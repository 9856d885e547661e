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

A finished run is returned, never resumed: once its final model and summary are written its checkpoints' resume
state (trainer_state.pt, the optimizer state, and the RNG files) is deleted unless asked to keep it
(`drop_resume_state`); their weights (model/, the master weights in the dtype they trained in) stay, except those of
a last-step checkpoint that the final model/ holds as they are (no cast, no LoRA merge), which goes whole.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datalever import rundir
from datalever.launch import resolve_mixed_precision, tf32_in_effect
from datalever.optim import StepStats, is_dtensor

MODEL = "model"
TRAINER_STATE = "trainer_state.pt"
RNG_STATE = "rng-{rank}.pt"

# The settings that decide what a run computes: its weights, its logged losses and its summary. A run (finished or
# checkpointed) is resumed or returned only for the same values and the same inputs (`resume_identity`).
# Left out, as they change no number: out, progress, log_with, run_name, save_every, save_every_minutes, keep_last,
# keep_optimizer_state, trust_remote_code, overwrite; and, like the number of processes, micro_batch_size (how a
# batch is split into passes: the gradient is the same sum, only its rounding moves). The paths model, data,
# val_data and manifest are left out too: what they hold counts instead (`train.load_inputs`: a moved copy is the
# same work, data edited in place is not).
IDENTITY_SETTINGS = (
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
    "mixed_precision",
    "eval_every",  # which steps the log holds a validation loss for
    "attn_implementation",
    "tf32",
    "torch_compile",
    "save_dtype",  # the final model's weights; only as it is in effect (`cast_dtype`), None (as trained) left out
)
# The speed settings that pick other kernels or another float32 precision, hence other rounding, as they computed
# before they existed: each enters the identity only with another value, so the runs recorded then keep theirs.
# Left out: gradient_checkpointing (the same kernels, run again in the backward: the same numbers) and
# group_by_length (another split of the step into passes, like micro_batch_size).
KERNELS_BEFORE = {"attn_implementation": "sdpa", "tf32": False, "torch_compile": False}
DIRECTORY = "directory sha256:"  # how `model_identity` marks a hash of a directory's files
IDENTITY_FORMAT = 2  # 1: settings only (paths, no contents); such checkpoints cannot be checked and are refused


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


def resume_identity(cfg, inputs: dict[str, str | None]) -> str:
    """What a TrainConfig computes, as one string to compare on resume: the settings that decide the numbers and
    `inputs`, what the model spec stands for and the fingerprints of the data (`train.load_inputs`)."""
    settings = {k: v for k, v in rundir.to_jsonable(cfg).items() if k in IDENTITY_SETTINGS}
    # Values that a setting makes unused change nothing: epochs under max_steps, the settings of adapters that are
    # never made, of an optimizer that is not built.
    if cfg.max_steps is not None:
        settings["epochs"] = None
    if not cfg.lora.enabled:
        settings["lora"] = {"enabled": False}
    settings["optim"] = _optimizer_settings(settings["optim"])
    # bf16 autocast and float32 compute give other numbers: a run continues only with the one it was made with.
    settings["mixed_precision"] = resolve_mixed_precision(cfg.mixed_precision)
    _keep_other_kernels(settings)
    # The final model as trained computes as before save_dtype existed: the setting enters only where it casts.
    settings["save_dtype"] = cast_dtype(cfg.save_dtype, cfg.mixed_precision, cfg.dtype)
    if settings["save_dtype"] is None:
        del settings["save_dtype"]
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
    return "file:" + hashlib.sha256(Path(option).expanduser().read_bytes()).hexdigest()[:16]


def cast_dtype(save_dtype: str, mixed_precision: str, dtype: str) -> str | None:
    """The dtype the final model is cast to when saved, None for none (the weights' own dtype, `dtype`).

    auto: bfloat16 where the run computed in bf16 (bf16 autocast over float32 master weights: what inference loads,
    at half the size), else as trained."""
    if save_dtype == "auto":
        save_dtype = "bfloat16" if resolve_mixed_precision(mixed_precision) == "bf16" else dtype
    return None if save_dtype in (dtype, "auto") else save_dtype


def _optimizer_settings(optim: dict) -> dict:
    """OptimConfig's values without the muon_* ones unless Muon is built (alone or under SAM) and without the sam_*
    ones unless SAM is (optim.build_optimizer); `fused` as it is in effect (CUDA and an AdamW built)."""
    base = optim["sam_base"] if optim["name"] == "sam" else optim["name"]
    unused = []
    if base != "muon":
        unused.append("muon_")
    if optim["name"] != "sam":
        unused.append("sam_")
    kept = {k: v for k, v in optim.items() if not k.startswith(tuple(unused))}
    # Fused AdamW is other kernels only where it runs (optim.fused_adamw); elsewhere it computes as before it existed.
    fused = kept.pop("fused", False) and base in ("adamw", "muon") and torch.cuda.is_available()
    return {**kept, "fused": True} if fused else kept


def _keep_other_kernels(settings: dict) -> None:
    """Drop the kernel settings that compute as before they existed (`KERNELS_BEFORE`); tf32 as it is in effect."""
    settings["tf32"] = tf32_in_effect(settings["tf32"])
    for name, before in KERNELS_BEFORE.items():
        if settings[name] == before:
            del settings[name]


def identity_differences(saved: str | dict, now: str | dict) -> list[str]:
    """What differs between two `resume_identity`s, one short phrase per setting or input."""
    saved = json.loads(saved) if isinstance(saved, str) else saved
    now = json.loads(now) if isinstance(now, str) else now
    if saved.get("format") != now.get("format"):
        return ["made by an earlier datalever version, whose record holds no input contents"]
    before, after = rundir.flatten(saved["settings"]), rundir.flatten(now["settings"])
    keys = sorted(before.keys() | after.keys())
    changed = [k for k in keys if k not in before or k not in after or before[k] != after[k]]
    diffs = [f"{k} {_shown(before, k)} -> {_shown(after, k)}" for k in changed]
    for name in sorted(saved["inputs"].keys() | now["inputs"].keys()):
        old, new = saved["inputs"].get(name), now["inputs"].get(name)
        if old != new:
            diffs.append(f"{name}: {_input_change(name, old, new)}")
    return diffs


def _shown(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "unused"  # left out as unused (lora off, another optimizer)


def _input_change(name: str, old: str | None, new: str | None) -> str:
    if old is None or new is None:
        return "none before" if old is None else "none now"
    if name == "model" and not (old.startswith(DIRECTORY) and new.startswith(DIRECTORY)):
        return f"{old!r} -> {new!r}"  # specs (preset, hub id) or a spec for a directory: say which
    return "other content"


# ----------------------------------------------------------------------------- input fingerprints


def counts_fingerprint(multiplicities) -> str:
    """The multiplicities in example order (no manifest: all 1, the same work as a manifest of ones)."""
    return hashlib.sha256(",".join(str(int(m)) for m in multiplicities).encode()).hexdigest()[:16]


def model_identity(spec: str) -> str:
    """What the model spec stands for: for a local directory (the embedded one included) a hash of its files, so a
    checkpoint retrained in place is not taken for the one a run started from; otherwise the spec itself (a preset
    is built the same way for the same name and seed; a hub id is the hub's, its revision not pinned here)."""
    from datalever.models import EMBEDDED_PREFIX, embedded_checkpoint, is_preset

    if is_preset(spec):
        return spec
    path = Path(embedded_checkpoint(spec[len(EMBEDDED_PREFIX) :]) if spec.startswith(EMBEDDED_PREFIX) else spec)
    path = path.expanduser()
    return f"{DIRECTORY}{directory_fingerprint(path)}" if path.is_dir() else spec


def directory_fingerprint(root: Path) -> str:
    """sha256 over every file's relative path and bytes (hidden files and folders, e.g. caches, left out)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


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
    rng_file = path / RNG_STATE.format(rank=rank)
    if not rng_file.exists():
        rng_file = path / RNG_STATE.format(rank=0)
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
    tmp = path.with_name(f".{path.name}.tmp")  # one name that every process knows
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).model.save_pretrained(
            tmp / MODEL, state_dict=state_dict, safe_serialization=True
        )
        tokenizer.save_pretrained(tmp / MODEL)  # so a full fine-tune's checkpoint loads as it is
    optimizer_state = opt_state_dict(accelerator, model, opt)  # all processes: a collective under FSDP
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / RNG_STATE.format(rank=accelerator.process_index))
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
        _save_last(state, tmp / TRAINER_STATE)
        rundir.replace_dir(tmp, path)
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
        if step.isdigit() and layout.checkpoint(int(step)) == path and (path / TRAINER_STATE).exists():
            found[int(step)] = path
    return [found[step] for step in sorted(found)]


def latest(layout: rundir.TrainDir) -> Path | None:
    return next(reversed(_checkpoints(layout)), None)


def prune(layout: rundir.TrainDir, keep: int) -> None:
    done = _checkpoints(layout)
    for path in done[:-keep] if keep > 0 else done:
        shutil.rmtree(path, ignore_errors=True)


def _temporary_step(path: Path) -> int | None:
    """N for a save's temporary directory `.step-N.tmp`, else None."""
    name = path.name
    if not (name.startswith(".step-") and name.endswith(".tmp")):
        return None
    step = name[len(".step-") : -len(".tmp")]
    return int(step) if step.isdigit() else None


def clean_temporaries(layout: rundir.TrainDir) -> None:
    """Clear the temporary directories killed saves left under checkpoints/ (each up to a model and its optimizer
    state). One that is complete (trainer_state.pt, written last, is there) and newer than every checkpoint in
    place is the latest checkpoint itself, caught between `rundir.replace_dir`'s removal of an older directory of
    its name and its rename: it is put in place, not removed. Main process only, before the run's first save."""
    if not layout.checkpoints.is_dir():
        return
    newest = latest(layout)
    newest_step = int(newest.name.rpartition("-")[2]) if newest is not None else -1
    steps = {path: _temporary_step(path) for path in layout.checkpoints.iterdir()}
    temporaries = sorted(((step, path) for path, step in steps.items() if step is not None), reverse=True)
    for step, path in temporaries:  # newest first: only the newest complete one can be the latest checkpoint
        if step > newest_step and (path / TRAINER_STATE).exists():
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
        (path / TRAINER_STATE).unlink()  # first: without it the directory is no longer a checkpoint to resume
        for rng_file in path.glob(RNG_STATE.format(rank="*")):
            rng_file.unlink()
    if same_as_model is not None and layout.checkpoint(same_as_model).is_dir():
        shutil.rmtree(layout.checkpoint(same_as_model))
        if not any(layout.checkpoints.iterdir()):
            layout.checkpoints.rmdir()


# ----------------------------------------------------------------------------- resume


def read_state(path: Path, identity: str) -> dict:
    """The checkpoint's step, stream position, optimizer state and compute; refuses other settings or inputs."""
    state = torch.load(path / TRAINER_STATE, weights_only=True)
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

    weights_file = path / MODEL / "model.safetensors"
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

        result = set_peft_model_state_dict(hf_model, load_file(path / MODEL / "adapter_model.safetensors"))
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


def read_log(log_path: Path) -> list[dict]:
    """The JSONL log's records. A torn last line (the write a power loss or a full disk cut short) is left out:
    its step is redone on resume. A torn line before the last is damage no kill makes, and an error."""
    lines = [(n, line) for n, line in enumerate(log_path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(
                f"{log_path}: line {lineno}: malformed JSON ({e.msg}); only the last line may be cut short by a kill"
            ) from None
    return records


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines of steps after `step` (written before a kill, redone after the resume), and a torn last line."""
    if not log_path.exists():
        return
    kept = [record for record in read_log(log_path) if record["step"] <= step]
    rundir.atomic_write_text(log_path, "".join(json.dumps(record) + "\n" for record in kept))
