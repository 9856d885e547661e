"""Profile: train a small proxy briefly and record every training example's loss trajectory.

The proxy trains for a fraction of an epoch (default 1/3) with AdamW; at K evenly spaced steps of
that run the loss engine scores every training example in the same process (no checkpoint is
saved and reloaded to record). The trajectory store, `RUN/trajectories.parquet`, gets one column
per recorded step, appended as each is recorded; a resumable proxy checkpoint is saved at the same
steps, so a run killed at any moment continues from the last recorded step and ends with the same
table as an uninterrupted run.

Store columns: id, source, n_tokens, flag ("" or "truncated"), loss_stepNNNNNN (one per
checkpoint, increasing step order; NaN only where flag is set).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datalever import rundir
from datalever.examples import load_examples
from datalever.losses import score_encoded
from datalever.models import load_tokenizer, resolve_model
from datalever.optim import OptimConfig
from datalever.tokens import encode_example
from datalever.train import TrainConfig, run as train_run, total_steps

STORE = "trajectories.parquet"
STORE_META = "trajectories.meta.json"


@dataclass
class ProfileConfig:
    """Train a proxy model briefly and record each training example's loss at K checkpoints."""

    run_dir: str = "runs/demo"
    """Run directory; the trajectory store is written here."""
    train_file: str | None = None
    """Training examples to profile (default: RUN/data/train.jsonl)."""
    proxy: str = "preset:demo"
    """Proxy model: HF checkpoint directory or hub id, or `preset:NAME` (built from scratch)."""
    fraction: float = 1 / 3
    """Fraction of an epoch the proxy trains for."""
    checkpoints: int = 5
    """K: how many evenly spaced steps of the proxy run record every example's loss (the last is the final step)."""
    batch_size: int = 32
    """Examples per proxy optimizer step."""
    micro_batch_size: int = 16
    """Examples per forward/backward pass."""
    lr: float = 1e-3
    """Proxy learning rate (1e-3 suits a preset trained from scratch; use ~2e-5 for a pretrained proxy such as Pythia-70M)."""
    warmup_ratio: float = 0.03
    """Warmup fraction of the proxy's cosine schedule."""
    max_length: int = 512
    """Maximum tokens per example; an example whose response is cut away entirely is flagged."""
    token_budget: int = 16384
    """Padded tokens per scoring batch (length-bucketed)."""
    seed: int = 0
    """Seed of the proxy's initialization and data order."""
    progress: bool = True
    """Show progress bars."""


def record_steps(n_steps: int, k: int) -> list[int]:
    """K evenly spaced steps of an n-step run, the last one being n (distinct, increasing)."""
    if k < 1:
        raise ValueError("checkpoints must be at least 1")
    if k > n_steps:
        raise ValueError(f"{k} checkpoints do not fit in a proxy run of {n_steps} steps: lower `checkpoints` "
                         f"or raise `fraction`")
    return [round(n_steps * (i + 1) / k) for i in range(k)]


def loss_column(step: int) -> str:
    return f"loss_step{step:06d}"


def _identity(cfg: ProfileConfig, examples) -> dict:
    """What must match for an existing store to be continued rather than overwritten."""
    settings = {k: v for k, v in rundir.to_jsonable(cfg).items() if k != "progress"}
    return {"config": settings, "data_fingerprint": rundir.fingerprint(examples)}


def run(cfg: ProfileConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    train_file = cfg.train_file or str(run_dir / "data" / "train.jsonl")
    examples = load_examples(train_file)
    identity = _identity(cfg, examples)
    meta_path = run_dir / STORE_META
    if meta_path.exists():
        meta = rundir.read_json(meta_path)
        if {k: meta.get(k) for k in identity} != identity:
            raise RuntimeError(f"{meta_path} was made with other settings or data; use a new run directory")
        if meta.get("complete"):
            return meta

    train_cfg = TrainConfig(model=cfg.proxy, data=train_file, out=str(run_dir / "profile"), epochs=cfg.fraction,
                            batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                            max_length=cfg.max_length, optim=OptimConfig(name="adamw", lr=cfg.lr),
                            warmup_ratio=cfg.warmup_ratio, seed=cfg.seed, progress=cfg.progress,
                            models_dir=str(run_dir / "models"))
    steps = record_steps(total_steps(train_cfg, len(examples)), cfg.checkpoints)
    tokenizer = load_tokenizer(resolve_model(cfg.proxy, run_dir / "models", seed=cfg.seed))
    encoded = [encode_example(tokenizer, ex, cfg.max_length) for ex in examples]

    def record(step, _log_record, model, accelerator):
        if step not in steps:
            return
        t0 = time.perf_counter()
        scores = score_encoded(accelerator.unwrap_model(model), encoded, pad_id=tokenizer.pad_token_id,
                               token_budget=cfg.token_budget, accelerator=accelerator,
                               progress=cfg.progress, desc=f"record step {step}")
        if accelerator.is_main_process:
            append_column(run_dir, examples, scores, step, steps, identity, time.perf_counter() - t0)
        accelerator.wait_for_everyone()

    train_run(train_cfg, on_step=record, checkpoint_steps=set(steps))
    return rundir.read_json(meta_path)


def append_column(run_dir: Path, examples, scores: dict, step: int, steps: list[int], identity: dict,
                  wall_s: float = 0.0) -> None:
    """Add (or replace) the column of `step` in the store, keeping columns in step order; meta written last."""
    store = run_dir / STORE
    meta_path = run_dir / STORE_META
    timings = rundir.read_json(meta_path).get("record_wall_s_by_step", {}) if meta_path.exists() else {}
    timings[str(step)] = wall_s
    if store.exists():
        table = pq.read_table(store)
        cols = {name: table.column(name) for name in table.column_names}
    else:
        cols = {"id": pa.array([ex.id for ex in examples], pa.string()),
                "source": pa.array([ex.source for ex in examples], pa.string()),
                "n_tokens": pa.array([scores[ex.id].n_tokens for ex in examples], pa.int32()),
                "flag": pa.array([scores[ex.id].flag for ex in examples], pa.string())}
    cols[loss_column(step)] = pa.array([scores[ex.id].loss for ex in examples], pa.float64())
    recorded = sorted(int(c[len("loss_step"):]) for c in cols if c.startswith("loss_step"))
    ordered = ["id", "source", "n_tokens", "flag"] + [loss_column(s) for s in recorded]
    rundir.write_parquet(store, pa.table({name: cols[name] for name in ordered}))
    n_flagged = sum(1 for ex in examples if scores[ex.id].flag)
    rundir.write_json(run_dir / STORE_META, {
        **identity, "steps": recorded, "loss_columns": [loss_column(s) for s in recorded],
        "planned_steps": steps, "complete": recorded == steps, "n_examples": len(examples),
        "n_flagged": n_flagged, "versions": rundir.versions(),
        "mean_loss": [_mean(cols[loss_column(s)].to_pylist()) for s in recorded],
        "record_wall_s_by_step": timings, "record_wall_s": [timings.get(str(s), 0.0) for s in recorded]})


def _mean(values) -> float:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan
