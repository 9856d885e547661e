"""Compare splits of one training set: do different proxies (or profile lengths) call the same examples hard?

Each split is a run directory as `datalever profile` and `datalever split` leave it (its trajectory store and its
split), or a point of a sweep. For every split: what its hard set follows (the split audit's AUROCs of the difficulty
columns and of the response's length, and its warnings), how far the proxy got on the data's language, and how far
apart the clusters' losses are over the recorded steps (the mean loss of the hard examples minus that of the easy
ones, and that gap over the mean loss: the paper's failure signature is trajectories that have not diverged). For
every pair: the adjusted Rand index of their clusterings and the overlap of their hard sets (Jaccard). Written as
split_comparison.{md,json,png} (`datalever compare-splits`, or a sweep's report where its points profile
differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datalever import checks, rundir, trajectories
from datalever.rundir import ComparisonDir, RunDir


@dataclass
class CompareConfig:
    """Compare the easy/hard splits that several runs made of one training set."""

    runs: list[str] = field(default_factory=list)
    """Run directories, each holding trajectories.parquet and split.parquet (two or more, of the same examples)."""
    names: list[str] | None = None
    """A name per run for the tables and the figure; default: each directory's name."""
    out: str = "runs/split-comparison"
    """Where split_comparison.{md,json,png} are written."""

    def __post_init__(self) -> None:
        if len(self.runs) < 2:
            raise checks.ConfigError(f"runs: name two run directories or more to compare, got {self.runs}")
        if self.names is not None and len(self.names) != len(self.runs):
            raise checks.ConfigError(f"names: one per run ({len(self.runs)}), got {len(self.names)}")
        if len(set(self.run_names)) != len(self.run_names):
            raise checks.ConfigError(f"the runs' names repeat ({self.run_names}): give --names")

    @property
    def run_names(self) -> list[str]:
        """The names given, or each directory's name."""
        return self.names or [Path(r).name for r in self.runs]


# ----------------------------------------------------------------------------- one split


def read_split(run: str | Path) -> pd.DataFrame:
    """A run's split table, indexed by example id."""
    path = RunDir(run).split().split
    if not path.exists():
        raise FileNotFoundError(f"no split at {path} (run the split stage first)")
    return pd.read_parquet(path).set_index("id")


def cluster_labels(split: pd.DataFrame) -> pd.Series:
    """Each example's group in the split: its k-means cluster, its small source taken whole, or flagged. Clusters are
    numbered by mean loss (the hard one last), so with stratify the same rank in two sources is one group."""
    flagged = split["flag"].fillna("").astype(str) != ""
    assigned = split["assigned"].astype(str) if "assigned" in split else pd.Series("kmeans", index=split.index)
    labels = assigned + ":" + split["cluster"].astype(str)
    return labels.where(~flagged, "flagged")


def hard_set(split: pd.DataFrame) -> set[str]:
    """The examples the split calls hard (flagged ones are never hard)."""
    flagged = split["flag"].fillna("").astype(str) != ""
    return set(split.index[split["hard"].astype(bool) & ~flagged])


def divergence(store: trajectories.Trajectories, split: pd.DataFrame) -> dict:
    """How far apart the hard and easy examples' mean losses are at each recorded step (the gap, and the gap over
    the mean loss of both), and the spread of the clusters' mean losses; steps also as epochs of the data."""
    losses = pd.DataFrame(store.losses, index=pd.Index(store.ids, name="id"))
    flags = pd.Series(store.flags, index=losses.index)
    losses = losses[flags == ""]
    hard = losses.index.isin(list(hard_set(split)))
    clusters = cluster_labels(split).reindex(losses.index)
    gap = losses[hard].mean() - losses[~hard].mean()
    mean = losses.mean()
    spread = losses.groupby(clusters.values).mean().pipe(lambda m: m.max() - m.min())
    config = store.meta.get("config") or {}
    per_epoch = config.get("batch_size", math.nan) / max(len(store.ids), 1)
    return {
        "steps": list(store.meta["steps"]),
        "epochs": [round(s * per_epoch, 4) for s in store.meta["steps"]],
        "gap": [float(g) for g in gap],
        "relative_gap": [float(g / m) for g, m in zip(gap, mean)],
        "spread": [float(s) for s in spread],
    }


def describe(run: str | Path, split: pd.DataFrame) -> dict:
    """One split (its table `split`, read from `run`): the proxy and its run, the hard set's size, the audit's
    findings, the losses' divergence."""
    run_dir = RunDir(run)
    store = trajectories.read_store(run_dir.trajectories)
    audit = rundir.read_json(run_dir.split().audit) if run_dir.split().audit.exists() else {}
    config = store.meta.get("config") or {}
    features = audit.get("features", {})
    return {
        "run": str(run),
        "proxy": (store.meta.get("proxy") or {}).get("spec") or config.get("proxy"),
        "proxy_path": (store.meta.get("proxy") or {}).get("path"),
        "fraction": config.get("fraction"),
        "checkpoints": len(store.meta["steps"]),
        "n": len(split),
        "n_hard": len(hard_set(split)),
        "audit": {
            name: {"auroc": f["auroc"], "ci95": f["ci95"], "higher_in": f.get("higher_in")}
            for name, f in features.items()
            if f.get("group") == "difficulty" or name == "response_tokens"
        },
        "language": {k: (audit.get("proxy") or {}).get(k) for k in ("final_over_uniform", "final_over_unigram")},
        "warnings": list(audit.get("warnings", [])),
        "divergence": divergence(store, split),
    }


# ----------------------------------------------------------------------------- pairs


def agreement(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """How two splits of the same examples agree: the adjusted Rand index of their groups, and the overlap of their
    hard sets (Jaccard: shared over either; and shared over the smaller)."""
    from sklearn.metrics import adjusted_rand_score

    if set(a.index) != set(b.index):
        raise ValueError(
            f"the splits are of different training sets ({len(set(a.index) - set(b.index))} examples only in one, "
            f"{len(set(b.index) - set(a.index))} only in the other)"
        )
    ids = list(a.index)
    ari = adjusted_rand_score(cluster_labels(a)[ids], cluster_labels(b)[ids])
    ha, hb = hard_set(a), hard_set(b)
    union, smaller = len(ha | hb), min(len(ha), len(hb))
    return {
        "ari": float(ari),
        "hard_jaccard": len(ha & hb) / union if union else 1.0,
        "hard_overlap": len(ha & hb) / smaller if smaller else 1.0,
    }


def compare(runs: dict[str, str | Path]) -> dict:
    """Every split described, and every pair's agreement (symmetric matrices in the order given)."""
    splits = {name: read_split(path) for name, path in runs.items()}
    names = list(runs)
    pairs = {(a, b): agreement(splits[a], splits[b]) for i, a in enumerate(names) for b in names[i:]}
    pairs |= {(b, a): found for (a, b), found in pairs.items()}  # each pair once: the measures are symmetric
    return {
        "splits": {name: describe(path, splits[name]) for name, path in runs.items()},
        **{key: [[pairs[a, b][key] for b in names] for a in names] for key in ("ari", "hard_jaccard", "hard_overlap")},
        "names": names,
    }


# ----------------------------------------------------------------------------- the report


def proxy_name(spec: str | None) -> str:
    """A proxy as the table names it: an arm's fine-tuned model as arm:NAME/seedS, a local path by its last part."""
    if not spec:
        return "-"
    parts = Path(spec).parts
    if "arms" in parts and len(parts) > parts.index("arms") + 2:  # RUN/arms/<arm>/seed<S>/train/model
        i = len(parts) - 1 - parts[::-1].index("arms")
        return f"arm:{parts[i + 1]}/{parts[i + 2]}"
    return parts[-1] if "/" in spec else spec


def auroc_cell(found: dict | None) -> str:
    if not found:
        return "-"
    low, high = found["ci95"]
    return f"{found['auroc']:.2f} ({low:.2f}-{high:.2f})"


def markdown(result: dict, reference: str | None = None) -> str:
    """The table of splits (agreement with `reference`, default the first) and the pairwise matrices."""
    names = result["names"]
    lines = ["# Splits compared", "", *splits_table(result, reference)]
    for key, title in (("ari", "Adjusted Rand index"), ("hard_jaccard", "Hard sets' overlap (Jaccard)")):
        lines += ["", f"## {title}, every pair", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for a, row in zip(names, result[key])]
    warned = [(name, w) for name, s in result["splits"].items() for w in s["warnings"]]
    if warned:
        lines += ["", "## Warnings", ""] + [f"- {name}: {w}" for name, w in warned]
    return "\n".join(lines) + "\n"


def splits_table(result: dict, reference: str | None = None) -> list[str]:
    """A row per split, its agreement with `reference` (default the first), with the paragraph that reads it."""
    names = result["names"]
    ref = reference or names[0]
    i_ref = names.index(ref)
    audited = list(dict.fromkeys(k for s in result["splits"].values() for k in s["audit"]))
    lines = [
        "Hard-set AUROC of each difficulty column and of the response's length (0.5: the split does not follow it;",
        "above 0.5: higher in the hard set), the gap between the hard and easy examples' mean loss at the first and",
        f"last recorded step (and over the mean loss, last), and agreement with {ref}: the adjusted Rand index of the",
        "clusterings and the Jaccard overlap of the hard sets.",
        "",
        "| split | proxy | profile (epochs) | hard | "
        + " | ".join(f"{k} AUROC (95% CI)" for k in audited)
        + " | loss gap, first → last | gap / mean, last | ARI | hard overlap | final / unigram loss | warnings |",
        "|---" * (10 + len(audited)) + "|",
    ]
    for i, name in enumerate(names):
        s = result["splits"][name]
        d = s["divergence"]
        unigram = s["language"].get("final_over_unigram")
        lines.append(
            f"| {name} | {proxy_name(s['proxy'])} | {d['epochs'][-1]:g} | {s['n_hard']}/{s['n']} | "
            + " | ".join(auroc_cell(s["audit"].get(k)) for k in audited)
            + f" | {d['gap'][0]:+.3f} → {d['gap'][-1]:+.3f} | {d['relative_gap'][-1]:+.3f} | "
            f"{result['ari'][i][i_ref]:.2f} | {result['hard_jaccard'][i][i_ref]:.2f} | "
            f"{'-' if unigram is None else f'{unigram:.2f}'} | {len(s['warnings'])} |"
        )
    return lines


def plot(result: dict, path: Path) -> str:
    """Pairwise agreement (ARI, hard overlap) as matrices, and each split's loss gap against the proxy's epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datalever.report import save_figure

    names = result["names"]
    size = max(4.0, 0.35 * len(names) + 2)
    fig, axes = plt.subplots(1, 3, figsize=(3 * size, size))
    for ax, key, title in ((axes[0], "ari", "adjusted Rand index"), (axes[1], "hard_jaccard", "hard overlap")):
        image = ax.imshow(np.asarray(result[key]), vmin=0 if key == "hard_jaccard" else -0.1, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    colors = matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, len(names)))  # one each, past ten splits too
    for i, (name, color) in enumerate(zip(names, colors)):
        d = result["splits"][name]["divergence"]
        axes[2].plot(d["epochs"], d["relative_gap"], marker="osv^D"[i % 5], color=color, label=name)
    axes[2].axhline(0, color="gray", lw=0.5)
    axes[2].set_xlabel("proxy training (epochs)")
    axes[2].set_ylabel("(hard - easy mean loss) / mean loss")
    axes[2].set_title("how far apart the losses are")
    axes[2].legend(fontsize=6)
    return save_figure(fig, path)


def write(result: dict, out: ComparisonDir, reference: str | None = None) -> str:
    """split_comparison.{md,json,png} in `out`; returns the markdown."""
    out.root.mkdir(parents=True, exist_ok=True)
    text = markdown(result, reference)
    rundir.write_json(out.json, result)
    plot(result, out.plot)
    rundir.atomic_write_text(out.md, text)
    return text


def run(cfg: CompareConfig) -> str:
    out = ComparisonDir(cfg.out)
    text = write(compare(dict(zip(cfg.run_names, cfg.runs))), out)
    return f"{text.rstrip()}\n\nwritten: {out.md}, {out.json}, {out.plot}"
