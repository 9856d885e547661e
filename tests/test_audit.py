"""The split audit: AUROC against brute force, its interval, the composition and proxy-language warnings, the
composition-free split feature, and the audit written by `datalever split` and shown in the report.

References are independent of the code under test: AUROC as the share of (positive, negative) pairs in the right
order (ties 1/2), the interval's width against a bootstrap's, planted splits whose cause is known by construction.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from datalever import audit, rundir
from datalever.examples import Example
from datalever.split import compute_features, split_trajectories

pytestmark = pytest.mark.usefixtures("fast_provenance")


def brute_force_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


# ------------------------------------------------------------------------------ AUROC and its interval


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([1, 2, 3, 4], [0, 0, 1, 1], 1.0),
        ([1, 2, 3, 4], [1, 1, 0, 0], 0.0),
        ([1, 1, 1, 1], [0, 1, 0, 1], 0.5),
        ([1, 2, 2, 3], [0, 0, 1, 1], 0.875),  # one tied pair of four counts 1/2
        ([0.3, 0.1, 0.4, 0.2, 0.4], [1, 0, 0, 1, 1], 3.5 / 6),  # 3 of 6 pairs right, one tied
    ],
)
def test_auroc_hand_made_cases(scores, labels, expected):
    got = audit.auroc_with_ci(scores, np.array(labels, bool))
    assert got["auroc"] == pytest.approx(expected) == pytest.approx(brute_force_auroc(scores, labels))
    assert (got["n_pos"], got["n_neg"]) == (sum(labels), len(labels) - sum(labels))


def test_auroc_matches_brute_force_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 30))
        labels = rng.random(n) < 0.4
        labels[:2] = [True, False]
        scores = rng.integers(0, 5, n)  # many ties
        got = audit.auroc_with_ci(scores, labels)
        assert got["auroc"] == pytest.approx(brute_force_auroc(scores, labels))
        lo, hi = got["ci95"]
        assert 0 <= lo <= got["auroc"] <= hi <= 1


def test_interval_shrinks_with_n_and_matches_a_bootstrap():
    rng = np.random.default_rng(1)

    def sample(n):
        labels = rng.random(n) < 0.3
        return rng.normal(0.8 * labels, 1.0), labels

    widths = []
    for n in (60, 600, 6000):
        scores, labels = sample(n)
        got = audit.auroc_with_ci(scores, labels)
        lo, hi = got["ci95"]
        assert lo < got["auroc"] < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # about 1/sqrt(n): 3.2x per tenfold

    # DeLong's standard error against a bootstrap's (a method that shares nothing with it but the data).
    scores, labels = sample(300)
    se_delong = (np.diff(audit.auroc_with_ci(scores, labels)["ci95"])[0]) / (2 * 1.959964)
    boot = []
    for _ in range(1000):
        i = rng.integers(0, len(scores), len(scores))
        if labels[i].any() and not labels[i].all():
            boot.append(brute_force_auroc_fast(scores[i], labels[i]))
    assert se_delong == pytest.approx(np.std(boot), rel=0.15)


def brute_force_auroc_fast(scores, labels):
    """The pair count, vectorized (the bootstrap needs a thousand)."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return ((pos > neg) + 0.5 * (pos == neg)).mean()


def test_auroc_refuses_one_class_and_gives_no_interval_for_one_member():
    with pytest.raises(ValueError, match="positives and negatives"):
        audit.auroc_with_ci([1, 2], [True, True])
    assert audit.auroc_with_ci([1, 2, 3], [True, False, False])["ci95"] == [0.0, 1.0]


# ------------------------------------------------------------------------------ features of the examples


def test_composition_and_difficulty_features():
    ex = [
        Example("a", "Question: x?\n", "He has 3 + 4 = <<3+4=7>>7.\nThen 7 * 2 = <<7*2=14>>14.\n#### 14", meta={}),
        Example("b", "Q\n", "Because one and one make two.\n#### 2", meta={"level": "hard", "steps": 3}),
        Example("c", "Q\n", "12", meta={"level": "easy", "difficulty": "Level 4"}),
    ]
    comp = audit.composition_frame(ex)
    assert comp.loc["a", "prompt_chars"] == 13 and comp.loc["c", "response_chars"] == 2
    assert comp.loc["c", "digit_fraction"] == 1.0
    assert comp.loc["b", "digit_fraction"] == pytest.approx(1 / 29)  # 29 non-space characters, one digit
    diff = audit.difficulty_frame(ex)
    assert diff["calculator_steps"].tolist() == [2, 0, 0]
    assert diff.loc["b", "level"] == 2 and diff.loc["c", "level"] == 0 and math.isnan(diff.loc["a", "level"])
    assert diff.loc["c", "difficulty"] == 4 and diff.loc["b", "steps"] == 3
    assert audit.ordinal(["geometry", "algebra"]) is None


def planted(n=200, seed=0):
    """Examples whose response length and level are drawn independently."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 200, n)
    levels = rng.choice(["easy", "medium", "hard"], n)
    examples = [
        Example(f"e{i}", "Question: how many?\n", ("word " * 40)[: int(L)] + "#### 7", meta={"level": str(lv)})
        for i, (L, lv) in enumerate(zip(lengths, levels))
    ]
    return examples, lengths, levels


def split_frame(ids, hard):
    return pd.DataFrame({"id": ids, "flag": "", "assigned": "kmeans", "hard": hard, "cluster": np.asarray(hard, int)})


def test_hard_by_length_warns_and_hard_by_level_does_not():
    examples, lengths, levels = planted()
    ids = [ex.id for ex in examples]

    by_length = audit.audit_split(split_frame(ids, lengths > np.median(lengths)), examples)
    assert by_length["features"]["response_chars"]["auroc"] == 1.0
    assert abs(by_length["features"]["level"]["auroc"] - 0.5) < 0.1
    assert by_length["constant"] == ["prompt_chars", "truncated"]  # one prompt for all, nothing cut
    composition, no_difficulty = by_length["warnings"]
    assert "tracks response_chars" in composition and "best: level" in composition
    assert no_difficulty.startswith("hard membership follows no difficulty column better than chance (best: level")

    by_level = audit.audit_split(split_frame(ids, levels == "hard"), examples)
    assert by_level["features"]["level"]["auroc"] > 0.9
    assert by_level["warnings"] == []


def test_a_split_that_follows_no_difficulty_column_says_so():
    """The residual split on real GSM8K text once followed the calculator steps less than chance (AUROC 0.46, higher
    in easy) without a word. Planted: hard = the easy problems; hard = a coin toss; hard = the hard level."""
    examples, _, levels = planted()
    ids = [ex.id for ex in examples]
    reversed_ = audit.audit_split(split_frame(ids, levels == "easy"), examples)
    (warning,) = [w for w in reversed_["warnings"] if "no difficulty column" in w]
    assert "best: level" in warning and "higher in easy" in warning
    coin = np.random.default_rng(5).random(len(ids)) < 0.5
    level = audit.audit_split(split_frame(ids, coin), examples)["features"]["level"]
    assert level["ci95"][0] <= 0.5  # the coin follows nothing: the warning's condition, checked by hand
    assert any("no difficulty column" in w for w in audit.audit_split(split_frame(ids, coin), examples)["warnings"])
    assert not audit.audit_split(split_frame(ids, levels == "hard"), examples)["warnings"]
    no_columns = [Example(ex.id, ex.prompt, ex.response) for ex in examples]
    assert not audit.audit_split(split_frame(ids, coin), no_columns)["warnings"]  # nothing to follow: no claim


def test_a_weak_composition_effect_without_difficulty_columns_does_not_warn():
    examples, lengths, _ = planted()
    examples = [Example(ex.id, ex.prompt, ex.response) for ex in examples]  # no difficulty column
    noise = np.random.default_rng(3).random(len(lengths))
    weak = audit.audit_split(split_frame([ex.id for ex in examples], noise < 0.5), examples)
    assert weak["warnings"] == []
    strong = audit.audit_split(split_frame([ex.id for ex in examples], lengths > 100), examples)
    assert "no difficulty column" in strong["warnings"][0]


def test_only_kmeans_rows_are_scored_and_truncation_comes_from_the_store():
    examples, lengths, levels = planted(n=40)
    ids = [ex.id for ex in examples]
    df = split_frame(ids, levels == "hard")
    df.loc[0, ["assigned", "flag", "hard"]] = ["flagged", "truncated", False]
    counts = pd.DataFrame({"n_tokens": lengths, "n_cut": [0] * 30 + [5] * 10}, index=ids)
    got = audit.audit_split(df, examples, counts)
    assert got["n"] == 39 and got["features"]["level"]["n"] == 39
    assert {"response_tokens", "truncated"} <= set(got["features"])


# ------------------------------------------------------------------------------ the proxy's language


def test_proxy_language_warning():
    ln_v = math.log(512)
    untrained = audit.proxy_language([6.3, 6.0], [5, 10], 512, initial_loss=6.25)
    assert untrained["uniform_loss"] == pytest.approx(ln_v)
    assert untrained["final_over_uniform"] == pytest.approx(6.0 / ln_v)
    assert "has not learned the data's language" in untrained["warning"]
    learned = audit.proxy_language([3.1, 2.0], [5, 10], 512)
    assert learned["warning"] is None and learned["final"] == {"step": 10, "loss": 2.0}
    assert audit.proxy_language([3.0], [1], None) is None
    # Far below ln V, but no better than token frequencies (a from-scratch proxy after a short run).
    frequencies = audit.proxy_language([5.3, 3.7], [4, 21], 512, unigram_loss=3.88)
    assert frequencies["final_over_unigram"] == pytest.approx(3.7 / 3.88)
    assert "knows only how frequent each token is" in frequencies["warning"]
    assert audit.proxy_language([3.2, 1.8], [4, 21], 512, unigram_loss=3.88)["warning"] is None
    # The warning reaches the audit's list.
    examples, _, levels = planted(n=40)
    got = audit.audit_split(split_frame([e.id for e in examples], levels == "hard"), examples, proxy=untrained)
    assert got["warnings"] == [untrained["warning"]]


def test_unigram_loss_is_the_entropy_of_the_token_counts(tmp_path):
    from importlib.resources import files

    tokenizer_json = files("datalever") / "assets" / "demo-base" / "tokenizer.json"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    assert len(tok.encode("7", add_special_tokens=False).ids) == len(tok.encode("x", add_special_tokens=False).ids) == 1
    assert audit.unigram_loss(["7", "7", "7", "x"], tokenizer_json) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )
    assert audit.unigram_loss(["7"], tmp_path / "tokenizer.json") is None


def test_proxy_facts_read_the_profile_run(tmp_path):
    rundir.write_json(tmp_path / "model" / "config.json", {"vocab_size": 300})
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.0}\n')
    facts = audit.proxy_facts({}, tmp_path)
    assert facts == {"vocab_size": 300, "initial_loss": 5.5, "tokenizer_json": None}
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    facts = audit.proxy_facts({"proxy": {"vocab_size": 512, "path": "/nowhere"}}, tmp_path)
    assert facts["vocab_size"] == 512 and facts["tokenizer_json"] == tmp_path / "model" / "tokenizer.json"
    assert audit.proxy_facts({"initial_per_token_loss": 6.0}, tmp_path)["initial_loss"] == 6.0  # all examples


def test_per_token_loss_weights_by_tokens_and_skips_unscored_rows():
    losses = np.array([[2.0, 1.0], [4.0, 3.0], [np.nan, np.nan]])
    assert audit.per_token_loss(losses, [1, 3, 5]) == pytest.approx([3.5, 2.5])
    assert audit.per_token_loss(losses) == pytest.approx([3.0, 2.0])


# ------------------------------------------------------------------------------ composition-free features


def test_residual_removes_the_loss_composition_sets():
    # loss = per-kind losses mixed by each response's digit/letter fractions (digits 1 nat, letters 4 nats), plus
    # 1 nat for the rows that are hard whatever they are made of. By loss alone the letter-heavy rows are "hard".
    rng = np.random.default_rng(0)
    n = 60
    n_digits = rng.integers(2, 19, n)
    hard = np.arange(n) % 3 == 0
    examples = [
        Example(f"e{i}", "Q\n", "7" * d + "x" * (20 - d), meta={"level": "hard" if h else "easy"})
        for i, (d, h) in enumerate(zip(n_digits, hard))
    ]
    ids = [ex.id for ex in examples]
    covariates = audit.composition_covariates(examples, ids)
    np.testing.assert_allclose(covariates[:, 0], n_digits / 20)
    digit = covariates[:, 0]
    level = 1.0 * digit + 4.0 * (1 - digit) + 1.0 * hard
    losses = level[:, None] * np.array([1.0, 0.8, 0.7])[None, :] + rng.normal(0, 0.02, (n, 3))
    want = {i for i, h in zip(ids, hard) if h}

    by_loss = split_trajectories(ids, [None] * n, losses, features="trajectory")
    assert set(by_loss.loc[by_loss["hard"], "id"]) != want
    (warning,) = audit.audit_split(by_loss, examples)["warnings"]
    assert "tracks digit_fraction" in warning and "higher in easy" in warning

    by_residual = split_trajectories(ids, [None] * n, losses, features="residual", covariates=covariates)
    assert set(by_residual.loc[by_residual["hard"], "id"]) == want
    found = audit.audit_split(by_residual, examples)
    assert found["features"]["level"]["auroc"] == 1.0 and found["warnings"] == []
    with pytest.raises(ValueError, match="needs the examples' composition"):
        split_trajectories(ids, [None] * n, losses, features="residual")
    assert np.isnan(audit.composition_covariates(examples, ["unknown"])).all()


def test_with_stratify_the_residual_baseline_is_fitted_within_each_source():
    """Two sources whose token kinds cost the opposite (source a: digits 1 nat, letters 4; source b: digits 4,
    letters 1), each with a third of its rows 1 nat harder whatever they are made of. One fit across both sources
    leaves each source's composition effect in its residuals, larger than the hard rows' nat; a fit per source, as
    stratify clusters per source, finds exactly the hard rows."""
    rng = np.random.default_rng(1)
    n = 120
    n_digits = rng.integers(2, 19, n)
    source = np.where(np.arange(n) < n // 2, "a", "b")
    hard = np.arange(n) % 3 == 0
    examples = [Example(f"e{i}", "Q\n", "7" * d + "x" * (20 - d), source=src) for i, (d, src) in
                enumerate(zip(n_digits, source))]  # fmt: skip
    ids = [ex.id for ex in examples]
    covariates = audit.composition_covariates(examples, ids)
    digit = n_digits / 20
    per_digit, per_letter = np.where(source == "a", 1.0, 4.0), np.where(source == "a", 4.0, 1.0)
    level = per_digit * digit + per_letter * (1 - digit) + 1.0 * hard
    losses = level[:, None] * np.array([1.0, 0.8, 0.7])[None, :] + rng.normal(0, 0.02, (n, 3))
    want = {i for i, h in zip(ids, hard) if h}

    stratified = split_trajectories(
        ids, list(source), losses, features="residual", covariates=covariates, stratify=True
    )
    assert set(stratified.loc[stratified["hard"], "id"]) == want
    # The fit across both sources, clustered within source a as stratify would: it does not find a's hard rows.
    across = compute_features(losses, "residual", covariates)
    in_a = source == "a"
    ids_a = list(np.array(ids)[in_a])
    a_only = split_trajectories(ids_a, ["a"] * len(ids_a), across[in_a], features="trajectory")
    assert set(a_only.loc[a_only["hard"], "id"]) != want & set(ids_a)


# ------------------------------------------------------------------------------ the stage and the report


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A small real profile: 64 embedded examples, the tiny preset (random init) as proxy, 3 recorded steps."""
    from datalever import synth
    from datalever.optim import OptimConfig
    from datalever.profile import ProfileConfig
    from datalever.profile import run as profile_run

    root = tmp_path_factory.mktemp("audit-run")
    synth.write_splits(str(root / "data"), n_train=64, n_val=4, n_test=4, seed=0)
    settings = dict(
        fraction=1.0, checkpoints=3, batch_size=8, micro_batch_size=8, max_length=128, optim=OptimConfig(lr=3e-3)
    )
    profile_run(ProfileConfig(run_dir=str(root), proxy="preset:tiny", progress=False, **settings))
    return root


@pytest.mark.parametrize("features", ["trajectory", "residual"])
def test_datalever_split_writes_the_audit(profiled, tmp_path, features, caplog):
    from datalever.cli import main

    out = tmp_path / features
    main(["split", "--run_dir", str(profiled), "--features", features, "--out", str(out)])
    found = json.loads((out / "split_audit.json").read_text())
    summary = json.loads((out / "split_summary.json").read_text())
    assert found["n"] == 64 and found["n_hard"] == summary["n_hard"]
    assert {"response_chars", "response_tokens", "prompt_chars", "digit_fraction", "level", "steps"} <= set(
        found["features"]
    )
    for f in found["features"].values():
        assert f["ci95"][0] <= f["auroc"] <= f["ci95"][1]
    # The tiny proxy is random and trained for 8 steps: it does not know the language, and says so.
    proxy = found["proxy"]
    assert proxy["vocab_size"] > 1 and proxy["final"]["step"] == 8 and proxy["initial_loss"] is not None
    assert 0 < proxy["unigram_loss"] < proxy["uniform_loss"]
    assert proxy["warning"] and proxy["warning"] in summary["audit_warnings"] == found["warnings"]
    assert "split: the proxy's mean per-token loss" in caplog.text  # logged: the command prints it on stderr


def test_the_report_shows_each_split_audit(tmp_path):
    from datalever.report import write_report
    from datalever.rundir import RunDir

    for arm in ("base", "hard"):
        d = RunDir(tmp_path).seed_dir(arm, 0)
        rundir.write_json(d.eval.metrics, {"accuracy": 0.5, "n": 10, "per_difficulty": {}})
        compute = {k: 1 for k in ("optimizer_steps", "forwards", "backwards", "tokens", "flops", "wall_s")}
        rundir.write_json(d.train.summary, {"compute": compute, "final_val_loss": 1.0})
        d.train.log.write_text('{"step": 1, "loss": 1.0}\n')
    examples, lengths, _ = planted()
    found = audit.audit_split(split_frame([e.id for e in examples], lengths > 100), examples)
    rundir.write_json(tmp_path / "split_audit.json", found)
    rundir.write_json(tmp_path / "splits" / "final" / "split_audit.json", found)
    results = write_report(tmp_path, ["base", "hard"], [0], controls=["base"])
    assert set(results["split_audits"]) == {"split", "splits/final"}
    text = (tmp_path / "results.md").read_text()
    assert "| response_chars | composition | 1.00 | 1.00-1.00 |" in text
    assert "Split audit (splits/final)" in text and text.count("WARNING: hard membership tracks response_chars") == 2
