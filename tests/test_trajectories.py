"""The trajectory store: appending a step's column, reading the store or another tool's file, the counts."""

from __future__ import annotations

import math
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datalever import rundir
from datalever.rundir import RunDir
from datalever.trajectories import (
    COLUMNS,
    StoreError,
    append_step,
    counts,
    loss_column,
    meta_file,
    read_external,
    read_store,
    steps_from_names,
)
from stores import STEPS, write_store

# ------------------------------------------------------------------------------ the profile's store


def test_read_store_round_trip_and_validation(tmp_path):
    L = np.arange(12, dtype=float).reshape(3, 4) + 1
    L[2] = np.nan
    write_store(tmp_path, ["a", "b", "c"], ["s", None, "s"], L, flags=["", "", "truncated"])
    ids, sources, losses, flags, meta = read_store(tmp_path / "trajectories.parquet")
    assert ids == ["a", "b", "c"] and sources == ["s", None, "s"] and flags == ["", "", "truncated"]
    np.testing.assert_array_equal(losses[:2], L[:2])
    assert np.isnan(losses[2]).all() and meta["steps"] == STEPS

    write_store(tmp_path, ["a", "b", "c"], ["s"] * 3, L, flags=["", "", ""])
    with pytest.raises(StoreError, match="unflagged row"):
        read_store(tmp_path)
    write_store(tmp_path, ["a", "b", "c"], ["s"] * 3, L[[0, 1, 1]], steps=[10, 30, 20, 40])
    with pytest.raises(StoreError, match="increasing step order"):
        read_store(tmp_path)
    write_store(tmp_path, ["a", "b", "c"], ["s"] * 3, L[[0, 1, 1]], meta_steps=[1, 2, 3, 4])
    with pytest.raises(StoreError, match="meta steps"):
        read_store(tmp_path)


def test_the_commit_record_is_the_run_directorys(tmp_path):
    """read_store finds the meta beside the parquet; in a run directory that is the file rundir names."""
    run_dir = RunDir(tmp_path)
    assert meta_file(run_dir.trajectories) == run_dir.trajectories_meta


def _score(loss: float, flag: str = "", n_tokens: int = 3):
    return types.SimpleNamespace(loss=loss, flag=flag, n_tokens=n_tokens)


EXAMPLES = [types.SimpleNamespace(id=i, source=s) for i, s in [("a", "gsm"), ("b", None), ("c", "gsm")]]


@pytest.mark.usefixtures("fast_provenance")
def test_append_step_keeps_step_order_and_replaces_a_rerecorded_step(tmp_path):
    run_dir = RunDir(tmp_path)
    identity = {"config": {"seed": 0}, "data_fingerprint": "f"}
    first = {"a": _score(2.0), "b": _score(3.0), "c": _score(math.nan, "truncated", 0)}
    append_step(run_dir, EXAMPLES, first, 20, [10, 20], identity, 1.5, record_tokens=6, n_cut={"c": 9})
    later = {"a": _score(1.0), "b": _score(2.5), "c": _score(math.nan, "truncated", 0)}
    append_step(run_dir, EXAMPLES, later, 10, [10, 20], identity, 2.5)  # recorded out of order
    again = {"a": _score(1.5), "b": _score(2.0), "c": _score(math.nan, "truncated", 0)}
    append_step(run_dir, EXAMPLES, again, 10, [10, 20], identity, 3.5)  # recorded again: replaces step 10

    table = pq.read_table(run_dir.trajectories)
    assert (
        table.column_names
        == [*COLUMNS, loss_column(10), loss_column(20)]
        == [
            "id",
            "source",
            "n_tokens",
            "n_cut",
            "flag",
            "loss_step000010",
            "loss_step000020",
        ]
    )
    assert table.column("n_cut").to_pylist() == [0, 0, 9] and table.column("source").to_pylist() == ["gsm", None, "gsm"]
    meta = rundir.read_json(run_dir.trajectories_meta)
    assert meta["steps"] == [10, 20] and meta["loss_columns"] == ["loss_step000010", "loss_step000020"]
    assert meta["record_wall_s"] == {"10": 3.5, "20": 1.5} and meta["record_tokens"] == 6
    assert meta["mean_loss"] == [1.75, 2.5] and meta["flag_counts"] == {"truncated": 1} and meta["n_flagged"] == 1
    assert meta["config"] == {"seed": 0} and meta["complete"] is False
    ids, sources, losses, flags, read_meta = read_store(tmp_path)
    assert ids == ["a", "b", "c"] and flags == ["", "", "truncated"] and read_meta["steps"] == [10, 20]
    np.testing.assert_array_equal(losses[:2], [[1.5, 2.0], [2.0, 3.0]])


def test_append_step_refuses_other_rows_and_unflagged_nan(tmp_path):
    run_dir = RunDir(tmp_path)
    scores = {"a": _score(2.0), "b": _score(3.0), "c": _score(math.nan, "truncated", 0)}
    append_step(run_dir, EXAMPLES, scores, 10, [10, 20], {})
    with pytest.raises(StoreError, match="its rows are not the training examples being profiled"):
        append_step(run_dir, EXAMPLES[::-1], scores, 20, [10, 20], {})
    with pytest.raises(StoreError, match="step 20: a loss is NaN without a flag"):
        append_step(run_dir, EXAMPLES, {**scores, "a": _score(math.nan)}, 20, [10, 20], {})


# ------------------------------------------------------------------------------ another tool's file


@pytest.mark.parametrize(
    "names, steps",
    [
        (["loss_10", "loss_20", "loss_30"], [10, 20, 30]),
        (["loss_step000005", "loss_step000050"], [5, 50]),
        (["ckpt1_loss", "ckpt2_loss"], [1, 2]),
        (["early", "late"], [0, 1]),  # no numbers
        (["loss_30", "loss_20"], [0, 1]),  # numbers not increasing: file order rules, steps are positions
        (["loss_1", "final"], [0, 1]),  # not every name has a number
    ],
)
def test_steps_from_column_names(names, steps):
    assert steps_from_names(names) == steps


def test_a_profile_store_reads_as_another_tools_file_with_its_counts(tmp_path):
    """read_external skips the store's count columns (so a store can be passed as a file), and counts reads them
    where a file has them."""
    L = np.array([[2.0, 1.0], [3.0, 2.5]])
    write_store(tmp_path, ["a", "b"], ["s", None], L, steps=[5, 9])
    found = read_external(tmp_path / "trajectories.parquet")
    assert found.ids == ["a", "b"] and found.meta == {
        "steps": [5, 9],
        "loss_columns": ["loss_step000005", "loss_step000009"],
    }
    np.testing.assert_array_equal(found.losses, L)
    assert counts(tmp_path / "trajectories.parquet").to_dict() == {"n_tokens": {"a": 10, "b": 10}}
    pq.write_table(pa.table({"id": ["a"], "loss_1": [1.0]}), tmp_path / "other.parquet")
    assert counts(tmp_path / "other.parquet").empty
