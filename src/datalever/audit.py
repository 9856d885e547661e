"""Split audit: what does the "hard" cluster actually track?

A proxy's mean per-token loss is high for text the proxy cannot model, whatever the problem's difficulty: on a
GSM8K-format set profiled with a proxy that did not know the language, the hard examples had fewer digits (AUROC
0.12 for the digit fraction) and fewer calculator steps (0.44), not more. The audit measures, over the examples
k-means assigned, how well each property of an example separates hard from easy (AUROC, 0.5 = no information):

- composition: response length (characters; tokens where the store has them), prompt length, the digit fraction of
  the response, truncation (the response lost tokens to max_length);
- difficulty: every difficulty column the data carries (``examples.DIFFICULTY_KEYS``; ``level`` as its rank
  easy < medium < hard) and, for GSM8K answers, the number of ``<<...>>`` calculator steps.

It warns when a composition feature separates hard from easy (significantly) better than every difficulty column,
when no difficulty column is higher in the hard cluster better than chance (a split that finds no harder problems),
and checks that the proxy learned the language at all: its mean per-token loss on the data against ln(vocab size),
the loss of a model that predicts every token uniformly (an untrained one), and against the loss of a model that
knows only how frequent each token is (where the proxy's tokenizer can be read).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from datalever import rundir
from datalever.examples import DIFFICULTY_KEYS, LEVELS

CALCULATOR_STEP = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, one per arithmetic step
TRAILING_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*$")  # "Level 3" (MATH) -> 3
COMPOSITION = "composition"
DIFFICULTY = "difficulty"
# A composition feature this far from 0.5 (AUROC >= 0.7 or <= 0.3, the usual bar for "acceptable discrimination")
# is worth a warning even where the data has no difficulty column to compare it with.
STRONG = 0.2
# The final per-token loss above this fraction of ln(V) means the proxy did not learn the language: a model that
# knows only which tokens are frequent is already well below ln(V) (measured: on the embedded training data with the
# demo tokenizer, V = 512, the responses' unigram entropy is 3.88 nats = 0.62 ln V), so a proxy above 0.8 ln V has
# not learned even the token frequencies, and its loss ranks examples by which tokens they contain.
UNTRAINED_FRACTION = 0.8
# Nor has a proxy that barely beats token frequencies: one token of context already takes a model far below the
# unigram loss (measured on the embedded training data: the in-sample bigram loss is 0.43 of the unigram loss; the
# demo-base proxy ends its profile run at 0.45 of it, the same architecture trained from scratch for the same 21
# steps at 0.96). Above 0.9 of the unigram loss the proxy's loss mostly says which tokens an example contains.
UNIGRAM_FRACTION = 0.9
# Both are necessary, not sufficient (docs/results/proxy-language/): a proxy pretrained on equation drills alone ended
# at 0.66 of the unigram loss, no warning, with its hard cluster holding the easy problems (level AUROC 0.26), while
# proxies pretrained on plain sentences, at 0.63-0.65, made the best splits (0.79-0.83). `difficulty_warning` caught it.


# ----------------------------------------------------------------------------------------------
# AUROC with a confidence interval


def auroc_with_ci(scores: Sequence[float], labels: Sequence[bool], level: float = 0.95) -> dict[str, Any]:
    """AUROC of `scores` for `labels` (True = positive), with DeLong's confidence interval.

    The AUROC is the probability that a random positive scores above a random negative, ties counting 1/2 (the
    Mann-Whitney statistic). The interval is DeLong, DeLong & Clarke-Pearson's (1988) normal interval from the
    structural components, computed with midranks (Sun & Xu 2014): deterministic and O(n log n), what pROC uses by
    default. It is clipped to [0, 1], collapses to a point under perfect separation, and is [0, 1] (no information)
    with fewer than two positives or negatives.
    """
    from scipy.stats import norm, rankdata

    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores {x.shape} and labels {y.shape} must be 1-D and of one length")
    if not np.isfinite(x).all():
        raise ValueError("scores must be finite")
    pos, neg = x[y], x[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {m} and {n}")
    ranks = rankdata(np.concatenate([pos, neg]))  # midranks: ties share the mean rank, which counts them 1/2
    auc = (ranks[:m].sum() - m * (m + 1) / 2) / (m * n)
    out = {"auroc": float(auc), "ci95": [0.0, 1.0], "n": m + n, "n_pos": m, "n_neg": n}
    if m < 2 or n < 2:
        return out
    v10 = (ranks[:m] - rankdata(pos)) / n  # per positive: the share of negatives it beats
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m  # per negative: the share of positives that beat it
    se = math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    half = norm.ppf(0.5 + level / 2) * se
    out["ci95"] = [float(max(0.0, auc - half)), float(min(1.0, auc + half))]
    return out


def strength(auroc: float) -> float:
    """How much a feature tells about membership, whichever way: 0 (AUROC 0.5) to 0.5 (perfect either way)."""
    return abs(auroc - 0.5)


# ----------------------------------------------------------------------------------------------
# What each example is made of, and how hard it is said to be


def char_kinds(text: str) -> dict[str, float]:
    """The fractions of a text's non-space characters that are digits, letters and other symbols."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return {"digit": 0.0, "letter": 0.0, "symbol": 0.0}
    digits = sum(c.isdigit() for c in chars)
    letters = sum(c.isalpha() for c in chars)
    return {"digit": digits / len(chars), "letter": letters / len(chars), "symbol": 1 - (digits + letters) / len(chars)}


def composition_frame(examples: Iterable) -> pd.DataFrame:
    """Per example (index: id): response_chars, prompt_chars and digit_fraction of the response."""
    rows = {
        ex.id: {
            "response_chars": len(ex.response),
            "prompt_chars": len(ex.prompt),
            "digit_fraction": char_kinds(ex.response)["digit"],
        }
        for ex in examples
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["response_chars", "prompt_chars", "digit_fraction"])


KINDS = ("digit", "letter", "symbol")


def composition_covariates(examples: Iterable, ids: Sequence[str]) -> np.ndarray:
    """What the per-token-kind baseline of the loss is fitted on, one row per id: the response's fractions of digit,
    letter and symbol characters. A mean loss that mixes per-kind losses is linear in them (they sum to 1 and play
    the intercept's part). Length is left out on purpose: in GSM8K-format data more steps make a longer answer, and
    on the embedded data a baseline with the log lengths took the steps' AUROC from 0.72 to 0.52. Ids without an
    example get NaN."""
    by_id = {ex.id: ex for ex in examples}
    rows = [[char_kinds(by_id[i].response)[k] for k in KINDS] if i in by_id else [math.nan] * 3 for i in ids]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(KINDS))


def ordinal(values: Sequence) -> list[float] | None:
    """A difficulty column as numbers, or None when it has no order: numbers as they are, the embedded levels by
    rank (easy < medium < hard), text ending in a number ("Level 3") by that number."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values]
    if all(isinstance(v, str) and v in LEVELS for v in values):
        return [float(LEVELS.index(v)) for v in values]
    found = [TRAILING_NUMBER.search(v) if isinstance(v, str) else None for v in values]
    if all(found):
        return [float(f.group(1)) for f in found]
    return None


def difficulty_frame(examples: Iterable) -> pd.DataFrame:
    """Per example (index: id): every difficulty column present with an order, and calculator_steps (the number of
    ``<<...>>`` annotations) where any response has one. Missing values are NaN."""
    examples = list(examples)
    out = pd.DataFrame(index=pd.Index([ex.id for ex in examples], dtype=object))
    for key in DIFFICULTY_KEYS:
        present = {ex.id: ex.meta[key] for ex in examples if ex.meta and ex.meta.get(key) is not None}
        numbers = ordinal(list(present.values())) if present else None
        if numbers is not None:
            out[key] = pd.Series(dict(zip(present, numbers)), dtype=np.float64)
    steps = [len(CALCULATOR_STEP.findall(ex.response)) for ex in examples]
    if any(steps):
        out["calculator_steps"] = np.asarray(steps, dtype=np.float64)
    return out


# ----------------------------------------------------------------------------------------------
# The audit


def feature_table(
    ids: Sequence[str], examples: Iterable | None, counts: pd.DataFrame | None, flags: Sequence[str]
) -> dict[str, tuple[str, pd.Series]]:
    """Every feature the audit scores, by name: (group, values indexed by id)."""
    index = pd.Index(list(ids), dtype=object)
    table: dict[str, tuple[str, pd.Series]] = {}
    examples = list(examples or [])
    if examples:
        comp = composition_frame(examples).reindex(index)
        table["response_chars"] = (COMPOSITION, comp["response_chars"])
    if counts is not None and "n_tokens" in counts:
        table["response_tokens"] = (COMPOSITION, counts["n_tokens"].reindex(index).astype(np.float64))
    if examples:
        table["prompt_chars"] = (COMPOSITION, comp["prompt_chars"])
        table["digit_fraction"] = (COMPOSITION, comp["digit_fraction"])
    cut = pd.Series([f == "truncated" for f in flags], index=index, dtype=np.float64)
    if counts is not None and "n_cut" in counts:
        cut = np.maximum(cut, (counts["n_cut"].reindex(index).fillna(0) > 0).astype(np.float64))
    table["truncated"] = (COMPOSITION, cut)
    if examples:
        diff = difficulty_frame(examples).reindex(index)
        for key in diff.columns:
            table[key] = (DIFFICULTY, diff[key])
    return table


def score_features(table: dict[str, tuple[str, pd.Series]], hard: pd.Series) -> tuple[dict, list[str]]:
    """AUROC of each feature for hard membership (over the rows where it is known), and the features that are
    constant there (they tell nothing and are left out)."""
    scored, constant = {}, []
    for name, (group, values) in table.items():
        known = values.notna()
        v, h = values[known].to_numpy(np.float64), hard[known].to_numpy(bool)
        if len(v) == 0 or h.all() or not h.any():
            continue
        if np.unique(v).size < 2:
            constant.append(name)
            continue
        result = auroc_with_ci(v, h)
        scored[name] = {"group": group, **result, "higher_in": "hard" if result["auroc"] >= 0.5 else "easy"}
    return scored, constant


def composition_warning(features: dict[str, dict]) -> str | None:
    """One line when a composition feature separates hard from easy better than every difficulty column (and
    significantly: its interval excludes 0.5), or strongly where there is no difficulty column."""

    def best(group: str) -> tuple[str, dict] | None:
        found = [(n, f) for n, f in features.items() if f["group"] == group]
        return max(found, key=lambda nf: strength(nf[1]["auroc"]), default=None)

    comp, diff = best(COMPOSITION), best(DIFFICULTY)
    if comp is None:
        return None
    name, c = comp
    lo, hi = c["ci95"]
    if lo <= 0.5 <= hi:
        return None
    what = f"hard membership tracks {name} (AUROC {c['auroc']:.3f}, 95% CI {lo:.2f}-{hi:.2f}, "
    what += f"higher in {c['higher_in']})"
    advice = "the proxy's loss may be sorting examples by which tokens they contain, not by difficulty; compare "
    advice += "features='residual' (the loss above a per-token-kind baseline)"
    if diff is None:
        if strength(c["auroc"]) < STRONG:
            return None
        return f"{what}, and the data has no difficulty column to compare it with: {advice}"
    dname, d = diff
    if strength(c["auroc"]) <= strength(d["auroc"]):
        return None
    return f"{what} more than any difficulty column (best: {dname}, AUROC {d['auroc']:.3f}): {advice}"


def difficulty_warning(features: dict[str, dict]) -> str | None:
    """One line when the data has difficulty columns and hard membership follows none of them better than chance:
    no difficulty column is higher in the hard cluster with a 95% interval above 0.5."""
    found = {n: f for n, f in features.items() if f["group"] == DIFFICULTY}
    if not found or any(f["ci95"][0] > 0.5 for f in found.values()):
        return None
    name, best = max(found.items(), key=lambda nf: nf[1]["auroc"])
    lo, hi = best["ci95"]
    return (
        f"hard membership follows no difficulty column better than chance (best: {name}, AUROC {best['auroc']:.3f}, "
        f"95% CI {lo:.2f}-{hi:.2f}, higher in {best['higher_in']}): the split may not find the harder problems; "
        "check the proxy (did it learn the data's language? is its run long enough for the losses to diverge?)"
    )


def audit_split(
    split_df: pd.DataFrame,
    examples: Iterable | None = None,
    counts: pd.DataFrame | None = None,
    proxy: dict | None = None,
) -> dict[str, Any]:
    """The audit of a split (a frame as `split.split_trajectories` returns it).

    Only the rows k-means assigned are scored: flagged rows have no loss and small sources are hard by rule.
    `examples` give the composition and difficulty features, `counts` the store's n_tokens/n_cut (see
    `trajectories.counts`), `proxy` the language check (`proxy_language`). Returns ``{"n", "n_hard", "features": {name:
    {group, auroc, ci95, n, n_pos, n_neg, higher_in}}, "constant", "proxy", "warnings"}``.
    """
    rows = split_df[split_df["assigned"] == "kmeans"]
    ids = rows["id"].astype(str).tolist()
    hard = pd.Series(rows["hard"].to_numpy(bool), index=pd.Index(ids, dtype=object))
    table = feature_table(ids, examples, counts, rows["flag"].tolist())
    features, constant = score_features(table, hard)
    found = [composition_warning(features), difficulty_warning(features), (proxy or {}).get("warning")]
    warnings = [w for w in found if w]
    return {
        "n": len(ids),
        "n_hard": int(hard.sum()),
        "rows": "examples k-means assigned (flagged rows and small sources left out)",
        "features": features,
        "constant": constant,
        "proxy": proxy,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------
# Does the proxy know the language?


def per_token_loss(losses: np.ndarray, n_tokens: Sequence[float] | None = None) -> list[float]:
    """The mean per-token loss at each checkpoint over the scored rows (token-weighted where the counts are known,
    which is the loss over all response tokens of the data)."""
    losses = np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(losses).all(axis=1)
    weights = np.ones(len(losses)) if n_tokens is None else np.asarray(n_tokens, dtype=np.float64)
    ok &= weights > 0
    if not ok.any():
        return [math.nan] * losses.shape[1]
    return [float(v) for v in np.average(losses[ok], axis=0, weights=weights[ok])]


def proxy_language(
    per_token: Sequence[float],
    steps: Sequence[int],
    vocab_size: int | None,
    initial_loss: float | None = None,
    unigram_loss: float | None = None,
) -> dict[str, Any] | None:
    """The proxy's per-token loss before training (where known), at the first and at the last recorded step,
    against two models that do not know the language: an untrained one (uniform over the vocabulary, ln V) and one
    that knows only token frequencies (`unigram_loss`, where known). A warning when the last recorded loss is above
    UNTRAINED_FRACTION of ln V, or above UNIGRAM_FRACTION of the unigram loss."""
    if not vocab_size or vocab_size < 2 or not len(per_token):
        return None
    uniform = math.log(vocab_size)
    final, step = per_token[-1], int(steps[-1])
    out = {
        "vocab_size": int(vocab_size),
        "uniform_loss": uniform,
        "unigram_loss": unigram_loss,
        "initial_loss": initial_loss,
        "first": {"step": int(steps[0]), "loss": per_token[0]},
        "final": {"step": step, "loss": final},
        "final_over_uniform": final / uniform,
        "final_over_unigram": final / unigram_loss if unigram_loss else None,
        "warning": None,
    }
    advice = (
        "it has not learned the data's language, so its loss ranks examples by which tokens they contain; use a "
        "proxy pretrained on text like this data, or train it longer"
    )
    if final > UNTRAINED_FRACTION * uniform:
        out["warning"] = (
            f"the proxy's mean per-token loss is {final:.2f} after its training (step {step}), {final / uniform:.0%} "
            f"of ln(vocab size) = {uniform:.2f}, the loss of an untrained model: {advice}"
        )
    elif unigram_loss and final > UNIGRAM_FRACTION * unigram_loss:
        out["warning"] = (
            f"the proxy's mean per-token loss is {final:.2f} after its training (step {step}), "
            f"{final / unigram_loss:.0%} of {unigram_loss:.2f}, the loss of a model that knows only how frequent "
            f"each token is in these responses: {advice}"
        )
    return out


def unigram_loss(texts: Iterable[str], tokenizer_json: Path) -> float | None:
    """The per-token loss of the best model that knows only token frequencies: the entropy of the texts' token
    counts under the proxy's tokenizer (fitted on the same texts, so a slight underestimate). None where the
    tokenizer has no tokenizer.json (the `tokenizers` library reads it without loading torch)."""
    from tokenizers import Tokenizer

    if not tokenizer_json.exists():
        return None
    encoded = Tokenizer.from_file(str(tokenizer_json)).encode_batch(list(texts), add_special_tokens=False)
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encoded] + [np.zeros(0, np.int64)])
    if ids.size == 0:
        return None
    p = np.bincount(ids)
    p = p[p > 0] / ids.size
    return float(-(p * np.log(p)).sum())


def proxy_facts(meta: dict, proxy_dir: Path) -> dict[str, Any]:
    """What the language check needs to know of the proxy: its vocabulary size (the store's meta, else its saved
    config), its per-token loss before training (the store's meta ``initial_per_token_loss`` where the profile
    recorded it, else the first logged step's loss, taken on the first batch before the first update: one batch, an
    estimate) and its tokenizer file (the saved proxy's, else the one it started from)."""
    proxy = rundir.TrainDir(proxy_dir)
    model = rundir.ModelDir(proxy.model)
    vocab = (meta.get("proxy") or {}).get("vocab_size")
    if vocab is None and model.config.exists():
        vocab = json.loads(model.config.read_text()).get("vocab_size")
    initial = meta.get("initial_per_token_loss")
    if initial is None and proxy.log.exists():
        for line in proxy.log.read_text().splitlines():
            record = json.loads(line)
            if record.get("step") == 1:
                initial = float(record["loss"])
                break
    origins = [model, rundir.ModelDir((meta.get("proxy") or {}).get("path") or model.root)]
    tokenizer = next((d.tokenizer_json for d in origins if d.tokenizer_json.exists()), None)
    return {"vocab_size": vocab, "initial_loss": initial, "tokenizer_json": tokenizer}


# ----------------------------------------------------------------------------------------------
# Showing it


def markdown_lines(audit: dict, title: str = "Split audit") -> list[str]:
    """A short table (feature, AUROC, 95% CI) and the warnings, for the report."""
    lines = [
        f"{title}: how well each property separates hard from easy ({audit['n_hard']} hard of {audit['n']}; "
        "AUROC 0.5 = no information, above 0.5 = higher in hard).",
        "",
        "| feature | kind | AUROC | 95% CI |",
        "|---|---|---|---|",
    ]
    for name, f in audit["features"].items():
        lo, hi = f["ci95"]
        lines.append(f"| {name} | {f['group']} | {f['auroc']:.2f} | {lo:.2f}-{hi:.2f} |")
    p = audit.get("proxy")
    if p:
        before = "" if p.get("initial_loss") is None else f"{p['initial_loss']:.2f} before training, "
        unigram = "" if p.get("unigram_loss") is None else f"; token frequencies only: {p['unigram_loss']:.2f}"
        lines += [
            "",
            f"Proxy per-token loss: {before}{p['first']['loss']:.2f} at step {p['first']['step']}, "
            f"{p['final']['loss']:.2f} at step {p['final']['step']} (untrained: ln {p['vocab_size']} = "
            f"{p['uniform_loss']:.2f}{unigram}).",
        ]
    if audit["warnings"]:
        lines += [""] + [f"- WARNING: {w}" for w in audit["warnings"]]
    return lines
