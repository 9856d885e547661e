"""The upsample stage: exact multiplicities per arm, the random control's budget, the materialized
file read back line by line, synthesis through an importable generator."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datalever import provenance, rundir
from datalever.checks import ConfigError
from datalever.examples import Example, load_examples, save_examples
from datalever.upsample import UpsampleConfig, UpsampleError, load_callable, multiplicities, run


def read_arm(arm_dir):
    """An arm's distinct examples with their multiplicities from the manifest, as training reads them."""
    mult = rundir.read_manifest(arm_dir / "manifest.parquet")
    examples = load_examples(str(arm_dir / "examples.jsonl"))
    return examples, [mult[ex.id] for ex in examples]


HARD = {"b", "d", "f"}
SMALL = {"k"}  # a small source, hard as a whole
FLAGGED = {"j"}
IDS = list("abcdefghijk")


pytestmark = pytest.mark.usefixtures("fast_provenance")


def split_table() -> pd.DataFrame:
    rows = []
    for i in IDS:
        if i in FLAGGED:
            rows.append((i, "s1", "truncated", -1, False, "flagged"))
        elif i in SMALL:
            rows.append((i, "s2", "", -1, True, "small_source"))
        else:
            rows.append((i, "s1", "", int(i in HARD), i in HARD, "kmeans"))
    return pd.DataFrame(rows, columns=["id", "source", "flag", "cluster", "hard", "assigned"])


ALL_HARD = HARD | SMALL
EASY = set(IDS) - ALL_HARD - FLAGGED


@pytest.mark.parametrize("m", [1, 2])
def test_multiplicities_exact_per_arm(m):
    df = split_table()
    hard = multiplicities(df, "hard", m)
    assert hard == {i: 1 + m if i in ALL_HARD else 1 for i in IDS}
    assert multiplicities(df, "easy", m) == {i: 1 + m if i in EASY else 1 for i in IDS}
    assert multiplicities(df, "base", m) == {i: 1 for i in IDS}
    rnd = multiplicities(df, "random", m, seed=3)
    assert set(rnd) == set(IDS)
    assert sum(rnd.values()) - len(IDS) == sum(hard.values()) - len(IDS) == m * len(ALL_HARD)
    assert Counter(rnd.values()) == Counter(hard.values())  # same histogram: n_hard examples at 1+m
    assert rnd["j"] == 1  # flagged stays once in every arm
    assert all(multiplicities(df, arm, m)["j"] == 1 for arm in ("hard", "easy", "base"))


def test_random_arm_is_seeded_uniform_and_order_free():
    df = split_table()
    a = multiplicities(df, "random", 1, seed=5)
    assert a == multiplicities(df, "random", 1, seed=5)
    shuffled = df.sample(frac=1.0, random_state=0)
    assert multiplicities(shuffled, "random", 1, seed=5) == a  # the draw does not depend on row order
    draws = [frozenset(i for i, v in multiplicities(df, "random", 1, seed=s).items() if v > 1) for s in range(1000)]
    assert len(set(draws)) > 20
    counts = Counter(i for d in draws for i in d)
    assert "j" not in counts and set(counts) == set(IDS) - FLAGGED
    # uniform: each of the 10 eligible ids is drawn with probability 4/10: 1000 draws -> 400, sd 15.5
    assert all(abs(c - 400) < 5 * 15.5 for c in counts.values()), counts


def test_multiplicities_bad_input():
    df = split_table()
    with pytest.raises(UpsampleError, match="unknown distribution"):
        multiplicities(df, "medium", 1)
    with pytest.raises(UpsampleError, match="non-negative"):
        multiplicities(df, "hard", -1)


# ------------------------------------------------------------------------------ the stage


def make_run(tmp_path):
    examples = [
        Example(id=i, prompt=f"Question {i}?\n", response=f"Answer {i}", source=s, meta={"n": k})
        for k, (i, s) in enumerate(zip(IDS, split_table()["source"]))
    ]
    save_examples(str(tmp_path / "data" / "train.jsonl"), examples)
    pq.write_table(pa.Table.from_pandas(split_table(), preserve_index=False), tmp_path / "split.parquet")
    return examples


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_base_reads_no_split(tmp_path):
    """The data as given needs no split: every example once, in the same order with a split table or without."""
    make_run(tmp_path)
    with_split = run(UpsampleConfig(run_dir=str(tmp_path), distribution="base", seed=1, out=str(tmp_path / "a")))
    (tmp_path / "split.parquet").unlink()
    without = run(UpsampleConfig(run_dir=str(tmp_path), distribution="base", seed=1, out=str(tmp_path / "b")))
    assert [r["id"] for r in read_lines(tmp_path / "a" / "train.jsonl")] == [
        r["id"] for r in read_lines(tmp_path / "b" / "train.jsonl")
    ]
    assert Counter(r["id"] for r in read_lines(tmp_path / "b" / "train.jsonl")) == {i: 1 for i in IDS}
    assert without["n_hard"] is None and without["n_flagged"] is None and without["n_rows"] == len(IDS)
    assert with_split["n_rows"] == len(IDS)
    with pytest.raises(UpsampleError, match="no split at"):  # every other distribution still needs one
        run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", seed=1, out=str(tmp_path / "c")))


@pytest.mark.parametrize("arm", ["hard", "easy", "random", "base"])
def test_run_materializes_each_id_multiplicity_times(tmp_path, arm):
    make_run(tmp_path)
    counts = run(UpsampleConfig(run_dir=str(tmp_path), distribution=arm, m=2, seed=1))
    arm_dir = tmp_path / "arms" / arm
    lines = read_lines(arm_dir / "train.jsonl")
    got = Counter(r["id"] for r in lines)
    expected = {
        "hard": {i: 3 if i in ALL_HARD else 1 for i in IDS},
        "easy": {i: 3 if i in EASY else 1 for i in IDS},
        "base": {i: 1 for i in IDS},
    }
    if arm == "random":
        assert sum(got.values()) == len(IDS) + 2 * len(ALL_HARD) and got["j"] == 1
        assert sorted(got.values()) == sorted(expected["hard"].values())
    else:
        assert dict(got) == expected[arm]
    man = pq.read_table(arm_dir / "manifest.parquet").to_pandas()
    assert dict(zip(man["id"], man["multiplicity"])) == dict(got)
    assert set(man["origin"]) == {"original"} and man["parent_id"].isna().all()
    # TRL's prompt/completion columns, read as they are: each row's text is its example's (examples.jsonl).
    by_id = {ex.id: ex for ex in load_examples(str(arm_dir / "examples.jsonl"))}
    assert all(set(r) == {"prompt", "completion", "id", "source"} for r in lines)
    assert all((r["prompt"], r["completion"]) == (by_id[r["id"]].prompt, by_id[r["id"]].response) for r in lines)
    assert counts["n_rows"] == len(lines) and counts["n_extra_copies"] == len(lines) - len(IDS)
    assert json.loads((arm_dir / "manifest.json").read_text()) == counts
    # the content travels with the id
    assert all(r["prompt"] == f"Question {r['id']}?\n" for r in lines)
    examples, mult = read_arm(arm_dir)
    assert {ex.id: k for ex, k in zip(examples, mult)} == dict(got)


def test_materialized_order_is_shuffled_and_seeded(tmp_path):
    make_run(tmp_path)
    run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=2, seed=1))
    first = [r["id"] for r in read_lines(tmp_path / "arms" / "hard" / "train.jsonl")]
    run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=2, seed=1))
    assert [r["id"] for r in read_lines(tmp_path / "arms" / "hard" / "train.jsonl")] == first
    run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=2, seed=2, overwrite=True))
    other = [r["id"] for r in read_lines(tmp_path / "arms" / "hard" / "train.jsonl")]
    assert other != first and sorted(other) == sorted(first)
    grouped = [i for i in IDS for _ in range(3 if i in ALL_HARD else 1)]
    assert first != grouped


SYNTH_MODULE = """
from datalever.examples import Example

def twins(example, n, seed):
    return [Example(id=f"{example.id}~v{j}", prompt=example.prompt + f" (variant {j})",
                    response=example.response, source=example.source, meta={"parent": example.id})
            for j in range(n)]

def one_arg(example):
    return [Example(id=example.id + "~x", prompt="p", response="r"),
            Example(id=example.id + "~y", prompt="p", response="r")]

def clash(example, n, seed):  # one variant equal to an original, one shared by every parent
    return [Example(id="a", prompt="p", response="r"), Example(id="same", prompt="p", response="r")]

def leaky(example, n, seed):  # a test problem verbatim (other spacing/case), the same reworded, a new one
    return [Example(id=example.id + "~copy", prompt="  tom has 3 apples and buys 4 more.  How many?\\n",
                    response="3 + 4 = 7\\n#### 7"),
            Example(id=example.id + "~reworded", prompt="Ann had 4 pears; she got 3 more. Total?\\n",
                    response="4 + 3 = 7\\n#### 7"),
            Example(id=example.id + "~new", prompt=f"Ann had 4 pears; she got {len(example.id) + 10} more. Total?\\n",
                    response=f"#### {len(example.id) + 14}")][:n]

def copycat(example, n, seed):  # the parent reworded (case, spacing), then a new problem
    return [Example(id=example.id + "~same", prompt="  " + example.prompt.upper(), response=example.response),
            Example(id=example.id + "~new", prompt=example.prompt + " And one more?", response="r")][:n]

NOT_CALLABLE = 3
"""


def test_synth_variants_added_and_marked(tmp_path, monkeypatch):
    (tmp_path / "mysynth.py").write_text(SYNTH_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    make_run(tmp_path)
    counts = run(
        UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=1, synth_fn="mysynth:twins", synth_per_hard=2)
    )
    arm_dir = tmp_path / "arms" / "hard"
    got = Counter(r["id"] for r in read_lines(arm_dir / "train.jsonl"))
    synth_ids = {f"{p}~v{j}" for p in ALL_HARD for j in range(2)}
    assert {i: got[i] for i in synth_ids} == {i: 1 for i in synth_ids}
    assert {i: got[i] for i in IDS} == {i: 2 if i in ALL_HARD else 1 for i in IDS}
    man = pq.read_table(arm_dir / "manifest.parquet").to_pandas().set_index("id")
    assert set(man.index[man["origin"] == "synth"]) == synth_ids
    assert all(man.loc[i, "parent_id"] == i.split("~")[0] for i in synth_ids)
    assert counts["n_synth"] == 8 and counts["n_unique"] == len(IDS) + 8
    # variants whose id is taken are dropped and counted, never duplicated
    counts = run(
        UpsampleConfig(
            run_dir=str(tmp_path),
            distribution="hard",
            synth_fn="mysynth:clash",
            synth_per_hard=2,
            out=str(tmp_path / "elsewhere"),
        )
    )
    man = pq.read_table(tmp_path / "elsewhere" / "manifest.parquet").to_pandas()
    assert man["id"].is_unique and list(man.loc[man["origin"] == "synth", "id"]) == ["same"]
    assert counts["n_synth"] == 1 and counts["n_synth_dropped_duplicates"] == 2 * len(ALL_HARD) - 1
    # a training problem reworded is not a new problem: dropped and counted as a duplicate
    counts = run(
        UpsampleConfig(
            run_dir=str(tmp_path),
            distribution="hard",
            synth_fn="mysynth:copycat",
            synth_per_hard=2,
            out=str(tmp_path / "cc"),
        )
    )
    man = pq.read_table(tmp_path / "cc" / "manifest.parquet").to_pandas()
    assert set(man.loc[man["origin"] == "synth", "id"]) == {f"{p}~new" for p in ALL_HARD}
    assert counts["n_synth_dropped_duplicates"] == len(ALL_HARD)
    # a generator taking only the example: its list is cut to synth_per_hard
    run(
        UpsampleConfig(
            run_dir=str(tmp_path), distribution="hard", synth_fn="mysynth:one_arg", synth_per_hard=1, overwrite=True
        )
    )
    man = pq.read_table(arm_dir / "manifest.parquet").to_pandas()
    assert set(man.loc[man["origin"] == "synth", "id"]) == {f"{p}~x" for p in ALL_HARD}


def test_variants_reproducing_heldout_problems_are_dropped(tmp_path, monkeypatch):
    (tmp_path / "mysynth.py").write_text(SYNTH_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    make_run(tmp_path)
    held = Example(id="t1", prompt="Tom has 3 apples and buys 4 more. How many?\n", response="#### 7")
    save_examples(str(tmp_path / "data" / "test.jsonl"), [held])
    # default: the validation/test files beside the training file (here only test.jsonl exists)
    counts = run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", synth_fn="mysynth:leaky", synth_per_hard=3))
    man = pq.read_table(tmp_path / "arms" / "hard" / "manifest.parquet").to_pandas()
    assert set(man.loc[man["origin"] == "synth", "id"]) == {f"{p}~new" for p in ALL_HARD}
    assert counts["n_synth_dropped_heldout"] == 2 * len(ALL_HARD)
    assert counts["heldout_files"] == [str(tmp_path / "data" / "test.jsonl")]
    # an explicit empty list checks nothing; a missing file is an error, not a silent skip
    counts = run(
        UpsampleConfig(
            run_dir=str(tmp_path),
            distribution="hard",
            synth_fn="mysynth:leaky",
            synth_per_hard=3,
            heldout=[],
            out=str(tmp_path / "unchecked"),
        )
    )
    assert counts["n_synth"] == 3 * len(ALL_HARD) and counts["n_synth_dropped_heldout"] == 0
    with pytest.raises(UpsampleError, match="not found"):
        run(
            UpsampleConfig(
                run_dir=str(tmp_path),
                distribution="hard",
                synth_fn="mysynth:leaky",
                heldout=[str(tmp_path / "nope.jsonl")],
                out=str(tmp_path / "x"),
            )
        )


@pytest.mark.parametrize(
    "spec, match",
    [
        ("mysynth.twins", "module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("mysynth:missing", "no attribute"),
        ("mysynth:NOT_CALLABLE", "not callable"),
    ],
)
def test_load_callable_errors(tmp_path, monkeypatch, spec, match):
    (tmp_path / "mysynth.py").write_text(SYNTH_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UpsampleError, match=match):
        load_callable(spec)


def test_run_errors(tmp_path, monkeypatch):
    (tmp_path / "mysynth.py").write_text(SYNTH_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UpsampleError, match="no split"):
        run(UpsampleConfig(run_dir=str(tmp_path)))
    examples = make_run(tmp_path)
    save_examples(str(tmp_path / "data" / "train.jsonl"), examples[:-1])
    with pytest.raises(UpsampleError, match="disagree"):
        run(UpsampleConfig(run_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"distribution": "medium"}, "distribution must be one of"),
        ({"m": -1}, "m must be >= 0"),
        ({"m": 1_000_000}, "m must be <= 100"),  # once ran for minutes without a word
        ({"synth_per_hard": -2}, "synth_per_hard must be >= 0"),
        (
            {"distribution": "base", "synth_fn": "datalever.synth:variants"},
            "distribution 'base': it selects no examples",
        ),
    ],
)
def test_bad_options_are_refused_when_the_config_is_built(options, match):
    with pytest.raises(ConfigError, match=match):
        UpsampleConfig(**options)


def test_default_generator_on_embedded_data(tmp_path):
    from datalever import synth

    recs = synth.generate(12, 0)
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    examples = load_examples(str(tmp_path / "raw.jsonl"))
    save_examples(str(tmp_path / "data" / "train.jsonl"), examples)
    hard = {ex.id for ex in examples if ex.meta["level"] != "easy"}
    split = pd.DataFrame(
        {
            "id": [ex.id for ex in examples],
            "source": None,
            "flag": "",
            "hard": [ex.id in hard for ex in examples],
            "assigned": "kmeans",
        }
    )
    pq.write_table(pa.Table.from_pandas(split, preserve_index=False), tmp_path / "split.parquet")
    counts = run(
        UpsampleConfig(
            run_dir=str(tmp_path), distribution="hard", synth_fn="datalever.synth:variants", synth_per_hard=2
        )
    )
    assert counts["n_synth"] + counts["n_synth_dropped_duplicates"] == 2 * len(hard)
    examples_out, mult = read_arm(tmp_path / "arms" / "hard")
    man = pq.read_table(tmp_path / "arms" / "hard" / "manifest.parquet").to_pandas()
    synth_rows = man[man["origin"] == "synth"]
    assert set(synth_rows["parent_id"]) <= hard and len(synth_rows) == counts["n_synth"]
    by_id = {ex.id: ex for ex in examples_out}
    assert all(
        by_id[i].meta["kind"] == by_id[p].meta["kind"] for i, p in zip(synth_rows["id"], synth_rows["parent_id"])
    )


def test_an_arm_is_replaced_only_by_the_same_work_unless_overwrite(tmp_path):
    make_run(tmp_path)
    run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=1))
    run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=1))  # the same work: redone in place
    with pytest.raises(ConfigError, match=r"holds upsample outputs made with other settings \(m: 1 -> 2\)"):
        run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=2))
    counts = run(UpsampleConfig(run_dir=str(tmp_path), distribution="hard", m=2, overwrite=True))
    assert counts["m"] == 2 and provenance.recorded_settings(tmp_path / "arms" / "hard", "upsample")["m"] == 2
