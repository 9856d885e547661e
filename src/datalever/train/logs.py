"""What a run tells: the JSONL log (a record per optimizer step, always written) and the trackers (TensorBoard, wandb,
... through Accelerate, with `log_with`).

The log is cut back to the checkpoint a run resumes from (the steps after it are redone), and put on disk before each
checkpoint, so a kill can tear only lines that the resume redoes. The trackers get the full config, every step's
scalars and, at the end, the final metrics, under the run's name (`run_name`: experiment/arm/seed for an experiment's
arm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datalever import provenance, rundir
from datalever.train.config import TrainConfig

TRACKER_PROJECT = "datalever"  # the trackers' project (wandb's); TensorBoard writes under out/<this>/<run name>


# ----------------------------------------------------------------------------- the JSONL log


def append(log_path: Path, record: dict) -> None:
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def sync(log_path: Path) -> None:
    """Put the log on disk before the checkpoint that resumes after its last line: a power loss can then tear only
    lines that the resume redoes."""
    if log_path.exists():
        with open(log_path, "a") as f:
            os.fsync(f.fileno())


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


def final_losses(log_path: Path) -> tuple[float | None, float | None]:
    """The last training loss and the last validation loss in the JSONL log."""
    loss = val_loss = None
    for record in read_log(log_path) if log_path.exists() else []:
        val_loss = record.get("val_loss", val_loss)
        loss = record.get("loss", loss)
    return loss, val_loss


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

    logging_dir = str(rundir.TrainDir(cfg.out).tensorboard)
    return [TensorBoardTracker(run_name(cfg), logging_dir) if str(t) == "tensorboard" else t for t in cfg.log_with]


def tracked_config(cfg: TrainConfig) -> dict:
    """Every setting, flattened (optim.lr), as trackers take hyperparameters: lists as text (TensorBoard keeps only
    numbers, text and booleans), the run name as in effect."""
    flat = provenance.flatten(rundir.to_jsonable(cfg))
    flat["run_name"] = run_name(cfg)
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()}


def start_trackers(accelerator, cfg: TrainConfig) -> None:
    accelerator.init_trackers(TRACKER_PROJECT, config=tracked_config(cfg), init_kwargs=tracker_init_kwargs(cfg))


def log_final_metrics(accelerator, summary: dict) -> None:
    """The run's outcome at its last step, for the trackers' comparisons of runs (a None loss left out)."""
    metrics = {
        "final_train_loss": summary["final_train_loss"],
        "final_val_loss": summary["final_val_loss"],
        "final_steps": summary["steps"],
        "final_wall_s": summary["compute"]["wall_s"],
    }
    accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=summary["steps"])


def finish_trackers(accelerator) -> None:
    # Not accelerator.end_training(): it also destroys the process group, which a caller running several
    # stages in one torchrun (profile, then every arm) still needs.
    for tracker in accelerator.trackers:
        tracker.finish()
