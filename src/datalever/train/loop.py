"""The training recipe: setup -> loop -> finish, for a causal LM with the response-only loss (AdamW, Muon or SAM; full
or LoRA).

`run` reads top to bottom. `setup` starts the launch (`launch`: one code path through Accelerate for CPU, one GPU,
DDP and FSDP2), loads the model, its optimizer and the data, and picks up the latest checkpoint if there is one.
`train_loop` runs the optimizer steps: each takes the next `batch_size` examples of a seeded stream (`order`: every
example as many times per epoch as its multiplicity, reshuffled each epoch), splits them over processes and
micro-batches, and calls `optim.optimizer_step`; the stream position, optimizer state, RNG and weights are
checkpointed together when a save is due (`checkpoint`), so a killed run resumes where it stopped and ends where an
uninterrupted run ends. `finish` saves the final model and the summary, then deletes the checkpoints' resume state (a
finished run is returned, never resumed).

Around the recipe, each in a room of its own: what the options are and which decide the numbers (`config`), what the
run reads (`inputs`), what `out` holds and whether it is this run (`outputs`: resume, return, refuse or replace),
the JSONL log and the trackers (`logs`).

The speed settings (attn_implementation, tf32, optim.fused, gradient_checkpointing, group_by_length,
torch_compile) choose kernels and schedules, never the data or the optimizer: at their defaults a CPU computes what
it computed before they existed, and those that pick other kernels enter the resume identity.

With N processes each step's batch is split evenly (batch_size must be a multiple of N) and the loss
is weighted so that the gradient equals the one a single process computes on the whole batch (SAM
under DDP excepted: each process perturbs with its own gradient; under FSDP SAM perturbs with the
whole batch's gradient, as one process does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from datalever import launch, preempt, provenance, rundir
from datalever.examples import Example
from datalever.launch import make_accelerator, prepare
from datalever.losses import ResponseLoss
from datalever.models import count_parameters, load_model, load_tokenizer, resolve_model
from datalever.optim import SAM, MultiOptimizer, StepStats, build_optimizer, lr_factor, optimizer_step, set_lr
from datalever.progress import bar as progress_bar
from datalever.tokens import Encoded, Formatter, Truncation, collate, loss_positions
from datalever.train import checkpoint, logs, outputs
from datalever.train.checkpoint import Progress, SaveTimer
from datalever.train.config import LoraConfig, TrainConfig
from datalever.train.inputs import TrainInputs, check_inputs, load_inputs
from datalever.train.order import ExampleStream, total_steps, warmup_steps

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- run


def run(cfg: TrainConfig, on_step: Callable | None = None, checkpoint_steps: set[int] | None = None) -> dict:
    """Train, checkpoint, resume if a checkpoint of the same work exists; returns the summary (also written to out).

    `on_step(step, record, model, accelerator)` runs after every optimizer step, before that step's
    checkpoint (the profile stage records losses there); `checkpoint_steps` adds steps at which a
    resumable checkpoint is saved. A stop signal (`preempt`) ends the run after the step in progress with a
    checkpoint: `preempt.Preempted` is raised, and the same call later resumes there.
    """
    check_inputs(cfg)
    inputs = load_inputs(cfg)
    layout = rundir.TrainDir(cfg.out)
    decision = outputs.decide(layout, inputs.identity, cfg.overwrite)
    if decision == outputs.RETURN:
        return rundir.read_json(layout.summary)  # the same work, finished before: nothing to do
    with preempt.listening() as stop:  # SIGTERM or a time-limit warning: save at the next step and exit
        job = setup(cfg, inputs, replace=decision == outputs.REPLACE)
        train_loop(job, on_step, checkpoint_steps or set(), stop)
    summary = finish(job)
    logs.log_final_metrics(job.accelerator, summary)
    logs.finish_trackers(job.accelerator)
    return summary


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
    steps: int  # the schedule's length (its cosine reaches min_lr at this step)
    last_step: int  # where the run ends: `steps`, or earlier with stop_after_steps
    warmup: int
    identity: str  # what a checkpoint must share to be resumed (`config.resume_identity`)
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
    `replace`: first delete the run of other work in `out` (`outputs.remove_earlier_run`)."""
    layout = rundir.TrainDir(cfg.out)
    accelerator = make_accelerator(cfg.mixed_precision, logs.trackers(cfg), str(layout.root))
    launch.set_tf32(cfg.tf32)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of the number of processes ({accelerator.num_processes})"
        )
    if replace:
        outputs.remove_earlier_run(layout, accelerator)
    outputs.remove_temporaries(layout, accelerator)
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
        last_step=min(steps, cfg.stop_after_steps or steps),
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
        logs.truncate_log(job.layout.log, job.progress.step)  # lines after the checkpoint are redone
        outputs.record(
            job.layout,
            cfg,
            json.loads(job.identity),
            data_fingerprint=provenance.fingerprint(examples),
            model_path=job.model_path,
            n_params=job.n_params,
            total_steps=job.steps,
            world_size=accelerator.num_processes,
            truncation=dataclasses.asdict(job.truncation),
        )
        if job.truncation.warning():
            log.warning("train: %s", job.truncation.warning())
    accelerator.wait_for_everyone()
    logs.start_trackers(accelerator, cfg)


# ----------------------------------------------------------------------------- the loop


def checkpoint_due(job: TrainJob, checkpoint_steps: set[int], timer: SaveTimer) -> bool:
    """The same answer on every process: steps all know; the timer's decision is the main process's."""
    step, every = job.progress.step, job.cfg.save_every
    return (every and step % every == 0) or step == job.last_step or step in checkpoint_steps or timer.due()


def train_loop(
    job: TrainJob, on_step: Callable | None, checkpoint_steps: set[int], stop: preempt.StopRequest | None = None
) -> None:
    """Optimizer steps up to `job.last_step`: each logged, shown to `on_step`, checkpointed when due; after a stop
    request, checkpointed at once and ended with `preempt.Preempted`."""
    cfg, progress = job.cfg, job.progress
    timer = SaveTimer(cfg.save_every_minutes, job.accelerator)
    show = cfg.progress and job.accelerator.is_local_main_process
    bar = progress_bar(total=job.last_step, initial=progress.step, desc=f"train {cfg.optim.name}", show=show)
    start = time.perf_counter() - progress.compute.wall_s  # a resumed run continues the checkpoint's clock
    while progress.step < job.last_step:
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
        stopping = stop.agreed(job.accelerator) if stop is not None else None
        if checkpoint_due(job, checkpoint_steps, timer) or stopping:
            save_checkpoint(job)
            timer.saved()
        if stopping:
            bar.close()
            raise preempt.Preempted(stopping, progress.step, str(job.layout.checkpoint(progress.step)))
    bar.close()


def save_checkpoint(job: TrainJob) -> None:
    """A resumable checkpoint at the current step (every process calls it), the log on disk before it."""
    if job.accelerator.is_main_process:
        logs.sync(job.layout.log)
    checkpoint.save(
        job.layout,
        job.accelerator,
        job.model,
        job.opt,
        job.tokenizer,
        job.progress,
        identity=job.identity,
        keep=job.cfg.keep_last,
    )


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
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == job.last_step:
        record["val_loss"] = validation_loss(
            job.model, job.val_encoded, job.tokenizer.pad_token_id, job.accelerator, cfg.micro_batch_size
        )
    if job.accelerator.is_main_process:
        logs.append(job.layout.log, record)
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
    final_loss, final_val_loss = logs.final_losses(job.layout.log)
    summary = {
        "steps": job.last_step,
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
    if job.last_step < job.steps:  # stopped part of the way along its schedule (a proxy run: stop_after_steps)
        summary["schedule_steps"] = job.steps
    checkpoint.save_final_model(job.layout, accelerator, job.model, job.tokenizer, job.cfg, job.model_path)
    if accelerator.is_main_process:
        rundir.write_json(job.layout.summary, summary)
        # Only now: until the summary marks the run finished, a kill resumes it from the last checkpoint.
        if not job.cfg.keep_optimizer_state:
            checkpoint.drop_resume_state(
                job.layout, same_as_model=job.last_step if checkpoint.model_is_master_copy(job.cfg) else None
            )
    accelerator.wait_for_everyone()
    return summary


# ----------------------------------------------------------------------------- batches


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
