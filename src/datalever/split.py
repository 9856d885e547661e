"""Split: turn loss trajectories into an easy/hard split by k-means.

Input: the profile's trajectory store (``RUN/trajectories.parquet`` and its meta), or (``SplitConfig.trajectories``)
a Parquet file of the same shape written by another tool; `datalever.trajectories` describes and reads both. Row i's
trajectory is ``loss[i, t]``, t = 0..K-1 over the K checkpoints. The ids of another tool's file must cover the
training file exactly (when it is known): an id the training set lacks, or a training example without a trajectory,
is an error, since upsample could not match it.

Features (what k-means sees; the choice is ``SplitConfig.features``; each is one entry of `FEATURE_KINDS`):

- ``trajectory`` (default): the raw trajectory, ``x_i = (loss[i,0], ..., loss[i,K-1])`` (K values).
- ``final``: the final loss only, ``x_i = (loss[i,K-1],)`` (1 value; the paper's ablation).
- ``relative``: the step-to-step ratios, ``x_i = (loss[i,1]/loss[i,0], ..., loss[i,K-1]/loss[i,K-2])``
  (K-1 values; needs K >= 2 and strictly positive losses). It describes the *shape* of the curve
  (how fast the loss falls), not its level.
- ``residual``: each checkpoint's loss minus a per-token-kind baseline, ``x_i[t] = loss[i,t] - c_i . b_t``, where
  ``c_i`` is example i's composition (``audit.composition_covariates``: its response's fractions of digit, letter
  and symbol characters) and ``b_t`` the per-kind losses, fitted by least squares on ``loss[:,t]`` over the
  clustered examples (one fit for all sources; with ``stratify``, one per source, as each source is clustered
  alone; sources too small to cluster keep the common fit). A mean loss that mixes per-kind losses is linear in
  the kind fractions, so the residual is how far the example's loss is above or below what its composition predicts
  (K values; needs the training examples).

The mean per-token loss rewards text the proxy cannot model (an example with more prose than digits has a higher
loss at every step, whatever its difficulty): ``split_audit.json`` measures how much of the split that explains,
and ``residual`` removes the level that the mix of token kinds sets.

Features are clustered as they are (no rescaling). The "hard" cluster is the one whose members have the highest
mean of a hardness value: for ``trajectory``, ``final`` and ``relative`` the raw loss (mean over all members and
all checkpoints); for ``residual`` the residual (hard = more loss than the composition predicts; ranking it by raw
loss would bring the composition back). With ``hard_by="features"`` it is the mean of the clustered features
themselves, as the prototype ranks them: for ``relative`` the highest mean ratio (the loss that fell least). Cluster
labels are then renumbered by that mean, so cluster 0 is the
easiest and cluster k-1 the hardest: with stratification, label j means "the j-th easiest within its source".

Stratification (``stratify=True``) clusters each source separately. A small source (``small_source_rule``:
fewer than ``max(min_source_size, k)`` usable examples; with ``mean`` also fewer rows than the mean source size, the
prototype's rule) is not clustered: by default (``small_sources="upsample"``) all of it is labelled hard (so it is
upsampled whole), with ``cluster = -1`` and ``assigned = "small_source"``; with ``keep`` it is used once
(``assigned = "small_source_kept"``, not hard); with ``cluster`` it is clustered like the others unless it has fewer
than k usable examples. The summary reports the sources and how many examples each rule upsampled. Rows whose
``source`` is null form one stratum of their own.

Flagged rows (non-empty ``flag``; their losses are NaN) are excluded from clustering: they get
``cluster = -1``, ``hard = False``, ``assigned = "flagged"`` and are counted in the summary. NaN is
never replaced by a number; a NaN in an unflagged row is an error.

Outputs in the run directory: ``split.parquet`` (one row per input row: id, source, flag, cluster,
hard, assigned, mean_loss, loss_drop, then the feature columns ``feat_*``), ``split_summary.json``,
``split_audit.json`` (``audit.audit_split``: AUROC with 95% CI of hard membership against length, composition,
truncation and the difficulty columns; the proxy's per-token loss against an untrained model's; warnings, also
in the summary's ``audit_warnings``), ``split_trajectories.png`` (mean ± std trajectory per cluster) and
``split_datamap.png`` (mean loss against loss drop = first - last loss, coloured by cluster).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd

from datalever import audit, checks, provenance, rundir, trajectories
from datalever.examples import NO_SOURCE, DataFormat, local_data, read_data
from datalever.provenance import Classified
from datalever.split_summary import SMALL_ASSIGNED, plot_split, summarize

log = logging.getLogger(__name__)


class SplitError(ValueError):
    """The trajectories cannot be split as asked (the message says why)."""


SMALL_SOURCES = ("upsample", "cluster", "keep")  # what becomes of a source too small to cluster (with stratify)
SMALL_SOURCE_RULES = ("count", "mean")  # which sources are small
HARD_BY = ("loss", "features")  # which cluster is hard


@dataclass
class SplitConfig(DataFormat):
    """Cluster the examples' loss trajectories into easy and hard (k-means), and audit what "hard" tracks."""

    run_dir: str = "runs/demo"
    """Run directory: reads trajectories.parquet (+ .meta.json), writes split.parquet, split_summary.json and plots."""
    features: str = "trajectory"
    """What k-means clusters: 'trajectory' (raw losses per checkpoint), 'final' (last loss only), 'relative' (ratios
    loss[t+1]/loss[t]) or 'residual' (losses minus a per-token-kind baseline fitted on the examples' mix of digit,
    letter and symbol characters; hard = the most loss above the baseline)."""
    k: int = 2
    """Number of k-means clusters; the one with the highest mean loss (with 'residual': residual) is 'hard'."""
    seed: int = 0
    """Seed of k-means (scikit-learn KMeans, n_init=10)."""
    stratify: bool = False
    """Cluster each data source separately (what happens to sources too small to cluster: small_sources)."""
    small_sources: str = "upsample"
    """With stratify, a source that small_source_rule calls small: upsample (all of it labelled hard, so upsampled
    whole, without clustering: what the prototype does) | cluster (clustered like any other; one with fewer than k
    usable examples is kept) | keep (used once: neither hard nor easy)."""
    small_source_rule: str = "count"
    """With stratify, which sources are small: count (fewer usable examples than min_source_size) | mean (fewer rows
    than the mean source size, or fewer usable examples than min_source_size: the prototype's rule,
    schedules/s2l_upsample.py of github.com/chrisVat/sam, with min_source_size 78). A source with fewer than k usable
    examples is small under either."""
    min_source_size: int = 10
    """With stratify: the size below which a source is small (small_source_rule)."""
    hard_by: str = "loss"
    """Which cluster is hard: loss (the highest mean raw loss over its members and checkpoints; for residual features
    the highest mean residual) | features (the highest mean of the features k-means clustered: the prototype's rule;
    it differs from loss for relative features, where it is the highest mean ratio loss[t+1]/loss[t], the cluster
    whose loss fell least, and for final, where it is the final loss alone)."""
    trajectories: str | None = None
    """Loss trajectories computed by another tool, instead of RUN/trajectories.parquet: a Parquet file with an 'id'
    column (datalever content ids of the training examples), optional 'source' and 'flag', and every other numeric
    column a loss, in checkpoint order (see docs/interop.md). The ids must match the examples of `data` exactly."""
    data: str | None = None
    """The training examples (read with the data options, as profile read them): their difficulty columns (level,
    steps, ...) and composition for the audit; default RUN/data/train.jsonl if it exists. With trajectories, the ids
    are checked against them."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset); default: train."""
    out: str | None = None
    """Directory for split.parquet, split_summary.json and the plots (default: the run directory; the experiment puts a
    split with other features under RUN/splits/<features>)."""
    overwrite: bool = False
    """Replace a split made in the same place with other settings (without it such a rerun is refused)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        local_data("data", self.data, optional=True)
        checks.one_of("features", self.features, FEATURES)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise checks.ConfigError(
                f"k must be an integer >= 2 (two clusters at least: easy and hard), got {self.k!r}"
            )
        checks.positive("min_source_size", self.min_source_size)
        checks.one_of("small_sources", self.small_sources, SMALL_SOURCES)
        checks.one_of("small_source_rule", self.small_source_rule, SMALL_SOURCE_RULES)
        checks.one_of("hard_by", self.hard_by, HARD_BY)
        checks.existing_path("trajectories", self.trajectories, optional=True)


SPLIT_SETTINGS = Classified(
    # Every one decides the split's files; paths as given (an experiment compares its own split without them: a run
    # directory moved elsewhere continues).
    decide=(
        "schema",
        "fields",
        "template",
        "run_dir",
        "features",
        "k",
        "seed",
        "stratify",
        "small_sources",
        "small_source_rule",
        "min_source_size",
        "hard_by",
        "trajectories",
        "data",
        "split",
        "out",
    ),
    ignored=("overwrite", "on_conflict"),  # on_conflict: warn or refuse, the same data either way
)


# ----------------------------------------------------------------------------------------------
# Features (pure): one entry each in FEATURE_KINDS


def composition_residuals(losses: np.ndarray, covariates: np.ndarray | None) -> np.ndarray:
    """Each checkpoint's loss minus its least-squares fit on the covariates, fitted over the rows where both are
    finite (the others stay NaN). No intercept is added: the kind fractions sum to 1 and play its part."""
    if covariates is None:
        raise SplitError("features='residual' needs the examples' composition (--data: the examples)")
    c = np.asarray(covariates, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != losses.shape[0]:
        raise SplitError(f"covariates {c.shape} do not match losses {losses.shape}")
    ok = np.isfinite(losses).all(axis=1) & np.isfinite(c).all(axis=1)
    out = np.full(losses.shape, np.nan)
    if ok.sum() <= c.shape[1]:
        raise SplitError(f"features='residual': {int(ok.sum())} scored example(s) cannot fit {c.shape[1]} covariates")
    beta, *_ = np.linalg.lstsq(c[ok], losses[ok], rcond=None)  # one fit per checkpoint (column of losses)
    out[ok] = losses[ok] - c[ok] @ beta
    return out


def _step_ratios(losses: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return losses[:, 1:] / losses[:, :-1]


def _raw_losses(losses: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return losses


def _the_features(losses: np.ndarray, feats: np.ndarray) -> np.ndarray:
    return feats


@dataclass(frozen=True)
class Feature:
    """One kind of split feature: what k-means clusters, made from the loss trajectories. A new kind is one entry of
    FEATURE_KINDS (and a line in SplitConfig.features' help)."""

    name: str
    compute: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    """(losses [n, K], covariates [n, c] or None) -> features [n, d]; NaN rows stay NaN."""
    columns: Callable[[list[int]], list[str]]
    """The K checkpoints' steps -> the d feature columns' names in split.parquet (feat_*)."""
    hardness: Callable[[np.ndarray, np.ndarray], np.ndarray] = _raw_losses
    """(losses, features) -> the values whose cluster mean ranks the clusters (the highest = hard)."""
    covariates: bool = False
    """Fitted on the examples' composition (audit.composition_covariates): needs the training examples, and with
    stratify is fitted within each source."""
    min_checkpoints: int = 1
    """The fewest checkpoints (K) it can be computed from."""


FEATURE_KINDS = {
    kind.name: kind
    for kind in (
        Feature("trajectory", lambda losses, _: losses.copy(), lambda steps: [f"feat_loss_step{s:06d}" for s in steps]),
        Feature("final", lambda losses, _: losses[:, -1:].copy(), lambda steps: [f"feat_loss_step{steps[-1]:06d}"]),
        Feature(
            "relative",
            _step_ratios,
            lambda steps: [f"feat_ratio_step{b:06d}_{a:06d}" for a, b in zip(steps, steps[1:])],
            min_checkpoints=2,
        ),
        Feature(
            "residual",
            composition_residuals,
            lambda steps: [f"feat_residual_step{s:06d}" for s in steps],
            hardness=_the_features,  # hard = more loss than the composition predicts; raw loss would bring it back
            covariates=True,
        ),
    )
}
FEATURES = tuple(FEATURE_KINDS)


def feature_kind(features: str) -> Feature:
    if features not in FEATURE_KINDS:
        raise SplitError(f"unknown features {features!r}; choose one of {FEATURES}")
    return FEATURE_KINDS[features]


def compute_features(losses: np.ndarray, features: str, covariates: np.ndarray | None = None) -> np.ndarray:
    """The feature matrix for `losses` [n, K] (see the module docstring). NaN rows stay NaN. `covariates` [n, c]:
    the composition a covariate baseline ('residual') is fitted on (only such features use them)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2:
        raise SplitError(f"losses must be 2-D [n, K], got shape {losses.shape}")
    kind = feature_kind(features)
    if losses.shape[1] < kind.min_checkpoints:
        raise SplitError(f"features={features!r} needs at least {kind.min_checkpoints} checkpoints")
    return kind.compute(losses, covariates)


# ----------------------------------------------------------------------------------------------
# Clustering (pure)


def _kmeans_ranked(x: np.ndarray, raw: np.ndarray, k: int, seed: int, what: str) -> np.ndarray:
    """k-means labels for rows of `x`, renumbered so label order = order of the cluster's mean of `raw` (its
    hardness values; k-1 = hardest)."""
    from sklearn.cluster import KMeans

    n = x.shape[0]
    if n < k:
        raise SplitError(f"{what}: {n} example(s) cannot form k={k} clusters")
    if not np.isfinite(x).all():
        raise SplitError(f"{what}: features are not finite (e.g. a zero loss with features='relative')")
    n_distinct = np.unique(x, axis=0).shape[0]
    if n_distinct < k:
        raise SplitError(
            f"{what}: only {n_distinct} distinct feature vector(s) among {n} examples "
            f"(identical trajectories?); cannot form k={k} clusters"
        )
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    means = np.array([raw[labels == c].mean() for c in range(k)])
    order = np.argsort(means, kind="stable")  # order[r] = original label with rank r
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[labels]


def split_trajectories(
    ids: Sequence[str],
    sources: Sequence[str | None],
    losses: np.ndarray,
    *,
    features: str = "trajectory",
    k: int = 2,
    seed: int = 0,
    stratify: bool = False,
    min_source_size: int = 10,
    small_sources: str = "upsample",
    small_source_rule: str = "count",
    hard_by: str = "loss",
    flags: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    covariates: np.ndarray | None = None,
) -> pd.DataFrame:
    """Cluster the trajectories; the core of the split stage, pure.

    Returns a frame with one row per input row, in input order: ``id, source, flag, cluster, hard,
    assigned, mean_loss, loss_drop`` and the feature columns. Rows with a non-empty flag are excluded
    from clustering. Without `flags`, every row must be NaN-free. `steps` only names the feature
    columns (default 0..K-1). `covariates` [n, c]: each row's composition, for features='residual'.
    """
    losses, flags, steps = _checked_input(ids, sources, losses, features=features, k=k, flags=flags, steps=steps)
    kind = FEATURE_KINDS[features]
    strata = _strata(sources)
    threshold = max(int(min_source_size), k) if stratify else k  # the smallest stratum clustered on its own
    feats = _features(kind, losses, covariates, flags, strata if stratify else None, threshold)
    hardness = kind.hardness(losses, feats) if hard_by == "loss" else feats
    frame, cols = _working_frame(ids, sources, flags, losses, hardness, feats, kind.columns(steps))
    input_order = frame.index.copy()
    usable = _clustered_rows(frame, cols)
    small = _small_strata(strata, usable, k, min_source_size, small_source_rule) if stratify else set()
    for name, mask in _groups(strata, usable, stratify):
        if name in small and (small_sources != "cluster" or mask.sum() < k):
            upsampled = small_sources == "upsample"  # else kept: used once, neither hard nor easy
            frame.loc[mask, ["cluster", "hard", "assigned"]] = [-1, upsampled, SMALL_ASSIGNED[upsampled]]
        else:
            _cluster(frame, mask, cols, k, seed, "all examples" if name is None else f"source {name!r}")
    assert frame.index.equals(input_order)
    return _output(frame, cols)


def _small_strata(strata: np.ndarray, usable: np.ndarray, k: int, min_size: int, rule: str) -> set:
    """The sources too small to cluster: fewer usable rows than min_size (and than k, always); with rule "mean" also
    fewer rows than the mean source size (the prototype's: rows in the pool / sources, flagged rows included)."""
    names, rows = np.unique(strata, return_counts=True)
    mean_rows = rows.sum() / len(names)
    small = set()
    for name, n_rows in zip(names, rows):
        n_usable = int((usable & (strata == name)).sum())
        if n_usable < max(min_size, k) or (rule == "mean" and n_rows < mean_rows):
            small.add(name)
    return small


def _checked_input(ids, sources, losses, *, features: str, k: int, flags, steps) -> tuple[np.ndarray, list, list]:
    """`split_trajectories`' inputs as it uses them: losses as float64 [n, K], flags ("" where none) and steps
    (default 0..K-1); SplitError where they disagree."""
    losses = np.asarray(losses, dtype=np.float64)
    n = len(ids)
    if losses.ndim != 2 or losses.shape[0] != n or len(sources) != n:
        raise SplitError(f"ids ({n}), sources ({len(sources)}) and losses {losses.shape} disagree")
    if n == 0:
        raise SplitError("no examples to split")
    if losses.shape[1] == 0:
        raise SplitError("losses have no checkpoints")
    feature_kind(features)
    if k < 2:
        raise SplitError(f"k must be >= 2, got {k}")
    flags = [""] * n if flags is None else [f or "" for f in flags]
    if len(flags) != n:
        raise SplitError(f"flags ({len(flags)}) and ids ({n}) disagree")
    steps = list(range(losses.shape[1])) if steps is None else list(steps)
    if len(steps) != losses.shape[1]:
        raise SplitError(f"{len(steps)} steps for {losses.shape[1]} loss columns")
    return losses, flags, steps


def _strata(sources: Sequence[str | None]) -> np.ndarray:
    """Each row's stratum: its source, the null source being one stratum of its own."""
    return pd.Series(pd.array(list(sources), dtype="string")).fillna(NO_SOURCE).to_numpy(dtype=object)


def _features(kind: Feature, losses, covariates, flags, strata: np.ndarray | None, threshold: int) -> np.ndarray:
    """The features of every row. A covariate baseline is fitted on the clustered (unflagged) rows only, and with
    stratification (`strata` given) within each source."""
    usable_rows = np.array([not f for f in flags])
    feats = compute_features(losses, kind.name, _masked(covariates, usable_rows))
    if kind.covariates and strata is not None:
        feats = _fitted_per_source(kind, losses, covariates, usable_rows, strata, threshold, feats)
    return feats


def _fitted_per_source(kind: Feature, losses, covariates, usable_rows, strata, threshold: int, global_fit: np.ndarray):
    """With stratify, each source's examples are clustered among themselves, so the composition baseline is fitted
    within each source too: sources differ in how their mix of token kinds sets the loss (a code source's letters
    are not a word problem's), and one fit across sources would leave each source's own composition effect in its
    residuals. Sources too small to cluster (upsampled whole) keep the fit across all sources."""
    n_covariates = np.asarray(covariates).shape[1]
    out = global_fit.copy()
    for name in sorted(set(strata[usable_rows])):
        rows = usable_rows & (strata == name)
        if rows.sum() >= threshold and rows.sum() > n_covariates:
            out[rows] = compute_features(losses[rows], kind.name, _masked(covariates, rows)[rows])
    return out


def _masked(covariates: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """The covariates with the rows that are not clustered (flagged) set to NaN, so the baseline is fitted on the
    clustered rows only."""
    if covariates is None:
        return None
    c = np.array(covariates, dtype=np.float64)
    if c.ndim == 2 and c.shape[0] == len(rows):
        c[~rows] = np.nan
    return c


class _Columns(NamedTuple):
    """The columns of `split_trajectories`' working frame besides the output's own."""

    raw: list[str]  # the losses (dropped from the output)
    rank: list[str]  # the hardness values (dropped from the output)
    features: list[str]  # what k-means clusters (kept: feat_*)


def _working_frame(ids, sources, flags, losses, rank, feats, feature_names) -> tuple[pd.DataFrame, _Columns]:
    """One row per input row, in input order, indexed by id (labels are written by id, never by position: the
    prototype wrote cluster indices local to a source as global ones), every row flagged until assigned."""
    frame = pd.DataFrame(
        {
            "id": [str(i) for i in ids],
            "source": pd.array(list(sources), dtype="string"),
            "flag": flags,
        }
    )
    if frame["id"].duplicated().any():
        raise SplitError(f"duplicate ids, e.g. {frame['id'][frame['id'].duplicated()].iloc[0]!r}")
    frame = frame.set_index("id", drop=False)
    raw, ranks = [f"_raw{t}" for t in range(losses.shape[1])], [f"_rank{t}" for t in range(rank.shape[1])]
    cols = _Columns(raw=raw, rank=ranks, features=list(feature_names))
    frame[cols.raw] = losses  # positional assignment once, while the frame is still in input order
    frame[cols.rank] = rank
    frame[cols.features] = feats
    frame["mean_loss"] = losses.mean(axis=1)  # NaN stays NaN for flagged rows
    frame["loss_drop"] = losses[:, 0] - losses[:, -1]
    frame["cluster"] = -1
    frame["hard"] = False
    frame["assigned"] = "flagged"
    return frame, cols


def _clustered_rows(frame: pd.DataFrame, cols: _Columns) -> pd.Series:
    """The rows k-means may see: the unflagged ones. NaN in one of them is an error (never treated as 0)."""
    flagged = frame["flag"] != ""
    nan_rows = frame[cols.raw].isna().any(axis=1)
    if (nan_rows & ~flagged).any():
        bad = frame.index[nan_rows & ~flagged].tolist()
        if nan_rows.all():
            raise SplitError("all trajectories are NaN: nothing to cluster")
        raise SplitError(f"{len(bad)} unflagged row(s) have NaN losses (NaN is never treated as 0), e.g. {bad[:3]}")
    usable = ~flagged
    if not usable.any():
        raise SplitError(f"all {len(frame)} examples are flagged: nothing to cluster")
    return usable


def _groups(strata: np.ndarray, usable: pd.Series, stratify: bool) -> list[tuple[str | None, pd.Series]]:
    """The row sets clustered apart: with stratify each source's clustered rows (by source name), else all of them."""
    if not stratify:
        return [(None, usable)]
    return [(s, usable & (strata == s)) for s in sorted(set(strata[usable.to_numpy()]))]


def _cluster(frame: pd.DataFrame, mask: pd.Series, cols: _Columns, k: int, seed: int, what: str) -> None:
    """k-means on the rows of `mask`; their cluster (0 = easiest), hard (the hardest cluster) and assigned."""
    member_ids = frame.index[mask]
    sub = frame.loc[member_ids]
    assert list(sub.index) == list(member_ids)
    labels = _kmeans_ranked(sub[cols.features].to_numpy(), sub[cols.rank].to_numpy(), k, seed, what)
    result = pd.Series(labels, index=member_ids)  # labels keyed by id: no positions leave this block
    frame.loc[member_ids, "cluster"] = result
    frame.loc[member_ids, "hard"] = result == k - 1
    frame.loc[member_ids, "assigned"] = "kmeans"
    assert (frame.loc[member_ids, "cluster"].to_numpy() == result.loc[member_ids].to_numpy()).all()


def _output(frame: pd.DataFrame, cols: _Columns) -> pd.DataFrame:
    """split.parquet's frame: the working columns dropped, a plain index, the output's column order."""
    out = frame.drop(columns=cols.raw + cols.rank).reset_index(drop=True)
    out["cluster"] = out["cluster"].astype("int64")
    out["hard"] = out["hard"].astype(bool)
    return out[["id", "source", "flag", "cluster", "hard", "assigned", "mean_loss", "loss_drop", *cols.features]]


# ----------------------------------------------------------------------------------------------
# The stage


def read_input(cfg: SplitConfig, run_dir: rundir.RunDir) -> trajectories.Trajectories:
    """The trajectories the split clusters: the external file if given, else the profile's store (finished)."""
    try:
        if cfg.trajectories:
            return trajectories.read_external(cfg.trajectories)
        found = trajectories.read_store(run_dir.trajectories)
    except trajectories.StoreError as e:
        raise SplitError(str(e)) from e
    if found.meta.get("complete") is False:
        raise SplitError(
            f"{run_dir.trajectories_meta}: the profile is not finished "
            f"(recorded steps {found.meta.get('steps')}); run `datalever profile` again to complete it"
        )
    return found


def refuse_other_trajectories(out: rundir.SplitDir, cfg: SplitConfig, digest: str | None) -> None:
    """refuse_other_settings compares the options, so another file name is refused there; this refuses the same
    name holding other content (a file rewritten in place), unless overwrite."""
    meta_file = rundir.provenance_files(out.root, "split")[1]
    if cfg.overwrite or digest is None or not meta_file.exists():
        return
    before = rundir.read_json(meta_file).get("trajectories_sha256")
    if before is not None and before != digest:
        raise checks.ConfigError(
            f"{out.root} holds split outputs made from other trajectories ({cfg.trajectories} has other content "
            "now): use another output directory, or --overwrite true to replace them"
        )


def refuse_uncovered(ids: Sequence[str], examples: Sequence, trajectory_file: str, train_file: Path) -> None:
    """The trajectories must cover the training set exactly: upsample matches split rows to examples by id, so an
    unknown id, or an example without a trajectory, would leave the split and the arm disagreeing."""
    train_ids = [ex.id for ex in examples]
    known, have = set(train_ids), set(ids)
    unknown = [i for i in ids if i not in known]
    missing = [i for i in train_ids if i not in have]
    if unknown or missing:
        raise SplitError(
            f"{trajectory_file} and {train_file} disagree: {len(unknown)} id(s) of the trajectories are not training "
            f"examples (e.g. {unknown[:3]}), {len(missing)} training example(s) have no trajectory "
            f"(e.g. {missing[:3]}); the ids must be the examples' datalever ids (`datalever data check --data FILE` "
            "shows the first)"
        )


def run(cfg: SplitConfig) -> dict:
    """Run the split stage on `cfg.run_dir`; returns the summary (also written to split_summary.json)."""
    import pyarrow as pa

    from datalever.examples import load_examples

    run_dir = rundir.RunDir(cfg.run_dir)
    out = rundir.SplitDir(cfg.out) if cfg.out else run_dir.split()
    provenance.refuse_other_settings(out.root, "split", cfg, ignore=SPLIT_SETTINGS.ignored)
    digest = provenance.file_sha256(cfg.trajectories) if cfg.trajectories else None
    refuse_other_trajectories(out, cfg, digest)
    ids, sources, losses, flags, meta = read_input(cfg, run_dir)

    train_file = Path(cfg.data) if cfg.data else run_dir.data_file("train")
    examples = None
    if cfg.data:
        examples = read_data(cfg.data, cfg.data_format(), split=cfg.split, default_split="train")
    elif train_file.exists():
        examples = load_examples(str(train_file))
    if cfg.trajectories and examples is not None:
        refuse_uncovered(ids, examples, cfg.trajectories, train_file)
    metas = None if examples is None else {ex.id: dict(ex.meta or {}) for ex in examples}

    steps = meta["steps"]
    covariates = None
    if FEATURE_KINDS[cfg.features].covariates and examples is not None:
        covariates = audit.composition_covariates(examples, ids)
    df = split_trajectories(
        ids,
        sources,
        losses,
        features=cfg.features,
        k=cfg.k,
        seed=cfg.seed,
        stratify=cfg.stratify,
        min_source_size=cfg.min_source_size,
        small_sources=cfg.small_sources,
        small_source_rule=cfg.small_source_rule,
        hard_by=cfg.hard_by,
        flags=flags,
        steps=steps,
        covariates=covariates,
    )
    losses_by_id = pd.DataFrame(losses, index=pd.Index(ids, name="id"))

    summary = summarize(
        df,
        losses_by_id,
        k=cfg.k,
        features=cfg.features,
        stratify=cfg.stratify,
        min_source_size=cfg.min_source_size,
        seed=cfg.seed,
        small_sources=cfg.small_sources,
        small_source_rule=cfg.small_source_rule,
        steps=steps,
        metas=metas,
    )
    summary["truncation"] = meta.get("truncation")  # the profile's count of examples cut by max_length
    summary["trajectories"] = str(cfg.trajectories or run_dir.trajectories)
    split_audit = audit_of(cfg, run_dir, df, examples, ids, losses, meta)
    summary["audit_warnings"] = split_audit["warnings"]
    for warning in split_audit["warnings"]:
        log.warning("split: %s", warning)
    table = pa.Table.from_pandas(df, preserve_index=False)
    out.root.mkdir(parents=True, exist_ok=True)
    provenance.record(
        out.root,
        "split",
        cfg,
        trajectories=provenance.fingerprint(types.SimpleNamespace(id=i) for i in ids),
        trajectories_sha256=digest,  # an external file's bytes: a rerun on other content is refused
        train_file=str(train_file) if metas is not None else None,
    )
    xlabel = "checkpoint (from the loss column names)" if cfg.trajectories else "proxy training step"
    plot_split(df, losses_by_id, steps, out, xlabel=xlabel)
    rundir.write_parquet(out.split, table)
    rundir.write_json(out.audit, split_audit)
    rundir.write_json(out.summary, summary)  # last: its presence marks a finished split
    return summary


def audit_of(cfg: SplitConfig, run_dir: rundir.RunDir, df: pd.DataFrame, examples, ids, losses, meta) -> dict:
    """The split's audit (see datalever.audit): the trajectory file's token counts, and for a profile store the
    proxy's per-token loss against an untrained model's (another tool's file says nothing of its model)."""
    store = Path(cfg.trajectories) if cfg.trajectories else run_dir.trajectories
    counts = trajectories.counts(store)
    proxy = None
    if not cfg.trajectories:
        facts = audit.proxy_facts(meta, run_dir.proxy.root)
        n_tokens = counts["n_tokens"].reindex(ids).to_numpy() if "n_tokens" in counts else None
        unigram = None
        if examples is not None and facts["tokenizer_json"] is not None:
            unigram = audit.unigram_loss((ex.response for ex in examples), facts["tokenizer_json"])
        proxy = audit.proxy_language(
            audit.per_token_loss(losses, n_tokens), meta["steps"], facts["vocab_size"], facts["initial_loss"], unigram
        )
    return audit.audit_split(df, examples, counts, proxy)
