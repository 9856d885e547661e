"""What train writes in `out`, and whether a run found there is this run: resume it, return it, refuse it or replace it.

`out` holds one run. train.meta.json records what made the run there (its resume identity: the settings that decide
the numbers and the contents of the model, data and validation data, `config.resume_identity`). Before any model is
loaded, `decide` compares it with the run asked for: the same work is resumed from its last checkpoint, or, finished
(train_summary.json written), returned; other work is refused, or with `overwrite` replaced. Replacing removes only
the paths train writes (`train_outputs`), never anything else in `out`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from datalever import checks, provenance, rundir
from datalever.models import EMBEDDED_PREFIX, is_preset
from datalever.train import checkpoint
from datalever.train.config import TrainConfig, identity_differences

if TYPE_CHECKING:
    from accelerate import Accelerator

STAGE = "train"  # names its provenance files: train.config.yaml, train.meta.json

# What `decide` answers.
START = "start"  # nothing of train's in out, or a checkpoint of this run to resume
RETURN = "return"  # this run, finished
REPLACE = "replace"  # another run, which overwrite deletes first


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
        layout.tensorboard,
        layout.wandb,
    ]


def decide(layout: rundir.TrainDir, identity: str, overwrite: bool) -> str:
    """START, RETURN or REPLACE for a run of `identity` in `layout`; raises OtherRunError for another run's `out`
    without `overwrite`."""
    other = other_run(layout, identity)
    if other and not overwrite:
        raise OtherRunError(
            f"{layout.root} holds {other}: use a new --out, or --overwrite true to delete train's files there "
            f"and train again"
        )
    if other is not None:
        return REPLACE
    return RETURN if layout.summary.exists() else START


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
    differences = identity_differences(recorded, identity)
    if not differences:
        return None
    shown = "; ".join(differences[:4]) + (f"; ... ({len(differences) - 4} more)" if len(differences) > 4 else "")
    return f"a training run with other settings or inputs ({shown})"


def record(layout: rundir.TrainDir, cfg: TrainConfig, identity: dict, **facts) -> None:
    """train.config.yaml and train.meta.json: the settings, and what made the run (its identity, the data's
    fingerprint, ...), which `other_run` reads."""
    provenance.record(layout.root, STAGE, cfg, identity=identity, **facts)


# ----------------------------------------------------------------------------- inputs apart from outputs


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


# ----------------------------------------------------------------------------- clearing out


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
