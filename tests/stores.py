"""Trajectory stores written by hand (not through the profile), shared by the tests of the store and the split."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

STEPS = [10, 20, 30, 40]


def write_store(run_dir, ids, sources, L, flags=None, steps=STEPS, meta_steps=None):
    cols = [f"loss_step{s:06d}" for s in steps]
    data = {
        "id": pa.array(ids, pa.string()),
        "source": pa.array(sources, pa.string()),
        "n_tokens": pa.array([10] * len(ids), pa.int64()),
        "flag": pa.array(flags or [""] * len(ids), pa.string()),
    }
    for j, c in enumerate(cols):
        data[c] = pa.array(L[:, j], pa.float64())
    pq.write_table(pa.table(data), run_dir / "trajectories.parquet")
    (run_dir / "trajectories.meta.json").write_text(
        json.dumps({"steps": meta_steps or list(steps), "loss_columns": cols})
    )
