"""Splits compared (split_compare.py): agreement by the adjusted Rand index and the hard sets' overlap, and how far
apart the clusters' losses are, checked against pair counting and hand-worked cases on split tables written by hand."""

from __future__ import annotations

import itertools
import json
from math import comb

import numpy as np
import pandas as pd
import pytest

from datalever import cli, split_compare
from stores import write_store


def split_table(clusters, hard, flags=None, assigned=None) -> pd.DataFrame:
    n = len(clusters)
    return pd.DataFrame(
        {
            "id": [f"e{i}" for i in range(n)],
            "source": ["s"] * n,
            "flag": flags or [""] * n,
            "cluster": clusters,
            "hard": hard,
            "assigned": assigned or ["kmeans"] * n,
        }
    ).set_index("id")


def pair_counting_ari(x, y) -> float:
    """Hubert and Arabie's adjusted Rand index by counting pairs (the definition, not sklearn's contingency table)."""
    n_pairs = comb(len(x), 2)
    together_x = sum(x[i] == x[j] for i, j in itertools.combinations(range(len(x)), 2))
    together_y = sum(y[i] == y[j] for i, j in itertools.combinations(range(len(y)), 2))
    both = sum(x[i] == x[j] and y[i] == y[j] for i, j in itertools.combinations(range(len(x)), 2))
    expected = together_x * together_y / n_pairs
    return (both - expected) / ((together_x + together_y) / 2 - expected)


def test_crossed_clusterings_agree_less_than_chance():
    """Hand-worked: {ab}{cd} against {ac}{bd}: no pair together in both, 2 together in each, of 6 pairs:
    expected 2*2/6, maximum 2, ARI = (0 - 2/3) / (2 - 2/3) = -0.5."""
    a = split_table([0, 0, 1, 1], [False, False, True, True])
    b = split_table([0, 1, 0, 1], [False, True, False, True])
    found = split_compare.agreement(a, b)
    assert found["ari"] == pytest.approx(-0.5)
    assert found["hard_jaccard"] == pytest.approx(1 / 3)  # {e2, e3} against {e1, e3}: 1 shared of 3
    assert found["hard_overlap"] == pytest.approx(1 / 2)


def test_agreement_matches_pair_counting_and_ignores_the_clusters_numbers():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    a, b = split_table(list(x), list(x == 2)), split_table(list(y), list(y == 2))
    assert split_compare.agreement(a, b)["ari"] == pytest.approx(pair_counting_ari(list(x), list(y)))
    renamed = split_table(list((x + 1) % 3), list(x == 2))  # the same groups under other numbers
    assert split_compare.agreement(a, renamed) == {"ari": pytest.approx(1.0), "hard_jaccard": 1.0, "hard_overlap": 1.0}


def test_hard_sets_overlap_by_hand():
    hard_a = [False, True, True, True, False, False]  # e1 e2 e3
    hard_b = [False, False, True, True, True, True]  # e2 e3 e4 e5
    a, b = split_table([0, 1, 1, 1, 0, 0], hard_a), split_table([0, 0, 1, 1, 1, 1], hard_b)
    found = split_compare.agreement(a, b)
    assert found["hard_jaccard"] == pytest.approx(2 / 5) and found["hard_overlap"] == pytest.approx(2 / 3)


def test_flagged_examples_are_a_group_of_their_own_and_never_hard():
    split = split_table([1, 1, 0, -1], [True, True, False, True], flags=["", "", "", "too_long"])
    assert split_compare.hard_set(split) == {"e0", "e1"}
    assert list(split_compare.cluster_labels(split)) == ["kmeans:1", "kmeans:1", "kmeans:0", "flagged"]


def test_splits_of_different_examples_are_refused():
    a, b = split_table([0, 1], [False, True]), split_table([0, 1, 1], [False, True, True])
    with pytest.raises(ValueError, match="different training sets"):
        split_compare.agreement(a, b)


def make_run(path, losses, hard, flags=None, batch_size=2):
    """A run directory with a hand-written store (steps 10..40) and split (cluster = hard)."""
    path.mkdir(parents=True)
    n = len(losses)
    ids = [f"e{i}" for i in range(n)]
    write_store(path, ids, ["s"] * n, np.asarray(losses, dtype=float), flags=flags)
    meta = json.loads((path / "trajectories.meta.json").read_text())
    meta["config"] = {"batch_size": batch_size, "fraction": 1.0, "proxy": "preset:tiny"}
    (path / "trajectories.meta.json").write_text(json.dumps(meta))
    split_table([int(h) for h in hard], hard, flags=flags).reset_index().to_parquet(path / "split.parquet")
    return path


def test_the_gap_is_the_hard_minus_the_easy_mean_loss_at_each_step(tmp_path):
    losses = [
        [3.0, 2.0, 1.0, 0.5],  # easy
        [3.0, 2.0, 1.0, 1.5],  # easy
        [3.0, 2.5, 2.0, 2.0],  # hard
        [9.0, 9.0, 9.0, 9.0],  # flagged: left out, whatever its loss
    ]
    run = make_run(tmp_path / "r", losses, [False, False, True, False], flags=["", "", "", "too_long"])
    found = split_compare.describe(run, split_compare.read_split(run))["divergence"]
    assert found["steps"] == [10, 20, 30, 40]
    assert found["epochs"] == [5.0, 10.0, 15.0, 20.0]  # step * batch 2 / 4 examples
    assert found["gap"] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    means = [3.0, 13 / 6, 4 / 3, 4 / 3]
    assert found["relative_gap"] == pytest.approx([g / m for g, m in zip([0.0, 0.5, 1.0, 1.0], means)])
    assert found["spread"] == pytest.approx([0.0, 0.5, 1.0, 1.0])  # two clusters: the spread is the gap


def test_compare_splits_from_the_command_line(tmp_path, capsys):
    losses = [[3.0, 2.0, 1.0, 0.5], [3.0, 2.0, 1.0, 1.5], [3.0, 2.5, 2.0, 2.0], [3.0, 2.9, 2.8, 2.7]]
    one = make_run(tmp_path / "one", losses, [False, False, True, True])
    two = make_run(tmp_path / "two", losses, [False, True, True, False])
    out = tmp_path / "cmp"
    cli.main(["compare-splits", "--runs", json.dumps([str(one), str(two)]), "--out", str(out)])
    assert f"written: {out / 'split_comparison.md'}" in capsys.readouterr().out
    result = json.loads((out / "split_comparison.json").read_text())
    assert result["names"] == ["one", "two"]
    assert result["hard_jaccard"] == [[1.0, pytest.approx(1 / 3)], [pytest.approx(1 / 3), 1.0]]
    assert result["ari"][0][0] == result["ari"][1][1] == pytest.approx(1.0)
    assert result["ari"][0][1] == pytest.approx(pair_counting_ari([0, 0, 1, 1], [0, 1, 1, 0]))
    text = (out / "split_comparison.md").read_text()
    assert "| two | tiny |" not in text and "| two | preset:tiny | 20 | 2/4 |" in text
    assert (out / "split_comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--runs", '["a"]'], "two run directories or more"),
        (["--runs", '["x/a", "y/a"]'], "names repeat"),
        (["--runs", '["a", "b"]', "--names", '["one"]'], "one per run"),
    ],
)
def test_a_bad_comparison_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare-splits", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_proxy_is_named_by_what_it_is():
    assert split_compare.proxy_name("/r/sweep/proxy=arm-base/arms/base/seed0/train/model") == "arm:base/seed0"
    assert split_compare.proxy_name("runs/proxies/demo-large-1500") == "demo-large-1500"
    assert split_compare.proxy_name("embedded:demo-base") == "embedded:demo-base"
