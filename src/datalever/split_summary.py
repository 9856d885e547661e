"""What a split says of itself: split_summary.json (sizes, per-source sizes, the small sources and what became of
them, mean trajectories, difficulty per cluster) and its two plots (the mean trajectory per cluster, and the data
map: mean loss against loss drop)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from datalever import rundir
from datalever.examples import DIFFICULTY_KEYS, NO_SOURCE

SMALL_ASSIGNED = {True: "small_source", False: "small_source_kept"}  # a small source upsampled whole, or kept once


def _difficulty(df: pd.DataFrame, metas: dict[str, dict]) -> dict[str, Any]:
    """Per difficulty attribute: its mean (numeric) or value counts (categorical) per cluster."""
    out: dict[str, Any] = {}
    groups = _summary_groups(df)
    for key in DIFFICULTY_KEYS:
        values = {i: metas[i][key] for i in df["id"] if i in metas and key in metas[i] and metas[i][key] is not None}
        if not values:
            continue
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
        per: dict[str, Any] = {}
        for gname, mask in groups:
            vs = [values[i] for i in df.loc[mask, "id"] if i in values]
            if numeric:
                per[gname] = {"n": len(vs), "mean": float(np.mean(vs)) if vs else None}
            else:
                counts: dict[str, int] = {}
                for v in vs:
                    counts[str(v)] = counts.get(str(v), 0) + 1
                per[gname] = dict(sorted(counts.items()))
        out[key] = {"kind": "numeric" if numeric else "categorical", "per_cluster": per}
    return out


def _summary_groups(df: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """Named row groups of the summary: each k-means cluster, then small sources and flagged rows."""
    groups = [
        (str(c), (df["assigned"] == "kmeans") & (df["cluster"] == c))
        for c in sorted(df.loc[df["assigned"] == "kmeans", "cluster"].unique())
    ]
    for special in (*SMALL_ASSIGNED.values(), "flagged"):
        mask = df["assigned"] == special
        if mask.any():
            groups.append((special, mask))
    return groups


def summarize(
    df: pd.DataFrame,
    losses_by_id: pd.DataFrame,
    *,
    k: int,
    features: str,
    stratify: bool,
    min_source_size: int,
    seed: int,
    small_sources: str = "upsample",
    small_source_rule: str = "count",
    steps: Sequence[int],
    metas: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """The split summary (sizes, per-source sizes, mean trajectories, difficulty per cluster)."""
    clusters = {}
    for gname, mask in _summary_groups(df):
        if gname == "flagged":
            continue
        traj = losses_by_id.loc[df.loc[mask, "id"]].to_numpy()
        clusters[gname] = {
            "size": int(mask.sum()),
            "hard": bool(df.loc[mask, "hard"].all()),
            "mean_loss": float(traj.mean()),
            "mean_trajectory": [float(v) for v in traj.mean(axis=0)],
            "std_trajectory": [float(v) for v in traj.std(axis=0)],
        }
    summary: dict[str, Any] = {
        "features": features,
        "k": k,
        "seed": seed,
        "stratify": stratify,
        "min_source_size": min_source_size if stratify else None,
        "steps": [int(s) for s in steps],
        "n_examples": int(len(df)),
        "n_clustered": int((df["assigned"] == "kmeans").sum()),
        "n_hard": int(df["hard"].sum()),
        "n_easy": int(((df["assigned"] == "kmeans") & ~df["hard"]).sum()),
        "n_flagged_excluded": int((df["assigned"] == "flagged").sum()),
        "flag_counts": {str(f): int(c) for f, c in df.loc[df["flag"] != "", "flag"].value_counts().items()},
        "clusters": clusters,
    }
    if stratify:
        strata = df["source"].fillna(NO_SOURCE)
        per_source = {}
        for s in sorted(strata.unique()):
            m = strata == s
            per_source[s] = {
                "n": int(m.sum()),
                "n_flagged": int((m & (df["assigned"] == "flagged")).sum()),
                "small_source": bool((m & df["assigned"].isin(SMALL_ASSIGNED.values())).any()),
                "n_hard": int((m & df["hard"]).sum()),
                "sizes": {
                    str(c): int(v)
                    for c, v in df.loc[m & (df["assigned"] == "kmeans"), "cluster"].value_counts().sort_index().items()
                },
            }
        summary["per_source"] = per_source
        summary["small_sources"] = [s for s, v in per_source.items() if v["small_source"]]
        small = df["assigned"].isin(SMALL_ASSIGNED.values())
        summary["small_source_rule"] = {
            "rule": small_source_rule,
            "min_source_size": min_source_size,
            "handling": small_sources,
            "n_sources": len(summary["small_sources"]),
            "n_examples": int(small.sum()),
            "n_upsampled": int((df["assigned"] == "small_source").sum()),
        }
    if metas:
        diff = _difficulty(df, metas)
        if diff:
            summary["difficulty"] = diff
    return summary


# ----------------------------------------------------------------------------------------------
# Plots


def _group_label(df: pd.DataFrame, gname: str, mask) -> str:
    """Legend text of a cluster (or small source): its name, whether it is the upsampled one, its size."""
    hard = " (hard)" if df.loc[mask, "hard"].all() else ""
    name = f"cluster {gname}" if gname.isdigit() else gname
    return f"{name}{hard}, n={int(mask.sum())}"


def plot_split(
    df: pd.DataFrame,
    losses_by_id: pd.DataFrame,
    steps: Sequence[int],
    out: rundir.SplitDir,
    xlabel: str = "proxy training step",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, m) for g, m in _summary_groups(df) if g != "flagged"]
    colors = plt.get_cmap("tab10")

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (gname, mask) in enumerate(groups):
        traj = losses_by_id.loc[df.loc[mask, "id"]].to_numpy()
        mu, sd = traj.mean(axis=0), traj.std(axis=0)
        ax.plot(steps, mu, marker="o", color=colors(j), label=_group_label(df, gname, mask))
        ax.fill_between(steps, mu - sd, mu + sd, color=colors(j), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("response loss (mean ± std)")
    ax.set_title("Loss trajectory per cluster")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.trajectories_plot, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (gname, mask) in enumerate(groups):
        sub = df.loc[mask]
        ax.scatter(
            sub["loss_drop"], sub["mean_loss"], s=10, alpha=0.6, color=colors(j), label=_group_label(df, gname, mask)
        )
    ax.set_xlabel("loss drop (first - last checkpoint)")
    ax.set_ylabel("mean loss over checkpoints")
    ax.set_title("Data map")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.datamap_plot, dpi=110)
    plt.close(fig)
