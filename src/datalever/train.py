"""Fine-tune a causal LM on a dataset with the response-only loss (AdamW, Muon or SAM; full or LoRA).

One code path through Accelerate for CPU, one GPU, DDP and FSDP. The loop is plain on purpose:
each optimizer step takes the next `batch_size` examples of a seeded stream (every example as
many times per epoch as its multiplicity, reshuffled each epoch), splits them over processes and
micro-batches, and calls `optim.optimizer_step`. The stream position, optimizer state, RNG and
weights are checkpointed together, so a killed run resumes where it stopped and ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from datalever import rundir
from datalever.examples import Example, load_examples
from datalever.losses import ResponseLoss, score_encoded
from datalever.models import count_parameters, load_model, load_tokenizer, resolve_model
from datalever.optim import OptimConfig, build_optimizer, lr_factor, optimizer_step, set_lr
from datalever.sampler import MultiplicitySampler
from datalever.tokens import Encoded, collate, encode_example


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
    """Module names to adapt, e.g. [q_proj, v_proj]; None picks peft's default for the architecture."""


@dataclass
class TrainConfig:
    """Fine-tune a causal LM on prompt/response examples with the loss on response tokens only."""

    model: str = "preset:demo"
    """HF checkpoint directory or hub id, or `preset:NAME` to build a small model from scratch."""
    data: str = "runs/demo/data/train.jsonl"
    """Training examples (JSONL, JSON, Parquet, CSV or a datasets directory)."""
    out: str = "runs/train"
    """Output directory: checkpoints, the final model, train_log.jsonl, train_summary.json."""
    models_dir: str | None = None
    """Where `preset:NAME` models are built (default: beside `out`)."""
    manifest: str | None = None
    """Optional multiplicity manifest (from `datalever upsample`): draw each example that many times per epoch without copying the data."""
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
    """no | bf16 | auto (bf16 on a GPU that supports it, else float32)."""
    log_with: list[str] | None = None
    """Accelerate trackers, e.g. [tensorboard] or [wandb]; the JSONL log is always written."""
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
        self._cache: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._cache = (epoch, list(self.sampler))
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


def micro_batches(encoded: Sequence[Encoded], size: int, pad_id: int, device) -> list[dict]:
    # Sorting by length inside a step changes nothing in the gradient (it is a sum) but pads less.
    rows = sorted(encoded, key=lambda e: len(e.input_ids))
    return [{k: v.to(device) for k, v in collate(rows[i:i + size], pad_id).items()}
            for i in range(0, len(rows), size)]


def response_loss_fn(model, batch) -> tuple[torch.Tensor, int]:
    sums, counts = model(**batch)
    return sums.sum(), int(counts.sum())


# ----------------------------------------------------------------------------- model set-up


def apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def make_accelerator(cfg: TrainConfig, project_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    acc = Accelerator(mixed_precision=mp, log_with=cfg.log_with, project_dir=project_dir)
    set_seed(cfg.seed)
    return acc


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, accelerator, model, opt, step: int, position: int, compute: Compute) -> None:
    """Weights (safetensors), optimizer state, RNG and stream position; written to a temp dir, then renamed."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inner = accelerator.unwrap_model(model).model
    inner.save_pretrained(tmp / "model", safe_serialization=True)
    state = {"step": step, "position": position, "optimizer": opt.state_dict(),
             "torch_rng": torch.get_rng_state(), "compute": compute.__dict__}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    accelerator.wait_for_everyone()


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp") and (p / "trainer_state.pt").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(path: Path, model, opt) -> tuple[int, int, Compute]:
    from safetensors.torch import load_file

    inner = model.model
    weights_file = path / "model" / "model.safetensors"
    if weights_file.exists():
        inner.load_state_dict(load_file(weights_file), strict=False)
    else:  # a peft adapter directory
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(inner, load_file(path / "model" / "adapter_model.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["position"], Compute(**state["compute"])


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    done = sorted((p for p in ckpt_dir.glob("step-*") if not p.name.endswith(".tmp")),
                  key=lambda p: int(p.name.split("-")[1]))
    for p in done[:-keep] if keep > 0 else done:
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- the loop


def validation_loss(model, val_encoded, pad_id, accelerator) -> float | None:
    if not val_encoded:
        return None
    scores = score_encoded(accelerator.unwrap_model(model), val_encoded, pad_id=pad_id, accelerator=accelerator)
    total = sum(s.loss * s.n_tokens for s in scores.values() if not s.flag)
    count = sum(s.n_tokens for s in scores.values() if not s.flag)
    return total / count if count else None


def run(cfg: TrainConfig, on_step: Callable | None = None, checkpoint_steps: set[int] | None = None) -> dict:
    """Train, checkpoint, resume if a checkpoint exists; returns the summary (also written to out).

    `on_step(step, record, model, accelerator)` runs after every optimizer step (the profile stage
    records losses there); `checkpoint_steps` adds steps at which a resumable checkpoint is saved.
    """
    out = Path(cfg.out)
    if (out / "train_summary.json").exists():
        return rundir.read_json(out / "train_summary.json")  # finished before: nothing to do
    accelerator = make_accelerator(cfg, str(out))
    model_path = resolve_model(cfg.model, cfg.models_dir or out.parent / "models", seed=cfg.seed)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    hf_model = load_model(model_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora.enabled:
        hf_model = apply_lora(hf_model, cfg.lora)
    n_params = count_parameters(hf_model)
    model = accelerator.prepare(ResponseLoss(hf_model))
    opt = build_optimizer(accelerator.unwrap_model(model).model, cfg.optim)

    examples, mult = load_training_data(cfg)
    encoded = [encode_example(tokenizer, ex, cfg.max_length) for ex in examples]
    val_encoded = ([encode_example(tokenizer, ex, cfg.max_length) for ex in load_examples(cfg.val_data)]
                   if cfg.val_data else [])
    stream = ExampleStream(mult, seed=cfg.seed)
    steps = total_steps(cfg, stream.epoch_len)
    warmup = int(cfg.warmup_ratio * steps)

    step, position, compute = 0, 0, Compute()
    ckpt_dir = out / "checkpoints"
    last = latest_checkpoint(ckpt_dir)
    if last is not None:
        step, position, compute = load_checkpoint(last, accelerator.unwrap_model(model), opt)
        accelerator.print(f"resuming from {last} (step {step})")
    if accelerator.is_main_process:
        rundir.record_provenance(out, "train", cfg, data_fingerprint=rundir.fingerprint(examples),
                                 model_path=model_path, n_params=n_params, total_steps=steps)
    accelerator.init_trackers("datalever", config={"lr": cfg.optim.lr, "optimizer": cfg.optim.name})
    log_path = out / "train_log.jsonl"
    rank, world = accelerator.process_index, accelerator.num_processes
    trainable = count_parameters(hf_model, trainable_only=True)

    from tqdm.auto import tqdm
    bar = tqdm(total=steps, initial=step, desc=f"train {cfg.optim.name}",
               disable=not (cfg.progress and accelerator.is_local_main_process))
    start = time.perf_counter() - compute.wall_s
    while step < steps:
        t0 = time.perf_counter()
        idx = stream.take(position, cfg.batch_size)
        position += cfg.batch_size
        set_lr(opt, lr_factor(step, steps, warmup, cfg.min_lr_ratio))
        mine = [encoded[i] for i in idx[rank::world]]
        batches = micro_batches(mine, cfg.micro_batch_size, tokenizer.pad_token_id, accelerator.device)
        stats = optimizer_step(model, opt, batches, response_loss_fn, accelerator=accelerator,
                               max_grad_norm=cfg.max_grad_norm)
        step += 1
        n_tok = sum(len(e.input_ids) for e in mine) * world
        passes_tok = n_tok * stats.forwards // max(len(batches), 1)
        compute.optimizer_steps = step
        compute.forwards += stats.forwards * world
        compute.backwards += stats.backwards * world
        compute.tokens += passes_tok
        # Backward through frozen weights still costs activation gradients: ~2*params, plus 2*trainable for weight grads.
        compute.flops += 2 * n_params * passes_tok + (2 * n_params + 2 * trainable) * passes_tok
        compute.wall_s = time.perf_counter() - start
        record = {"step": step, "loss": stats.loss, "lr": opt.param_groups[0]["lr"], "grad_norm": stats.grad_norm,
                  "tokens_per_s": n_tok / max(time.perf_counter() - t0, 1e-9), **{f"compute_{k}": v for k, v in compute.__dict__.items()}}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
            record["val_loss"] = validation_loss(model, val_encoded, tokenizer.pad_token_id, accelerator)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.4f}")
        if on_step is not None:
            on_step(step, record, model, accelerator)
        if (cfg.save_every and step % cfg.save_every == 0) or step == steps or step in (checkpoint_steps or ()):
            save_checkpoint(ckpt_dir / f"step-{step}", accelerator, model, opt, step, position, compute)
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    bar.close()
    accelerator.end_training()
    return finish(cfg, accelerator, model, tokenizer, compute, steps, n_params, trainable, examples, mult)


def finish(cfg, accelerator, model, tokenizer, compute, steps, n_params, trainable, examples, mult) -> dict:
    """Save the final model as a plain HF directory (LoRA merged) and the summary, written last."""
    out = Path(cfg.out)
    last_val = None
    log_path = out / "train_log.jsonl"
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            last_val = rec.get("val_loss", last_val)
    summary = {"steps": steps, "n_params": n_params, "trainable_params": trainable, "examples": len(examples),
               "epoch_len": sum(mult), "compute": compute.__dict__, "final_val_loss": last_val,
               "optimizer": cfg.optim.name, "lora": cfg.lora.enabled, "world_size": accelerator.num_processes}
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model).model
        final = out / "model"
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.lora.enabled:
            inner.save_pretrained(out / "adapter", safe_serialization=True)
            inner = inner.merge_and_unload()
        inner.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        rundir.write_json(out / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
