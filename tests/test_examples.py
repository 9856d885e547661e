"""Loading examples: every format and schema, stable ids, templates, field mapping, saving, and every bad record.

Expected prompts and ids are written by hand (ids via hashlib directly), not taken from the code.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from datalever.examples import DEFAULT_TEMPLATES, DataError, Example, detect_schema, load_examples, save_examples
from example_files import GSM, WRITERS, bad, sha_id, write_csv, write_jsonl, write_parquet

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 5", "output": "7", "source": "mathinstruct/add"},
    {"instruction": "Name a prime number.", "input": "", "output": "13", "source": "mathinstruct/prime"},
]


PLAIN = [{"prompt": "2+2=", "response": "4"}, {"prompt": "3+3=", "response": "6"}]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_gsm8k_loads_from_every_format(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    exs = load_examples(writer(tmp_path / name, GSM))
    assert [e.prompt for e in exs] == [
        "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:\n",
        "Question: Ann has 10 pens and loses 2. How many are left?\nAnswer:\n",
        "Question: What is 6 times 7?\nAnswer:\n",
    ]
    assert [e.response for e in exs] == ["3 + 4 = 7\n#### 7", "10 - 2 = 8\n#### 8", "6 * 7 = 42\n#### 42"]
    assert exs[0].id == sha_id(GSM[0]["question"], GSM[0]["answer"])
    assert [e.meta for e in exs] == [{"difficulty": "easy"}, {"difficulty": "easy"}, {"difficulty": "medium"}]
    assert all(e.source is None for e in exs)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "save_to_disk"])
def test_alpaca_loads_with_and_without_input(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    a, b = load_examples(writer(tmp_path / name, ALPACA))
    assert a.prompt == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 5\n\n### Response:\n"
    assert b.prompt == "### Instruction:\nName a prime number.\n\n### Response:\n"
    assert (a.response, b.response) == ("7", "13")
    assert (a.source, b.source) == ("mathinstruct/add", "mathinstruct/prime")
    assert a.id == sha_id("Add the numbers.", "2 and 5", "7")
    assert b.id == sha_id("Name a prime number.", "", "13")


def test_alpaca_without_input_column_has_the_same_id_as_with_an_empty_one(tmp_path):
    rows = [{"instruction": "Name a prime number.", "output": "13"}]
    (ex,) = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    assert ex.id == sha_id("Name a prime number.", "", "13")
    assert ex.source is None and ex.meta == {}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_prompt_response_loads_as_is(tmp_path, fmt):
    writer, name = WRITERS[fmt]
    exs = load_examples(writer(tmp_path / name, PLAIN))
    assert [(e.prompt, e.response) for e in exs] == [("2+2=", "4"), ("3+3=", "6")]
    assert exs[1].id == sha_id("3+3=", "6")


def test_ids_survive_row_order_reruns_and_template_changes(tmp_path):
    first = load_examples(write_jsonl(tmp_path / "a.jsonl", GSM))
    shuffled = load_examples(write_jsonl(tmp_path / "b.jsonl", GSM[::-1]))
    again = load_examples(str(tmp_path / "a.jsonl"))
    other = load_examples(str(tmp_path / "a.jsonl"), template="Q: {question}\nA:")
    ids = [e.id for e in first]
    assert len(set(ids)) == 3
    assert [e.id for e in shuffled] == ids[::-1]
    assert [e.id for e in again] == ids == [e.id for e in other]
    assert other[0].prompt == "Q: Tom has 3 apples and buys 4 more. How many apples?\nA:"


def test_custom_templates_may_use_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", GSM[:1])
    (ex,) = load_examples(path, template="[{difficulty}] {question}\n")
    assert ex.prompt == "[easy] Tom has 3 apples and buys 4 more. How many apples?\n"
    assert ex.prompt + ex.response == (
        "[easy] Tom has 3 apples and buys 4 more. How many apples?\n3 + 4 = 7\n#### 7"
    )  # the boundary is len(prompt)


def test_default_templates_are_the_documented_ones():
    assert DEFAULT_TEMPLATES["gsm8k"].format(question="Q?") == "Question: Q?\nAnswer:\n"
    assert DEFAULT_TEMPLATES["prompt_response"].format(prompt="p") == "p"


def test_field_mapping_overrides_detection(tmp_path):
    rows = [{"question": "decoy?", "answer": "decoy", "q": "What is 1+1?", "a": "2", "src": "toy"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    assert load_examples(path)[0].response == "decoy"  # detection alone picks gsm8k
    (ex,) = load_examples(path, fields={"prompt": "q", "response": "a", "source": "src"})
    assert (ex.prompt, ex.response, ex.source) == ("What is 1+1?", "2", "toy")
    assert ex.id == sha_id("What is 1+1?", "2")
    assert ex.meta == {"question": "decoy?", "answer": "decoy"}  # unused columns are kept
    (g,) = load_examples(path, fields={"question": "q", "answer": "a"})
    assert g.prompt == "Question: What is 1+1?\nAnswer:\n"


def test_detect_schema():
    assert detect_schema(["question", "answer"]) == "gsm8k"
    assert detect_schema(["instruction", "output", "source"]) == "alpaca"
    assert detect_schema(["prompt", "response", "x"]) == "prompt_response"
    assert detect_schema(["id", "prompt", "response", "source", "meta"]) == "datalever"
    assert detect_schema(["q", "a"], {"prompt": "q", "response": "a"}) == "prompt_response"
    with pytest.raises(DataError, match=r"\['q', 'a'\]"):
        detect_schema(["q", "a"])
    with pytest.raises(DataError, match="several schemas"):
        detect_schema(["question", "answer", "instruction", "output"])


def test_trl_prompt_completion_and_math_problem_solution_are_detected(tmp_path):
    """TRL's prompt/completion and MATH's problem/solution files were refused as 'cannot detect the schema'."""
    from datalever.answers import extract_answer

    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": "What is 2+2?\n", "completion": "It is 4.\n#### 4"}) + "\n")
    (ex,) = load_examples(str(trl))
    assert (ex.prompt, ex.response) == ("What is 2+2?\n", "It is 4.\n#### 4")
    math_file = tmp_path / "math.jsonl"
    row = {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
        "solution": "We get $\\boxed{\\frac{3}{4}}$.",
        "level": "Level 2",
        "type": "Prealgebra",
    }
    math_file.write_text(json.dumps(row) + "\n")
    (ex,) = load_examples(str(math_file))
    assert ex.prompt == "Problem: Compute $\\frac{1}{2}+\\frac{1}{4}$.\nSolution:\n"
    assert ex.meta["level"] == "Level 2" and extract_answer(ex.response) == "\\frac{3}{4}"


def test_save_examples_round_trips(tmp_path):
    exs = [
        Example("custom-1", "P1\n", "R1", "s", {"steps": 2, "level": "easy"}),
        Example("custom-2", "P2\n", "R2", None, {}),
    ]
    save_examples(str(tmp_path / "out.jsonl"), exs)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["id", "prompt", "response", "source", "meta"]
    back = load_examples(str(tmp_path / "out.jsonl"))
    assert [e.to_record() for e in back] == [e.to_record() for e in exs]  # ids kept, meta parsed
    assert back[0].meta == {"steps": 2, "level": "easy"}
    assert load_examples(str(tmp_path / "out.jsonl"), schema="datalever")[1].id == "custom-2"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_loaded_then_saved_examples_keep_their_ids(tmp_path):
    exs = load_examples(write_jsonl(tmp_path / "g.jsonl", GSM))
    save_examples(str(tmp_path / "out.jsonl"), exs)
    assert [e.id for e in load_examples(str(tmp_path / "out.jsonl"))] == [e.id for e in exs]


# ---- bad records: file, line/row and the reason, always --------------------------------------


def test_missing_field(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], {"question": "no answer here?"}])
    assert re.search(r"bad\.jsonl: line 2: missing field 'answer'", bad(p))


@pytest.mark.parametrize("value, shown", [(None, "null"), (7, "int 7"), (["a"], "list"), (2.5, "float")])
def test_non_text_value(tmp_path, value, shown):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], GSM[1], {"question": "q?", "answer": value}])
    msg = bad(p)
    assert re.search(r"bad\.jsonl: line 3: field 'answer' must be text", msg) and shown in msg


def test_non_text_value_in_parquet_names_the_row(tmp_path):
    p = write_parquet(
        tmp_path / "bad.parquet",
        [{"prompt": "a", "response": "b", "source": None}, {"prompt": "c", "response": "d", "source": 3}],
    )
    p2 = write_parquet(tmp_path / "bad2.parquet", [{"prompt": "a", "response": 1}])
    assert re.search(r"bad\.parquet: row 2: field 'source' must be text, got int 3", bad(p))
    assert re.search(r"bad2\.parquet: row 1: field 'response' must be text, got int", bad(p2))


def test_empty_text_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [GSM[0], {"question": "q?", "answer": "  "}])
    assert re.search(r"bad\.jsonl: line 2: field 'answer' is empty", bad(p))


@pytest.mark.parametrize(
    "name, text",
    [("e.jsonl", ""), ("e2.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "question,answer\n"), ("e2.csv", "")],
)
def test_empty_file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    msg = bad(p)
    assert str(p) in msg and "empty file" in msg


def test_unknown_schema_lists_the_columns(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": 1}])
    msg = bad(p)
    assert str(p) in msg and "['text', 'label']" in msg and "gsm8k (question, answer)" in msg


def test_mapping_to_a_missing_column(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", PLAIN)
    msg = bad(p, fields={"prompt": "q", "response": "response"})
    assert "a.jsonl" in msg and "'q'" in msg and "not in the data" in msg


def test_bad_template_field(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", GSM)
    assert re.search(r"a\.jsonl: line 1: template field 'nope'", bad(p, template="{nope}"))


def test_duplicates_are_reported_with_counts(tmp_path):
    rows = [GSM[0], GSM[1], GSM[2], GSM[0], GSM[0], GSM[2] | {"difficulty": "hard"}]
    p = write_jsonl(tmp_path / "dup.jsonl", rows)
    msg = bad(p)
    assert "dup.jsonl: 3 duplicate examples (2 distinct ids), first at lines 4 and 6" in msg
    assert "copies of lines 1 and 3" in msg and "keep_first" in msg


def test_duplicates_keep_first_warns_and_keeps_the_first_copy(tmp_path, caplog):
    rows = [GSM[0], GSM[1], GSM[0] | {"difficulty": "second copy"}]
    p = write_csv(tmp_path / "dup.csv", rows)
    with caplog.at_level(logging.WARNING):
        exs = load_examples(p, on_duplicate="keep_first")
    assert [e.meta["difficulty"] for e in exs] == ["easy", "easy"]
    assert "1 duplicate examples (1 distinct ids), first at rows 3" in caplog.text
    with pytest.raises(ValueError, match="on_duplicate"):
        load_examples(p, on_duplicate="drop")
