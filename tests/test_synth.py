"""The synthetic GSM8K-style dataset, checked from the outside: the arithmetic each answer shows is
re-evaluated by a small parser written here, and the recorded difficulty is recomputed from the text."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from statistics import mean

import pytest

from datalever import synth
from datalever.examples import LEVELS, Example, load_examples

EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")
FINAL = re.compile(r"\n#### (\d+)$")
# Numbers an answer may use without them appearing as digits: "half"/"a third"/"a quarter", percent.
WORD_CONSTANTS = {2, 3, 4, 100}


def evaluate(expr: str) -> Fraction:
    """a op b op c with the usual precedence (* and / before + and -), exact."""
    tokens = expr.split()
    terms, signs = [Fraction(tokens[0])], []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1] *= int(num)
        elif op == "/":
            terms[-1] /= int(num)
        else:
            signs.append(op)
            terms.append(Fraction(num))
    total = terms[0]
    for op, t in zip(signs, terms[1:]):
        total = total + t if op == "+" else total - t
    return total


def check_record(rec: dict) -> None:
    """Every shown equation is right, uses only given or derived numbers, and leads to #### N;
    the recorded steps, ops and digits match what the text shows."""
    q, a = rec["question"], rec["answer"]
    final = FINAL.search(a)
    assert final, f"no '#### N' at the end of {a!r}"
    equations = EQUATION.findall(a)
    assert equations, a
    known = {int(x) for x in re.findall(r"\d+", q)} | WORD_CONSTANTS
    for expr, result in equations:
        assert evaluate(expr) == int(result), f"{expr} != {result} in {a!r}"
        operands = {int(x) for x in re.findall(r"\d+", expr)}
        assert operands <= known, f"{operands - known} come from nowhere in {q!r} / {a!r}"
        known.add(int(result))
    assert int(final.group(1)) == int(equations[-1][1])
    assert len(a.splitlines()) == len(equations) + 1  # every step line shows its arithmetic
    assert rec["steps"] == len(equations)
    shown_ops = {op for expr, _ in equations for op in re.findall(r" ([-+*/]) ", expr)}
    assert set(rec["ops"].split(",")) == shown_ops
    assert rec["digits"] == max(len(x) for x in re.findall(r"\d+", q + a))


@pytest.fixture(scope="module")
def records():
    return synth.generate(1500, seed=11)


def test_every_answer_shows_correct_arithmetic_ending_in_the_result(records):
    for rec in records:
        check_record(rec)


def test_levels_have_the_promised_shape(records):
    by_level = {lv: [r for r in records if r["level"] == lv] for lv in LEVELS}
    for r in by_level["easy"]:
        assert r["steps"] in (1, 2) and set(r["ops"].split(",")) <= {"+", "-"}
    for r in by_level["medium"]:
        assert r["steps"] in (2, 3) and set(r["ops"].split(",")) & {"*", "/"}
    for r in by_level["hard"]:
        assert 4 <= r["steps"] <= 5 and set(r["ops"].split(",")) & {"*", "/"}
    five = Counter(r["steps"] for r in by_level["hard"])[5] / len(by_level["hard"])
    assert 0.2 < five < 0.45  # about half of three kinds of five take the optional 5th step
    mean_digits = {lv: sum(r["digits"] for r in rs) / len(rs) for lv, rs in by_level.items()}
    assert mean_digits["easy"] < mean_digits["medium"] < mean_digits["hard"]
    assert max(r["digits"] for r in by_level["hard"]) <= 4  # small numbers: hard is the chain, not the digits


def test_mix_proportions(records):
    counts = Counter(r["level"] for r in records)
    assert (counts["easy"], counts["medium"], counts["hard"]) == (750, 450, 300)  # the default 0.5/0.3/0.2
    custom = Counter(r["level"] for r in synth.generate(200, seed=1, mix=(0.2, 0.3, 0.5)))
    assert (custom["easy"], custom["medium"], custom["hard"]) == (40, 60, 100)
    with pytest.raises(ValueError, match="mix"):
        synth.generate(10, seed=1, mix=(0.5, 0.5, 0.5))


def test_texts_are_short(records):
    for r in records:
        assert 60 <= len(r["question"]) <= 250, r["question"]
        assert 25 <= len(r["answer"]) <= 300, r["answer"]
    mean_answer = {lv: mean(len(r["answer"]) for r in records if r["level"] == lv) for lv in LEVELS}
    assert mean_answer["easy"] < 100 < mean_answer["hard"]


def test_wording_varies_within_each_kind(records):
    names = set(synth.FEMALE + synth.MALE)
    for kind in {r["kind"] for r in records}:
        openings = {
            " ".join("NAME" if w.strip("'s,") in names else w for w in r["question"].split()[:2])
            for r in records
            if r["kind"] == kind
        }
        assert len(openings) >= 2, (kind, openings)
    assert len({r["kind"] for r in records}) == 15


def test_generation_is_deterministic_by_seed():
    assert synth.generate(100, seed=3) == synth.generate(100, seed=3)
    a, b = synth.generate(100, seed=3), synth.generate(100, seed=4)
    assert sum(x["question"] == y["question"] for x, y in zip(a, b)) < 5
    assert len({r["question"] for r in a}) == 100  # no repeats within one call


def test_generation_leaves_global_random_state_alone():
    import random

    random.seed(5)
    expected = random.random()
    random.seed(5)
    synth.generate(50, seed=1)
    assert random.random() == expected


def problem_key(rec: dict) -> tuple:
    fractions = tuple(w for w in ("half", "a third", "a quarter") if w in rec["question"])
    return rec["kind"], tuple(sorted(int(x) for x in re.findall(r"\d+", rec["question"]))), fractions


def test_write_splits_are_disjoint_deterministic_and_loadable(tmp_path):
    paths = synth.write_splits(str(tmp_path / "a"), n_train=600, n_val=100, n_test=150, seed=7)
    again = synth.write_splits(str(tmp_path / "b"), n_train=600, n_val=100, n_test=150, seed=7)
    splits = {}
    for name, path in paths.items():
        text = open(path).read()
        assert text == open(again[name]).read()
        splits[name] = [json.loads(line) for line in text.splitlines()]
    assert {k: len(v) for k, v in splits.items()} == {"train": 600, "validation": 100, "test": 150}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not {r["question"] for r in splits[a]} & {r["question"] for r in splits[b]}
        assert not {problem_key(r) for r in splits[a]} & {problem_key(r) for r in splits[b]}
    assert Counter(r["level"] for r in splits["test"]) == {"easy": 75, "medium": 45, "hard": 30}
    for rec in splits["test"]:
        check_record(rec)
    exs = load_examples(str(tmp_path / "a"), split="validation")
    assert len({e.id for e in exs}) == 100
    assert exs[0].prompt == f"Question: {splits['validation'][0]['question']}\nAnswer:\n"
    assert set(exs[0].meta) == {"steps", "digits", "ops", "level", "kind"}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Synth problems as the pipeline sees them: written to a split file, loaded back."""
    out = tmp_path_factory.mktemp("synth")
    synth.write_splits(str(out), n_train=300, n_val=10, n_test=10, seed=2, mix=(0.34, 0.33, 0.33))
    first_of_kind = {}
    for e in load_examples(str(out), split="train"):
        first_of_kind.setdefault(e.meta["kind"], e)
    return first_of_kind


def test_variants_keep_kind_level_and_steps_and_change_the_numbers(loaded):
    assert len(loaded) == 15
    for parent in loaded.values():
        vs = synth.variants(parent, n=3, seed=1)
        assert len(vs) == 3 and len({v.id for v in vs} | {parent.id}) == 4
        parent_numbers = sorted(int(x) for x in re.findall(r"\d+", parent.prompt))
        for v in vs:
            assert (v.meta["kind"], v.meta["level"], v.meta["steps"]) == (
                parent.meta["kind"],
                parent.meta["level"],
                parent.meta["steps"],
            )
            assert v.meta["origin"] == "synth" and v.meta["parent"] == parent.id
            assert sorted(int(x) for x in re.findall(r"\d+", v.prompt)) != parent_numbers
            question = v.prompt.removeprefix("Question: ").removesuffix("\nAnswer:\n")
            check_record({"question": question, "answer": v.response, **v.meta})


def test_variants_are_deterministic_and_round_trip_through_the_gsm8k_loader(loaded, tmp_path):
    parent = loaded["savings"]
    a, b = synth.variants(parent, n=2, seed=5), synth.variants(parent, n=2, seed=5)
    assert [v.to_record() for v in a] == [v.to_record() for v in b]
    assert [v.id for v in synth.variants(parent, n=2, seed=6)] != [v.id for v in a]
    rows = [
        {"question": v.prompt.removeprefix("Question: ").removesuffix("\nAnswer:\n"), "answer": v.response} for v in a
    ]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.id for e in load_examples(str(path))] == [v.id for v in a]
    custom = synth.variants(parent, n=1, seed=5, template="Q: {question}\nA:")
    assert custom[0].prompt.startswith("Q: ") and custom[0].id == a[0].id


def test_variants_need_a_synth_example():
    with pytest.raises(ValueError, match="kind"):
        synth.variants(Example("x", "2+2=", "4"), n=1)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"n_train": -5}, "n_train must be > 0"),
        ({"n_test": -1}, "n_test must be >= 0"),
        ({"mix": (0.5, 0.5, 0.5)}, "mix must be three"),
    ],
)
def test_bad_synth_options_are_refused_before_any_file_is_written(tmp_path, options, match):
    """`data synth --n_train -5` once wrote an empty training file."""
    from datalever.checks import ConfigError

    with pytest.raises(ConfigError, match=match):
        synth.SynthConfig(out=str(tmp_path / "data"), **options)
    assert not (tmp_path / "data").exists()


def test_every_kind_has_room_for_the_default_dataset():
    """Problems are distinct by kind and numbers; a kind whose space runs short is under-drawn and skews the mix of
    kinds within its level (percent_chain once gave 4-9 of 120 hard problems: its fraction, a word, was not part of
    a problem's identity). Each hard kind should get about a fifth of the hard problems of the default dataset."""
    records = synth.generate(2800, seed=0)  # the default train + validation + test
    hard = Counter(r["kind"] for r in records if r["level"] == "hard")
    assert len(hard) == 5 and min(hard.values()) > 0.14 * sum(hard.values()), hard


def test_a_fraction_given_in_words_makes_a_different_problem():
    half = {"kind": "percent_chain", "question": "A has 40 beads. B has 50% more. C has half as many as B."}
    third = {**half, "question": half["question"].replace("half", "a third")}
    assert synth._key(half["kind"], half["question"]) != synth._key(third["kind"], third["question"])
    assert problem_key(half) != problem_key(third)
