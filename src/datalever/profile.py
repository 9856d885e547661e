"""Profile: train a small proxy briefly and record every training example's loss trajectory.

The proxy trains for a fraction of an epoch (default 1/3) with AdamW; at K evenly spaced steps of
that run the loss engine scores every training example in the same process (no checkpoint is
saved and reloaded to record). The trajectory store, `RUN/trajectories.parquet`, gets one column
per recorded step, appended as each is recorded; a resumable proxy checkpoint is saved at the same
steps, so a run killed at any moment continues from the last recorded step and ends with the same
table as an uninterrupted run. Under several processes (torchrun / accelerate) each process scores
its share of the batches; the main process writes.

The store's format (its columns, the loss column of a step, the commit record's keys) is
`datalever.trajectories`'s; profile appends each recorded step through `trajectories.append_step`.

`RUN/trajectories.meta.json` is the commit record: it is written before training starts (settings,
data fingerprint, planned steps, proxy), and after each column (the parquet first, then the meta).
A column is part of the store only once the meta lists it in `steps`; `complete` turns true only
after the proxy run has finished (its final model and `RUN/profile/train_summary.json` written).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from datalever import checks, provenance, rundir, trajectories
from datalever.examples import DataFormat, local_data, read_data
from datalever.losses import score_encoded
from datalever.models import load_tokenizer, model_config_summary, resolve_model
from datalever.optim import OptimConfig
from datalever.progress import label as progress_label
from datalever.provenance import Classified
from datalever.rundir import RunDir
from datalever.tokens import Formatter, Truncation, check_chat_template
from datalever.train import TrainConfig, total_steps
from datalever.train import run as train_run

log = logging.getLogger(__name__)


@dataclass
class ProfileConfig(DataFormat):
    """Train a proxy model briefly and record each training example's loss at K checkpoints."""

    run_dir: str = "runs/demo"
    """Run directory; the trajectory store is written here."""
    data: str | None = None
    """Training examples to profile: a file, a datasets directory or a hub dataset (default: RUN/data/train.jsonl)."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset); default: train."""
    chat_template: str = "auto"
    """How examples are rendered for the proxy: auto (its tokenizer's chat template where it has one, else plain
    text) | none | FILE (a Jinja chat template); with a template the loss covers the assistant turns only."""
    proxy: str = "embedded:demo-base"
    """Proxy model: HF checkpoint directory or hub id, `preset:NAME` (built from scratch) or `embedded:demo-base`."""
    fraction: float = 1 / 3
    """Fraction of an epoch the proxy trains for."""
    schedule_epochs: float | None = None
    """The length, in epochs, of the learning-rate schedule the proxy's `fraction` of an epoch is the start of (its
    warmup and cosine run over all of it): the prototype recorded the first checkpoints of a 3- or 5-epoch cosine run,
    so its learning rate was still near its peak there. None: the schedule ends with the proxy's run (its learning
    rate decays to 0 at the last recorded step)."""
    checkpoints: int = 5
    """K: how many evenly spaced steps of the proxy run record every example's loss (the last is the final step)."""
    batch_size: int = 32
    """Examples per proxy optimizer step."""
    micro_batch_size: int = 8
    """Examples per forward/backward pass."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3))
    """The proxy's optimizer, as train's --optim (e.g. --optim.lr): lr 2e-3 suits the ~1M-parameter demo models;
    use ~2e-5 for a pretrained proxy such as Pythia-70M."""
    warmup_ratio: float = 0.03
    """Warmup fraction of the proxy's cosine schedule."""
    max_length: int = 512
    """Maximum tokens per example; an example whose response is cut away entirely is flagged."""
    token_budget: int | None = None
    """Padded tokens per scoring batch (length-bucketed); default 2048 on a CPU, 32768 on an accelerator."""
    seed: int = 0
    """Seed of the proxy's initialization and data order."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.positive("fraction", self.fraction)
        checks.positive("schedule_epochs", self.schedule_epochs, optional=True)
        if self.schedule_epochs is not None and self.schedule_epochs < self.fraction:
            raise checks.ConfigError(
                f"schedule_epochs={self.schedule_epochs} must be at least fraction={self.fraction} (the run is a part "
                "of its schedule)"
            )
        checks.positive("checkpoints", self.checkpoints)
        checks.positive("batch_size", self.batch_size)
        checks.positive("micro_batch_size", self.micro_batch_size)
        checks.non_negative("warmup_ratio", self.warmup_ratio)
        checks.at_most("warmup_ratio", self.warmup_ratio, 1)
        checks.positive("max_length", self.max_length)
        checks.positive("token_budget", self.token_budget, optional=True)
        local_data("data", self.data, optional=True)
        check_chat_template(self.chat_template)


PROFILE_SETTINGS = Classified(
    # Every one decides the store's numbers (the proxy, its run, what is recorded and how examples are rendered and
    # batched for scoring); an existing store is continued only for the same values.
    decide=(
        "split",
        "schema",
        "fields",
        "template",
        "chat_template",
        "proxy",
        "fraction",
        "schedule_epochs",
        "checkpoints",
        "batch_size",
        "micro_batch_size",
        "optim",
        "warmup_ratio",
        "max_length",
        "token_budget",
        "seed",
    ),
    inputs=("data",),  # what it holds counts (the store's data_fingerprint), not its path
    ignored=("run_dir", "progress", "on_conflict"),  # where the store lives, how it is shown; refuse or warn
)


class ProfileError(RuntimeError):
    """A run directory whose store cannot be continued with these settings."""


def record_steps(n_steps: int, k: int) -> list[int]:
    """K evenly spaced steps of an n-step run, the last one being n (distinct, increasing)."""
    if k < 1:
        raise ValueError("checkpoints must be at least 1")
    if k > n_steps:
        raise ValueError(
            f"{k} checkpoints do not fit in a proxy run of {n_steps} steps: lower `checkpoints` or raise `fraction`"
        )
    # n*(i+1)/k rounded half up, in exact integer arithmetic; n/k >= 1 keeps the steps distinct.
    return [(2 * n_steps * (i + 1) + k) // (2 * k) for i in range(k)]


def _identity(cfg: ProfileConfig, examples) -> dict:
    """What must match for an existing store to be continued rather than refused."""
    settings = {k: v for k, v in rundir.to_jsonable(cfg).items() if k in PROFILE_SETTINGS.decide}
    return {"config": settings, "data_fingerprint": provenance.content_fingerprint(examples)}


def _check_identity(meta_path: Path, meta: dict, identity: dict) -> None:
    defaults = provenance.flatten(rundir.to_jsonable(provenance.field_defaults(ProfileConfig)))
    found = provenance.differences(meta.get("config", {}), identity["config"], defaults=defaults)
    diffs = [f"{k}: store has {None if old is provenance.MISSING else old!r}, asked {new!r}" for k, old, new in found]
    if meta.get("data_fingerprint") != identity["data_fingerprint"]:
        diffs.append("training data: the examples differ from those the store was recorded on")
    if diffs:
        raise ProfileError(
            f"{meta_path} was made with other settings or data ({'; '.join(diffs)}); "
            f"use a new run directory, or rerun with the store's settings to continue it"
        )


def run(cfg: ProfileConfig) -> dict:
    """Profile (or continue profiling) into cfg.run_dir; returns the store's meta."""
    from accelerate import PartialState

    run_dir = RunDir(cfg.run_dir)
    data = cfg.data or str(run_dir.data_file("train"))
    examples = read_data(data, cfg.data_format(), split=cfg.split, default_split="train")
    identity = _identity(cfg, examples)
    finished = existing_store(run_dir, identity)
    if finished is not None:
        return finished
    train_cfg = proxy_train_config(cfg, data, run_dir, len(examples))
    n_steps = train_cfg.stop_after_steps or total_steps(train_cfg, len(examples))
    steps = record_steps(n_steps, cfg.checkpoints)
    state = PartialState()
    with state.main_process_first():  # one process builds a preset; the others then find it built
        model_path = resolve_model(cfg.proxy, seed=cfg.seed)
    tokenizer = load_tokenizer(model_path)
    formatter = Formatter(tokenizer, cfg.chat_template)
    encoded = [formatter.encode(ex, cfg.max_length) for ex in examples]
    start_store(cfg, run_dir, identity, steps, n_steps, encoded, str(model_path), state)
    if "initial_per_token_loss" not in rundir.read_json(run_dir.trajectories_meta):
        record_initial_loss(run_dir.trajectories_meta, model_path, encoded, tokenizer.pad_token_id, cfg, state)
    recorder = Recorder(cfg, run_dir, examples, encoded, tokenizer.pad_token_id, steps, identity)
    train_run(train_cfg, on_step=recorder, checkpoint_steps=set(steps))
    return finish_store(run_dir, steps, state)


def existing_store(run_dir: RunDir, identity: dict) -> dict | None:
    """The meta of a finished store of the same work (None: none yet, or one to continue); refuses a store of
    other settings or data, and a run directory with a store or a proxy run but no meta."""
    meta_path = run_dir.trajectories_meta
    if meta_path.exists():  # every process checks (read-only) so that all raise or return together
        meta = rundir.read_json(meta_path)
        _check_identity(meta_path, meta, identity)
        return meta if meta.get("complete") else None
    if run_dir.trajectories.exists() or run_dir.proxy.root.exists():
        raise ProfileError(
            f"{run_dir.root} holds {run_dir.trajectories.name} or {run_dir.proxy.root.name}/ but no "
            f"{meta_path.name}: not a profile run that can be continued; remove them or use a new run directory"
        )
    return None


def proxy_train_config(cfg: ProfileConfig, data: str, run_dir: RunDir, n_examples: int) -> TrainConfig:
    """The proxy's run: `fraction` of an epoch of the data, in RUN/profile/; with schedule_epochs, the start of a
    schedule that long (it stops after the fraction's steps)."""
    proxy = TrainConfig(
        model=cfg.proxy,
        data=data,
        split=cfg.split,
        schema=cfg.schema,
        fields=cfg.fields,
        template=cfg.template,
        chat_template=cfg.chat_template,
        out=str(run_dir.proxy.root),
        epochs=cfg.fraction if cfg.schedule_epochs is None else cfg.schedule_epochs,
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.micro_batch_size,
        max_length=cfg.max_length,
        optim=cfg.optim,
        warmup_ratio=cfg.warmup_ratio,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    if cfg.schedule_epochs is not None:
        proxy.stop_after_steps = total_steps(dataclasses.replace(proxy, epochs=cfg.fraction), n_examples)
    return proxy


def start_store(
    cfg: ProfileConfig, run_dir: RunDir, identity: dict, steps: list[int], n_steps: int, encoded, model_path, state
) -> None:
    """The store's commit record before training starts (kept as it is when the run continues), checked against the
    steps these settings plan; says how much max_length cuts."""
    meta_path = run_dir.trajectories_meta
    truncation = Truncation.of(encoded, cfg.max_length)
    if state.is_main_process and truncation.warning():
        log.warning("profile: %s", truncation.warning())
    if state.is_main_process and not meta_path.exists():
        rundir.write_json(
            meta_path,
            {
                **identity,
                "seed": cfg.seed,
                "steps": [],
                "loss_columns": [],
                "planned_steps": steps,
                "proxy_steps": n_steps,
                "complete": False,
                "n_examples": len(encoded),
                "truncation": dataclasses.asdict(truncation),
                "proxy": {"spec": cfg.proxy, "path": model_path, **model_config_summary(model_path)},
                "proxy_dir": run_dir.proxy.root.name,
                "versions": provenance.versions(),
            },
        )
    state.wait_for_everyone()
    planned = rundir.read_json(meta_path)["planned_steps"]
    if planned != steps:
        raise ProfileError(f"{meta_path} plans steps {planned}, these settings give {steps}")


class Recorder:
    """The proxy run's step hook: at each recorded step every example is scored by the live proxy and the column is
    appended to the store (the main process writes; every process scores its share)."""

    def __init__(self, cfg: ProfileConfig, run_dir: RunDir, examples, encoded, pad_id: int, steps, identity: dict):
        self.cfg, self.run_dir, self.examples, self.encoded = cfg, run_dir, examples, encoded
        self.pad_id, self.steps, self.identity = pad_id, steps, identity
        self.n_record_tokens = sum(len(e.input_ids) for e in encoded if not e.fully_truncated)
        self.n_cut = {e.id: e.n_cut for e in encoded}

    def __call__(self, step: int, _log_record, model, accelerator) -> None:
        if step not in self.steps:
            return
        t0 = time.perf_counter()
        scores = score_encoded(
            accelerator.unwrap_model(model),
            self.encoded,
            pad_id=self.pad_id,
            token_budget=self.cfg.token_budget,
            accelerator=accelerator,
            progress=self.cfg.progress,
            desc=progress_label(f"record step {step}"),
        )
        if accelerator.is_main_process:
            wall_s = time.perf_counter() - t0
            try:
                trajectories.append_step(
                    self.run_dir,
                    self.examples,
                    scores,
                    step,
                    self.steps,
                    self.identity,
                    wall_s,
                    record_tokens=self.n_record_tokens,
                    n_cut=self.n_cut,
                )
            except trajectories.StoreError as e:
                raise ProfileError(str(e)) from e
        accelerator.wait_for_everyone()


def finish_store(run_dir: RunDir, steps: list[int], state) -> dict:
    """Mark the store complete once the proxy has finished with every column committed; its meta."""
    meta_path = run_dir.trajectories_meta
    if state.is_main_process:
        meta = rundir.read_json(meta_path)
        if meta["steps"] != steps:  # the proxy finished, but some column was never committed
            raise ProfileError(
                f"{meta_path}: the proxy run in {run_dir.proxy.root} is finished but the store "
                f"has steps {meta['steps']} of {steps}; remove {run_dir.proxy.root} to record again"
            )
        rundir.write_json(meta_path, {**meta, "complete": True})
    state.wait_for_everyone()
    return rundir.read_json(meta_path)


def record_initial_loss(meta_path: Path, model_path: str, encoded, pad_id: int, cfg: ProfileConfig, state) -> None:
    """The proxy's per-token loss on the data before any training (the split's audit compares it with the loss after
    the short training: a proxy that does not know the data's language stays near it). One scoring pass of the
    untrained proxy, once per store."""
    from datalever.models import load_model

    model = load_model(model_path).to(state.device)
    t0 = time.perf_counter()  # the scoring pass, as a recorded step's time counts it
    scores = score_encoded(
        model,
        encoded,
        pad_id=pad_id,
        token_budget=cfg.token_budget,
        accelerator=state,
        progress=cfg.progress,
        desc=progress_label("record before training"),
    )
    del model
    if state.is_main_process:
        kept = [s for s in scores.values() if not s.flag]
        n_tokens = sum(s.n_tokens for s in kept)
        loss = sum(s.loss * s.n_tokens for s in kept) / n_tokens if n_tokens else None
        # Its time, like a recorded step's, counts in what profiling cost (report.proxy_compute).
        initial = {"initial_per_token_loss": loss, "initial_wall_s": time.perf_counter() - t0}
        rundir.write_json(meta_path, {**rundir.read_json(meta_path), **initial})
    state.wait_for_everyone()
