"""The split stage: features, k-means easy/hard, per-source stratification, errors, outputs.

References are built by hand: groups whose hard members are known by construction, a hand-worked
feature table, and a brute-force optimal 1-D 2-means.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from datalever.checks import ConfigError
from datalever.examples import Example, save_examples
from datalever.split import (
    FEATURE_KINDS,
    FEATURES,
    Feature,
    SplitConfig,
    SplitError,
    compute_features,
    run,
    split_trajectories,
)
from stores import write_store

pytestmark = pytest.mark.usefixtures("fast_provenance")


def two_groups(n_easy, n_hard, low=1.0, high=3.0, K=4, seed=0, noise=0.05):
    """Easy rows fall from `low`, hard rows stay near `high`; returns losses, is_hard."""
    rng = np.random.default_rng(seed)
    t = np.arange(K)
    easy = low * (1.0 - 0.1 * t) + rng.normal(0, noise, (n_easy, K))
    hard = high * (1.0 - 0.02 * t) + rng.normal(0, noise, (n_hard, K))
    return np.vstack([easy, hard]), np.array([False] * n_easy + [True] * n_hard)


def hard_ids(df):
    return set(df.loc[df["hard"], "id"])


# ------------------------------------------------------------------------------ features


def test_features_hand_worked():
    L = np.array([[4.0, 2.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 6.0, 3.0]])
    np.testing.assert_array_equal(compute_features(L, "trajectory"), L)
    np.testing.assert_array_equal(compute_features(L, "final"), [[0.5], [2.0], [3.0]])
    np.testing.assert_allclose(compute_features(L, "relative"), [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [3.0, 2.0, 0.5]])
    df = split_trajectories(["a", "b", "c"], [None] * 3, L, features="relative", k=2, steps=[1, 2, 3, 4])
    assert [c for c in df.columns if c.startswith("feat_")] == [
        "feat_ratio_step000002_000001",
        "feat_ratio_step000003_000002",
        "feat_ratio_step000004_000003",
    ]
    np.testing.assert_allclose(
        df.loc[df["id"] == "c", ["feat_ratio_step000002_000001", "feat_ratio_step000004_000003"]].to_numpy(),
        [[3.0, 0.5]],
    )
    np.testing.assert_allclose(df["mean_loss"], [1.875, 2.0, 3.25])
    np.testing.assert_allclose(df["loss_drop"], [3.5, 0.0, -2.0])


@pytest.mark.parametrize("features", ["trajectory", "final", "relative"])
def test_hard_is_higher_loss_cluster(features):
    L, is_hard = two_groups(12, 8)
    if features == "relative":  # the shapes must differ too: hard curves flat, easy curves falling
        L[~is_hard] = np.array([1.0, 0.6, 0.36, 0.216]) * (1 + 0.01 * np.arange((~is_hard).sum()))[:, None]
    ids = [f"e{i}" for i in range(len(L))]
    perm = np.random.default_rng(1).permutation(len(L))  # hard rows not all at the end
    ids, L, is_hard = [ids[i] for i in perm], L[perm], is_hard[perm]
    df = split_trajectories(ids, [None] * len(ids), L, features=features, k=2, seed=0)
    assert hard_ids(df) == {i for i, h in zip(ids, is_hard) if h}
    assert set(df.loc[df["hard"], "cluster"]) == {1} and set(df.loc[~df["hard"], "cluster"]) == {0}
    assert list(df["id"]) == ids  # output in input order
    assert (df["assigned"] == "kmeans").all()


def test_k3_hardest_is_highest():
    rng = np.random.default_rng(0)
    L = np.vstack([lvl + rng.normal(0, 0.05, (6, 4)) for lvl in (5.0, 1.0, 3.0)])
    ids = [f"x{i}" for i in range(18)]
    df = split_trajectories(ids, [None] * 18, L, k=3)
    assert hard_ids(df) == set(ids[:6])
    assert set(df.loc[[6, 7, 8, 9, 10, 11], "cluster"]) == {0}
    assert set(df.loc[[12, 13, 14, 15, 16, 17], "cluster"]) == {1}


def test_final_feature_matches_brute_force_two_means():
    rng = np.random.default_rng(3)
    final = np.concatenate([rng.normal(1, 0.3, 15), rng.normal(2.5, 0.3, 10)])
    L = np.column_stack([final + 1.0, final + 0.5, final])
    ids = [f"r{i}" for i in range(len(final))]
    # brute force: the optimal 1-D 2-means is a threshold on the sorted values
    order = np.argsort(final)
    best = min(
        range(1, len(final)), key=lambda c: final[order[:c]].var() * c + final[order[c:]].var() * (len(final) - c)
    )
    expected_hard = {ids[i] for i in order[best:]}
    df = split_trajectories(ids, [None] * len(ids), L, features="final", k=2)
    assert hard_ids(df) == expected_hard


@pytest.mark.parametrize("name", FEATURES)
def test_every_registered_feature_has_every_entry(name):
    """A feature is one entry of the registry: its computation, hardness values, column names, whether it needs the
    examples' composition and its minimum K, all consistent with each other."""
    kind = FEATURE_KINDS[name]
    assert isinstance(kind, Feature) and kind.name == name
    assert isinstance(kind.covariates, bool) and isinstance(kind.min_checkpoints, int) and kind.min_checkpoints >= 1
    L, _ = two_groups(5, 5, K=4)
    covariates = np.random.default_rng(0).dirichlet([1, 1, 1], len(L)) if kind.covariates else None
    for K in range(kind.min_checkpoints, 5):
        steps = [10 * (t + 1) for t in range(K)]
        feats = compute_features(L[:, :K], name, covariates)
        columns = kind.columns(steps)
        assert feats.shape == (len(L), len(columns)) and len(columns) >= 1
        assert len(set(columns)) == len(columns) and all(c.startswith("feat_") for c in columns)
        assert kind.hardness(L[:, :K], feats).shape[0] == len(L)
        df = split_trajectories(
            [f"e{i}" for i in range(len(L))],
            [None] * len(L),
            L[:, :K],
            features=name,
            steps=steps,
            covariates=covariates,
        )
        assert [c for c in df.columns if c.startswith("feat_")] == columns
    if kind.min_checkpoints > 1:
        with pytest.raises(SplitError, match=f"needs at least {kind.min_checkpoints} checkpoints"):
            compute_features(L[:, : kind.min_checkpoints - 1], name, covariates)
    if kind.covariates:
        with pytest.raises(SplitError, match="needs the examples' composition"):
            compute_features(L, name, None)


def test_the_registry_is_what_split_config_and_the_cli_accept(capsys):
    from datalever import cli

    for name in FEATURES:
        assert SplitConfig(features=name).features == name
    with pytest.raises(ConfigError, match=f"features must be one of {', '.join(FEATURES)}; got 'shape'"):
        SplitConfig(features="shape")
    with pytest.raises(SystemExit):
        cli.main(["split", "--help"])
    text = capsys.readouterr().out
    help_ = " ".join(text[text.index("\n  --features") + 1 :].split("\n  --")[0].split())
    assert all(f"'{name}'" in help_ for name in FEATURES), help_


# ------------------------------------------------------------------------------ stratification


def interleaved_sources():
    """Source A at even rows, B at odd rows; B's *easy* rows have higher loss than A's *hard* rows,
    so clustering globally would call all of B hard. Hard members known by construction."""
    rng = np.random.default_rng(7)
    ids, sources, rows, expected = [], [], [], set()
    for j in range(40):
        src = "A" if j % 2 == 0 else "B"
        k = j // 2
        hard = k % 3 == 0  # 7 hard out of 20 per source
        level = {("A", False): 1.0, ("A", True): 2.0, ("B", False): 5.0, ("B", True): 8.0}[(src, hard)]
        ids.append(f"{src}{k:02d}")
        sources.append(src)
        rows.append(level + rng.normal(0, 0.05, 4))
        if hard:
            expected.add(ids[-1])
    return ids, sources, np.array(rows), expected


def test_stratified_labels_right_global_examples():
    ids, sources, L, expected = interleaved_sources()
    df = split_trajectories(ids, sources, L, stratify=True, min_source_size=5)
    assert hard_ids(df) == expected
    assert list(df["id"]) == ids and list(df["source"]) == sources
    # without stratification all of B is "hard": the stratification changes the answer
    flat = split_trajectories(ids, sources, L, stratify=False)
    assert hard_ids(flat) == {i for i, s in zip(ids, sources) if s == "B"}

    # shuffled row order: the same label for every id
    perm = np.random.default_rng(0).permutation(len(ids))
    df2 = split_trajectories(
        [ids[i] for i in perm], [sources[i] for i in perm], L[perm], stratify=True, min_source_size=5
    )
    a = df.set_index("id")[["cluster", "hard"]]
    b = df2.set_index("id")[["cluster", "hard"]].loc[a.index]
    assert (a.to_numpy() == b.to_numpy()).all()


def test_small_source_is_hard_whole_and_null_source_is_a_stratum():
    ids, sources, L, expected = interleaved_sources()
    ids += ["C0", "C1", "C2", "N0", "N1", "N2", "N3", "N4", "N5"]
    sources += ["C", "C", "C", None, None, None, None, None, None]
    L = np.vstack(
        [
            L,
            np.full((3, 4), 0.1) + np.arange(3)[:, None] * 0.01,  # C: low loss, yet hard whole
            np.array([[1, 1, 1, 1]] * 3 + [[9, 9, 9, 9]] * 3, float) + np.arange(6)[:, None] * 0.01,
        ]
    )
    df = split_trajectories(ids, sources, L, stratify=True, min_source_size=4)
    assert hard_ids(df) == expected | {"C0", "C1", "C2", "N3", "N4", "N5"}
    c = df[df["source"] == "C"]
    assert (c["assigned"] == "small_source").all() and (c["cluster"] == -1).all()


def sized_sources(sizes: dict[str, int]):
    """Each source's rows split half and half between a low-loss and a high-loss group (hard known by
    construction); a source of one row is a single high row."""
    ids, sources, rows, hard = [], [], [], set()
    for name, n in sizes.items():
        for i in range(n):
            high = i >= n // 2
            ids.append(f"{name}{i}")
            sources.append(name)
            rows.append((9.0 if high else 1.0) + 0.01 * i + np.arange(4) * -0.001)
            if high:
                hard.add(f"{name}{i}")
    return ids, sources, np.array(rows), hard


@pytest.mark.parametrize(
    "rule, handling, small, upsampled",
    [
        # sizes A 1, B 40, C 20: 61 rows / 3 sources = a mean of 20.3; min_source_size 10
        ("count", "upsample", {"A"}, {"A"}),  # only A is under 10
        ("mean", "upsample", {"A", "C"}, {"A", "C"}),  # the prototype's rule: C (20 rows) is under the mean too
        ("mean", "keep", {"A", "C"}, set()),  # small sources used once: neither hard nor easy
        ("mean", "cluster", {"A"}, set()),  # C is clustered like B; A (1 row < k) cannot be: kept
    ],
)
def test_small_sources_by_rule_and_handling(rule, handling, small, upsampled):
    ids, sources, L, hard = sized_sources({"A": 1, "B": 40, "C": 20})
    df = split_trajectories(
        ids, sources, L, stratify=True, min_source_size=10, small_sources=handling, small_source_rule=rule
    )
    by_source = {s: df[df["source"] == s] for s in ("A", "B", "C")}
    for name, rows in by_source.items():
        if name in small:
            assert (rows["cluster"] == -1).all(), name
            assert rows["hard"].all() == (name in upsampled) and rows["hard"].any() == (name in upsampled), name
            assert set(rows["assigned"]) == {"small_source" if name in upsampled else "small_source_kept"}, name
        else:  # clustered: its high half is hard
            assert set(rows.loc[rows["hard"], "id"]) == {i for i in rows["id"] if i in hard}, name
            assert set(rows["assigned"]) == {"kmeans"}, name


def test_the_summary_says_how_many_examples_each_rule_upsampled(tmp_path):
    ids, sources, L, _ = sized_sources({"A": 1, "B": 40, "C": 20})
    write_store(tmp_path, ids, sources, L)
    cfg = SplitConfig(run_dir=str(tmp_path), stratify=True, min_source_size=10, small_source_rule="mean")
    s = run(cfg)
    assert s["small_sources"] == ["A", "C"]
    assert s["small_source_rule"] == {
        "rule": "mean",
        "min_source_size": 10,
        "handling": "upsample",
        "n_sources": 2,
        "n_examples": 21,
        "n_upsampled": 21,
    }
    kept = run(SplitConfig(**{**cfg.__dict__, "small_sources": "keep", "overwrite": True}))
    assert kept["small_source_rule"]["n_upsampled"] == 0 and kept["n_hard"] == 20  # B's high half only


def test_relative_features_ranked_by_their_own_mean_as_the_prototype_does():
    """X: high loss falling fast (ratios 0.5); Y: low loss falling slowly (ratios 0.9). By raw loss X is hard; by the
    mean ratio (hard_by features) Y is: the cluster whose loss fell least."""
    x = np.array([[10.0, 5.0, 2.5]] * 5) + np.arange(5)[:, None] * 0.01
    y = np.array([[1.0, 0.9, 0.81]] * 5) + np.arange(5)[:, None] * 0.001
    ids = [f"x{i}" for i in range(5)] + [f"y{i}" for i in range(5)]
    losses = np.vstack([x, y])
    by_loss = split_trajectories(ids, [None] * 10, losses, features="relative")
    by_ratio = split_trajectories(ids, [None] * 10, losses, features="relative", hard_by="features")
    assert hard_ids(by_loss) == {f"x{i}" for i in range(5)}
    assert hard_ids(by_ratio) == {f"y{i}" for i in range(5)}
    same = split_trajectories(ids, [None] * 10, losses, features="trajectory", hard_by="features")
    assert hard_ids(same) == hard_ids(by_loss)  # on raw trajectories the two rules are one


def test_stratified_split_in_summary(tmp_path):
    ids, sources, L, expected = interleaved_sources()
    ids += ["C0", "C1"]
    sources += ["C", "C"]
    L = np.vstack([L, [[1, 1, 1, 1], [2, 2, 2, 2]]])
    write_store(tmp_path, ids, sources, L)
    s = run(SplitConfig(run_dir=str(tmp_path), stratify=True, min_source_size=5))
    assert s["small_sources"] == ["C"]
    assert s["per_source"]["A"] == {
        "n": 20,
        "n_flagged": 0,
        "small_source": False,
        "n_hard": 7,
        "sizes": {"0": 13, "1": 7},
    }
    assert s["per_source"]["C"]["n_hard"] == 2 and s["n_hard"] == 16
    assert s["clusters"]["small_source"]["size"] == 2


# ------------------------------------------------------------------------------ flags and errors


def test_flagged_rows_excluded_and_counted():
    L, is_hard = two_groups(6, 4)
    ids = [f"e{i}" for i in range(10)] + ["t0", "t1"]
    L = np.vstack([L, np.full((2, 4), np.nan)])
    flags = [""] * 10 + ["truncated", "truncated"]
    df = split_trajectories(ids, [None] * 12, L, flags=flags)
    assert hard_ids(df) == {f"e{i}" for i in range(6, 10)}
    t = df[df["id"].isin(["t0", "t1"])]
    assert (t["cluster"] == -1).all() and not t["hard"].any() and (t["assigned"] == "flagged").all()
    feats = [c for c in df.columns if c.startswith("feat_")]
    assert t[feats].isna().all().all() and t["mean_loss"].isna().all()  # NaN never becomes 0


@pytest.mark.parametrize(
    "case, match",
    [
        ("identical", "identical"),
        ("too_few", "cannot form k=2"),
        ("all_nan", "all trajectories are NaN"),
        ("unflagged_nan", "NaN"),
        ("all_flagged", "flagged"),
        ("zero_relative", "not finite"),
        ("k1", "k must be"),
        ("bad_feature", "unknown features"),
    ],
)
def test_split_errors(case, match):
    ids = [f"e{i}" for i in range(6)]
    L = np.arange(24, dtype=float).reshape(6, 4) + 1
    kw = {}
    if case == "identical":
        L = np.ones((6, 4))
    elif case == "too_few":
        ids, L = ids[:1], L[:1]
    elif case == "all_nan":
        L = np.full((6, 4), np.nan)
    elif case == "unflagged_nan":
        L[2, 1] = np.nan
    elif case == "all_flagged":
        kw["flags"] = ["truncated"] * 6
    elif case == "zero_relative":
        L[0, 0] = 0.0
        kw["features"] = "relative"
    elif case == "k1":
        kw["k"] = 1
    elif case == "bad_feature":
        kw["features"] = "entropy"
    with pytest.raises(SplitError, match=match):
        split_trajectories(ids, [None] * len(ids), L, **kw)
    assert issubclass(SplitError, ValueError)


def test_stratified_identical_source_is_an_error():
    ids, sources, L, _ = interleaved_sources()
    L[1::2] = 3.0  # every B row the same
    with pytest.raises(SplitError, match="source 'B'"):
        split_trajectories(ids, sources, L, stratify=True, min_source_size=5)


# ------------------------------------------------------------------------------ the store and the stage


def test_run_writes_outputs_and_difficulty(tmp_path):
    L, is_hard = two_groups(6, 4)
    ids = [f"e{i}" for i in range(10)] + ["t0"]
    L = np.vstack([L, np.full((1, 4), np.nan)])
    write_store(tmp_path, ids, ["gsm"] * 11, L, flags=[""] * 10 + ["truncated"])
    levels = ["easy"] * 5 + ["hard"] * 5 + ["hard"]
    steps = [1, 2, 1, 2, 1, 4, 5, 6, 3, 4, 9]
    save_examples(
        str(tmp_path / "data" / "train.jsonl"),
        [
            Example(id=i, prompt=f"q{i}\n", response=f"a{i}", source="gsm", meta={"level": lv, "steps": st})
            for i, lv, st in zip(ids, levels, steps)
        ],
    )
    s = run(SplitConfig(run_dir=str(tmp_path)))

    df = pq.read_table(tmp_path / "split.parquet").to_pandas()
    assert list(df["id"]) == ids
    assert set(df.loc[df["hard"], "id"]) == {"e6", "e7", "e8", "e9"}
    assert {"id", "source", "cluster", "hard", "feat_loss_step000040"} <= set(df.columns)
    assert s["n_flagged_excluded"] == 1 and s["flag_counts"] == {"truncated": 1}
    assert s["n_hard"] == 4 and s["n_easy"] == 6 and s["n_clustered"] == 10
    assert s["clusters"]["1"]["size"] == 4 and s["clusters"]["1"]["hard"]
    np.testing.assert_allclose(s["clusters"]["1"]["mean_trajectory"], L[6:10].mean(axis=0))
    np.testing.assert_allclose(s["clusters"]["0"]["mean_trajectory"], L[:6].mean(axis=0))
    d = s["difficulty"]
    assert d["level"]["kind"] == "categorical"
    assert d["level"]["per_cluster"]["0"] == {"easy": 5, "hard": 1}
    assert d["level"]["per_cluster"]["1"] == {"hard": 4}
    assert d["level"]["per_cluster"]["flagged"] == {"hard": 1}
    assert d["steps"]["kind"] == "numeric"
    assert math.isclose(d["steps"]["per_cluster"]["0"]["mean"], (1 + 2 + 1 + 2 + 1 + 4) / 6)
    assert math.isclose(d["steps"]["per_cluster"]["1"]["mean"], (5 + 6 + 3 + 4) / 4)
    assert json.loads((tmp_path / "split_summary.json").read_text()) == s
    for png in ("split_trajectories.png", "split_datamap.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "split.config.yaml").exists()
    # Rerun: the same work is redone in place; other settings are refused unless overwrite.
    assert run(SplitConfig(run_dir=str(tmp_path))) == s
    with pytest.raises(ConfigError, match=r"other settings \(features: 'trajectory' -> 'final'\)"):
        run(SplitConfig(run_dir=str(tmp_path), features="final"))
    assert run(SplitConfig(run_dir=str(tmp_path), features="final", overwrite=True))["features"] == "final"


def test_run_refuses_an_unfinished_profile(tmp_path):
    L, _ = two_groups(6, 4)
    ids = [f"e{i}" for i in range(len(L))]
    write_store(tmp_path, ids, [None] * len(ids), L)
    meta = json.loads((tmp_path / "trajectories.meta.json").read_text())
    (tmp_path / "trajectories.meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(SplitError, match="not finished"):
        run(SplitConfig(run_dir=str(tmp_path)))


def test_plot_legends_mark_the_hard_cluster():
    import pandas as pd

    from datalever.split_summary import _group_label

    df = pd.DataFrame({"hard": [False, False, True, True, True]})
    assert _group_label(df, "0", df["hard"] == False) == "cluster 0, n=2"  # noqa: E712
    assert _group_label(df, "1", df["hard"]) == "cluster 1 (hard), n=3"
    assert _group_label(df, "gsm8k", df["hard"]) == "gsm8k (hard), n=3"


@pytest.mark.parametrize(
    "options, match",
    [
        ({"features": "shape"}, "features must be one of"),
        ({"k": 1}, "k must be an integer >= 2"),
        ({"min_source_size": 0}, "min_source_size must be > 0"),
        ({"small_sources": "drop"}, "small_sources must be one of upsample, cluster, keep"),
        ({"small_source_rule": "median"}, "small_source_rule must be one of count, mean"),
        ({"hard_by": "ratio"}, "hard_by must be one of loss, features"),
    ],
)
def test_bad_split_options_are_refused_when_the_config_is_built(options, match):
    from datalever.checks import ConfigError

    with pytest.raises(ConfigError, match=match):
        SplitConfig(**options)
