"""The trajectory store: every training example's loss at K checkpoints, its format in one place.

The profile stage writes it (`append_step`, one column per recorded step), the split reads it (`read_store`) or a
file of the same shape that another tool wrote (`read_external`), and the split's audit reads its token counts
(`counts`).

The store, ``RUN/trajectories.parquet`` (`rundir.RunDir.trajectories`): one row per training example, in the
training file's order, with the columns `COLUMNS` (``id``, ``source``, ``n_tokens``: response tokens with a loss,
``n_cut``: response tokens that max_length cut away, ``flag``: "" or e.g. "truncated") and then one float column
per recorded step, ``loss_step{step:06d}`` (`loss_column`), in increasing step order. A loss is NaN exactly where
the flag is set. Row i's trajectory is ``loss[i, t]``, t = 0..K-1 over the K checkpoints.

Its commit record, ``trajectories.meta.json`` beside it (`meta_file`; `rundir.RunDir.trajectories_meta`): a column
is part of the store only once the record lists it. Its keys: ``steps`` and ``loss_columns`` (the committed
columns), ``planned_steps``, ``complete`` (true once the proxy run has finished), ``n_examples``, ``n_flagged``,
``flag_counts``, ``mean_loss`` (per step), ``record_tokens``, ``record_wall_s`` (seconds per step), the profile's
identity (``config``, ``data_fingerprint``) and what the profile adds before its first step (``proxy``,
``truncation``, ``initial_per_token_loss``, ...).

A file written by another tool (``datalever split --trajectories FILE``): an ``id`` column holding the datalever
content ids of the training examples (what ``load_examples`` gives; ``datalever data check`` prints the first),
optional ``source`` and ``flag`` text columns, and the losses: every other column except ``n_tokens`` and ``n_cut``
(`NOT_LOSSES`: ignored, so a profile store works too), in file order, which is the checkpoint order. Loss columns
must be numeric (integer or float); no meta file is needed. Steps (the plots' x axis and the feature column names)
are the last number in each loss column's name (``loss_step000010`` and ``loss_10`` give 10) when every name has
one and they increase in file order, else 0..K-1 (`steps_from_names`).

NaN is never replaced by a number (a broken example would look easiest): only flagged rows may hold it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from datalever import rundir

COUNTS = ("n_tokens", "n_cut")  # per example: response tokens with a loss, response tokens max_length cut away
COLUMNS = ("id", "source", *COUNTS, "flag")  # the store's columns before its losses, in file order
NOT_LOSSES = ("id", "source", "flag", *COUNTS)  # the columns of another tool's file that are not losses
LOSS_COLUMN = re.compile(r"^loss_step(\d{6})$")
LAST_NUMBER = re.compile(r"(\d+)\D*$")


class StoreError(ValueError):
    """A trajectory file that cannot be read or extended as one (the message names the file and the problem)."""


class Trajectories(NamedTuple):
    """What a trajectory file holds: ids, sources (None where unknown), losses [n, K] (float64), flags ("" where
    none) and meta (at least ``steps`` and ``loss_columns``)."""

    ids: list[str]
    sources: list[str | None]
    losses: np.ndarray
    flags: list[str]
    meta: dict


def loss_column(step: int) -> str:
    """The store's column of the losses recorded at `step`."""
    return f"loss_step{step:06d}"


def meta_file(store: Path) -> Path:
    """The commit record beside a store FILE.parquet: FILE.meta.json (in a run directory, RunDir.trajectories_meta)."""
    return store.with_name(store.name.removesuffix(".parquet") + ".meta.json")


# ----------------------------------------------------------------------------------------------
# Writing (the profile stage)


def append_step(
    run_dir: rundir.RunDir,
    examples,
    scores: dict,
    step: int,
    steps: list[int],
    identity: dict,
    wall_s: float = 0.0,
    *,
    record_tokens: int | None = None,
    n_cut: dict[str, int] | None = None,
) -> None:
    """Add (or replace) the column of `step` in the store, keeping columns in step order.

    `scores`: example id -> its score at `step` (``loss``, ``n_tokens``, ``flag``: `losses.score_encoded`'s).
    The parquet is written first, the meta last: only columns the meta lists are kept from an
    existing store, so a column written by a run killed before its meta is simply recorded again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, meta_path = run_dir.trajectories, run_dir.trajectories_meta
    meta = rundir.read_json(meta_path) if meta_path.exists() else {}
    committed = [s for s in meta.get("steps", []) if s != step]
    ids = [ex.id for ex in examples]
    if store.exists() and committed:
        table = pq.read_table(store)
        if table.column("id").to_pylist() != ids:
            raise StoreError(f"{store}: its rows are not the training examples being profiled")
        cols = {name: table.column(name) for name in [*COLUMNS, *(loss_column(s) for s in committed)]}
    else:
        cols = {
            "id": pa.array(ids, pa.string()),
            "source": pa.array([ex.source for ex in examples], pa.string()),
            "n_tokens": pa.array([scores[ex.id].n_tokens for ex in examples], pa.int32()),
            "n_cut": pa.array([(n_cut or {}).get(ex.id, 0) for ex in examples], pa.int32()),
            "flag": pa.array([scores[ex.id].flag for ex in examples], pa.string()),
        }
    losses = [scores[ex.id].loss for ex in examples]
    if any(math.isnan(v) != bool(scores[ex.id].flag) for v, ex in zip(losses, examples)):
        raise StoreError(f"step {step}: a loss is NaN without a flag (or a flagged example has a loss)")
    cols[loss_column(step)] = pa.array(losses, pa.float64())
    recorded = sorted(committed + [step])
    rundir.write_parquet(store, pa.table({name: cols[name] for name in [*COLUMNS, *map(loss_column, recorded)]}))

    # Seconds spent scoring every example at each recorded step (a rerecorded step replaces its time).
    timings = {str(s): t for s, t in meta.get("record_wall_s", {}).items() if int(s) in committed}
    timings[str(step)] = wall_s
    flags = [scores[ex.id].flag for ex in examples]
    rundir.write_json(
        meta_path,
        {
            **meta,
            **identity,
            "steps": recorded,
            "loss_columns": [loss_column(s) for s in recorded],
            "planned_steps": steps,
            "complete": False,
            "n_examples": len(examples),
            "n_flagged": sum(1 for f in flags if f),
            "flag_counts": {f: flags.count(f) for f in sorted(set(flags) - {""})},
            "mean_loss": [_mean(cols[loss_column(s)].to_pylist()) for s in recorded],
            "record_tokens": record_tokens if record_tokens is not None else meta.get("record_tokens"),
            "record_wall_s": {str(s): timings[str(s)] for s in recorded},
        },
    )


def _mean(values) -> float:
    ok = [v for v in values if v is not None and not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


# ----------------------------------------------------------------------------------------------
# Reading (the split stage)


def read_store(path: str | Path) -> Trajectories:
    """Read and validate the trajectory store.

    `path` is ``trajectories.parquet`` or the run directory holding it. Raises StoreError on anything
    inconsistent.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        path = rundir.RunDir(path).trajectories
    if not path.exists():
        raise StoreError(f"no trajectory store at {path} (run the profile stage first)")
    meta_path = meta_file(path)
    if not meta_path.exists():
        raise StoreError(f"{path} has no meta file {meta_path.name}")
    meta = rundir.read_json(meta_path)
    table = pq.read_table(path)
    cols = table.column_names
    for required in ("id", "source", "flag"):
        if required not in cols:
            raise StoreError(f"{path}: missing column {required!r} (has {cols})")
    loss_cols = [c for c in cols if LOSS_COLUMN.match(c)]
    if not loss_cols:
        raise StoreError(f"{path}: no loss_stepNNNNNN columns")
    steps = [int(LOSS_COLUMN.match(c).group(1)) for c in loss_cols]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise StoreError(f"{path}: loss columns are not in strictly increasing step order: {loss_cols}")
    if "loss_columns" in meta and list(meta["loss_columns"]) != loss_cols:
        raise StoreError(f"{path}: meta loss_columns {meta['loss_columns']} != parquet columns {loss_cols}")
    if "steps" in meta and [int(s) for s in meta["steps"]] != steps:
        raise StoreError(f"{path}: meta steps {meta['steps']} do not match the loss columns {loss_cols}")
    meta = {**meta, "steps": steps, "loss_columns": loss_cols}

    ids = [str(i) for i in table.column("id").to_pylist()]
    if len(set(ids)) != len(ids):
        raise StoreError(f"{path}: duplicate ids")
    sources = table.column("source").to_pylist()
    flags = [f or "" for f in table.column("flag").to_pylist()]
    losses = _losses(table, loss_cols) if len(ids) else np.zeros((0, len(loss_cols)))
    _refuse_nan(path, ids, losses, flags)
    return Trajectories(ids, sources, losses, flags, meta)


def read_external(path: str | Path) -> Trajectories:
    """Read and validate a trajectory file written by another tool (see the module docstring).

    Its meta holds ``steps`` and ``loss_columns``. Raises StoreError naming the file (and the column or rows) on
    anything it cannot use.
    """
    path = Path(path)
    table = _read_parquet(path)
    cols = table.column_names
    if "id" not in cols:
        raise StoreError(f"{path}: no 'id' column (has {cols}); it must hold the training examples' datalever ids")
    if table.num_rows == 0:
        raise StoreError(f"{path}: empty file (no rows)")
    loss_cols = [c for c in cols if c not in NOT_LOSSES]
    if not loss_cols:
        raise StoreError(f"{path}: no loss columns (every column other than {list(NOT_LOSSES)} is a loss)")
    for c in loss_cols:
        _require_numeric(path, c, table.schema.field(c).type)
    ids = _external_ids(path, table.column("id"))
    sources = _optional_text(path, table, "source")
    flags = [f or "" for f in _optional_text(path, table, "flag")]
    losses = _losses(table, loss_cols)  # a null loss becomes NaN here, and is refused below like any NaN
    _refuse_nan(path, ids, losses, flags)
    return Trajectories(ids, sources, losses, flags, {"steps": steps_from_names(loss_cols), "loss_columns": loss_cols})


def steps_from_names(loss_cols: Sequence[str]) -> list[int]:
    """The step of each loss column: the last number in every name if all have one and they increase (loss_10,
    loss_step000020 -> 10, 20), else the position 0..K-1 (file order is the checkpoint order either way)."""
    found = [LAST_NUMBER.search(c) for c in loss_cols]
    if all(found):
        steps = [int(m.group(1)) for m in found]
        if all(b > a for a, b in zip(steps, steps[1:])):
            return steps
    return list(range(len(loss_cols)))


def _losses(table, loss_cols: Sequence[str]) -> np.ndarray:
    """The loss columns as one float64 array [n, K] (nulls become NaN)."""
    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in loss_cols])


def _refuse_nan(path: Path, ids: list[str], losses: np.ndarray, flags: list[str]) -> None:
    """NaN is never replaced by a number (a broken example would look easiest): only flagged rows may hold it."""
    bad = [ids[i] for i in np.flatnonzero(np.isnan(losses).any(axis=1)) if not flags[i]]
    if bad:
        raise StoreError(f"{path}: {len(bad)} unflagged row(s) have NaN or missing losses, e.g. ids {bad[:3]}")


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; a directory or a torn file, OSError
        raise StoreError(f"{path}: cannot read it as Parquet ({e})") from e


def _require_numeric(path: Path, column: str, dtype) -> None:
    import pyarrow as pa

    if not (pa.types.is_integer(dtype) or pa.types.is_floating(dtype)):
        raise StoreError(
            f"{path}: column {column!r} is {dtype}, not numeric; every column other than {list(NOT_LOSSES)} "
            "is read as a loss: drop or rename it"
        )


def _external_ids(path: Path, column) -> list[str]:
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise StoreError(f"{path}: column 'id' is {column.type}, not text (datalever content ids)")
    ids = column.to_pylist()
    null_rows = [i for i, v in enumerate(ids) if v is None]
    if null_rows:
        raise StoreError(f"{path}: {len(null_rows)} null id(s), e.g. at rows {null_rows[:3]} (0-based)")
    dup = pd.Series(ids)
    dup = dup[dup.duplicated()].unique().tolist()
    if dup:
        raise StoreError(f"{path}: {len(dup)} duplicate id(s), e.g. {dup[:3]}")
    return ids


def _optional_text(path: Path, table, name: str) -> list[str | None]:
    """A text column that may be absent (then all None) or null in places."""
    import pyarrow as pa

    if name not in table.column_names:
        return [None] * table.num_rows
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise StoreError(f"{path}: column {name!r} is {column.type}, not text")
    return column.to_pylist()


# ----------------------------------------------------------------------------------------------
# Counts (the split's audit)


def counts(path: str | Path) -> pd.DataFrame:
    """n_tokens (response tokens scored) and n_cut (response tokens max_length cut) per id, where the trajectory
    file has them (a profile store does; another tool's file may not)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    wanted = [c for c in COUNTS if c in names]
    if "id" not in names or not wanted:
        return pd.DataFrame()
    return pq.read_table(path, columns=["id", *wanted]).to_pandas().set_index("id")
