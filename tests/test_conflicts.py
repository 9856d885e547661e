"""Conflicting labels: the same question with different final answers, counted by every loader and named by `data
check`; the stages that read training data warn (default) or refuse (`on_conflict error`). Every expectation is
worked out by hand from the rows below."""

from __future__ import annotations

import json
import logging

import pytest

from datalever import cli
from datalever.examples import DataError, DataFormat, read_data
from datalever.examples import conflicts as conflicts_module
from datalever.examples.conflicts import find_conflicts
from datalever.examples.load import load_and_describe
from datalever.examples.readers import SplitRequest
from example_files import WRITERS

TOM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SPIDER = "How many legs does a spider have?"
ROWS = [
    {"question": TOM, "answer": "3 + 4 = 7\n#### 7"},  # 1
    {"question": TOM, "answer": "He has 3 + 5 = 8\n#### 8"},  # 2: same question, answer 8: a conflict with 1
    {"question": "what is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},  # 3
    {"question": "What is  2 + 2?", "answer": "Two plus two is 4.\n#### 4"},  # 4: re-cased, respaced, reworded: same
    {"question": "What is 10 / 4?", "answer": "#### 2.5"},  # 5
    {"question": "What is 10 / 4?", "answer": "10/4 = 5/2\n#### 5/2"},  # 6: the same value written otherwise
    {"question": SPIDER, "answer": "#### 8"},  # 7
    {"question": SPIDER, "answer": "Spiders have 6 legs.\n#### 6"},  # 8: a conflict with 7 and 9
    {"question": SPIDER, "answer": "It has eight: #### 8"},  # 9
    {"question": "What is 1000 + 234?", "answer": "#### 1,234"},  # 10
    {"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1234. The answer is 1234."},  # 11: same value
]
CONFLICTS = (
    "5 examples (2 prompts) share a prompt but not its final answer: "
    "lines 1 and 2 ('Tom has 3 apples and buys 4 more. How...': 7 vs 8), "
    "lines 7, 8 and 9 ('How many legs does a spider have?': 8 vs 6)"
)


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test as a fresh process on an idle machine: nothing warned about yet."""
    monkeypatch.setattr(cli, "_warn_if_busy", lambda: None)
    conflicts_module._REPORTED.clear()
    yield
    conflicts_module._REPORTED.clear()


@pytest.fixture
def gsm(tmp_path):
    path = tmp_path / "conflicts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def test_data_check_counts_and_names_them(gsm, capsys):
    """Once: "2 examples" and nothing else."""
    cli.main(["data", "check", "--data", gsm])
    out = capsys.readouterr()
    assert f"conflicting labels: {CONFLICTS}\n" in out.out
    assert out.out.startswith(f"{gsm}: 11 examples\n") and out.err == ""  # in the report, not a second time


def test_data_check_without_conflicts_says_none(tmp_path, capsys):
    path = tmp_path / "clean.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[2:6]))
    cli.main(["data", "check", "--data", str(path)])
    assert "conflicting labels: none\n" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["data", "check"], ["profile"], ["train"]], ids=" ".join)
def test_on_conflict_error_refuses_the_data_in_one_line(gsm, tmp_path, capsys, command):
    out = ["--run_dir", str(tmp_path / "run")] if command == ["profile"] else []
    out += ["--out", str(tmp_path / "train")] if command == ["train"] else []
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--data", gsm, "--on_conflict", "error", *out])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"datalever {' '.join(command)}: error: {gsm}: {CONFLICTS}; correct or remove them, or set on_conflict warn "
        "to use the data as it is\n"
    )


@pytest.mark.parametrize("fmt, unit", [("jsonl", "lines"), ("json", "records"), ("parquet", "rows"), ("csv", "rows")])
def test_every_file_format_counts_them_at_their_places(tmp_path, fmt, unit):
    write, name = WRITERS[fmt]
    path = write(tmp_path / name, ROWS)
    found = load_and_describe(path, "auto", None, None, SplitRequest(), "error", "ignore")[2]
    assert [g.places for g in found.groups] == [
        (f"{unit[:-1]} 1", f"{unit[:-1]} 2"),
        (f"{unit[:-1]} 7", f"{unit[:-1]} 8", f"{unit[:-1]} 9"),
    ]
    assert found.summary() == CONFLICTS.replace("lines", unit)


def test_math_alpaca_and_messages_read_their_final_answers(tmp_path):
    """\\boxed{} in MATH solutions, "The answer is" in MathInstruct's, the last assistant turn in a conversation."""
    math = tmp_path / "math.jsonl"
    rows = [
        {"problem": "Solve $x + 1 = 8$.", "solution": "Subtract 1: $x = \\boxed{7}$."},
        {"problem": "Solve $x + 1 = 8$.", "solution": "So $x = 8 - 1 = \\boxed{\\frac{14}{2}}$."},  # 7 as well
        {"problem": "Find $\\frac{1}{2} + \\frac{1}{4}$.", "solution": "$\\boxed{\\frac{3}{4}}$"},
        {"problem": "Find $\\frac{1}{2} + \\frac{1}{4}$.", "solution": "$\\boxed{0.5}$"},
    ]
    math.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (found,) = load_and_describe(str(math), "auto", None, None, SplitRequest(), "error", "ignore")[2].groups
    assert (found.places, found.answers) == (("line 3", "line 4"), ("\\frac{3}{4}", "0.5"))

    alpaca = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Add 2 and 2.", "output": "2 + 2 = 4. The answer is 4.", "source": "a"},
        {"instruction": "Add 2 and 2.", "output": "The answer is 5.", "source": "b"},
    ]
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (found,) = load_and_describe(str(alpaca), "auto", None, None, SplitRequest(), "error", "ignore")[2].groups
    assert (found.places, found.answers) == (("line 1", "line 2"), ("4", "5"))

    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 * 3?"}]
    rows = [
        {"messages": [*turns, {"role": "assistant", "content": "9"}]},
        {"messages": [*turns, {"role": "assistant", "content": "3 * 3 = 9"}]},  # the same answer
        {"messages": [turns[1], {"role": "assistant", "content": "6"}]},  # no system turn: another prompt
    ]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_and_describe(str(chat), "auto", None, None, SplitRequest(), "error", "ignore")[2].groups == ()


def test_responses_without_an_answer_are_compared_as_text():
    from datalever.examples import Example

    examples = [
        Example("a", "Is the review positive?\n", "Positive"),
        Example("b", "is the review  positive?\n", "positive"),  # the same label, cased otherwise
        Example("c", "Is the review positive?\n", "Negative"),
    ]
    (found,) = find_conflicts("labels", examples, ["row 1", "row 2", "row 3"]).groups
    assert (found.places, found.answers) == (("row 1", "row 2", "row 3"), ("positive", "negative"))


def test_training_stages_warn_once_in_one_line_by_default(gsm, caplog):
    """profile, train, upsample and an experiment's data all read through `read_data` with their config's data
    options: a warning by default, once a process for the same conflicts (an experiment reads its data many times)."""
    from datalever.profile import ProfileConfig
    from datalever.train import TrainConfig
    from datalever.upsample import UpsampleConfig

    with caplog.at_level(logging.WARNING):
        for config in (ProfileConfig(), TrainConfig(), UpsampleConfig()):
            assert len(read_data(gsm, config.data_format())) == 11
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"warning: {gsm}: {CONFLICTS}; no model can be right on both (on_conflict error refuses such data)"
    ]
    for config in (ProfileConfig(on_conflict="error"), TrainConfig(on_conflict="error")):
        with pytest.raises(DataError, match="share a prompt but not its final answer"):
            read_data(gsm, config.data_format())
    with pytest.raises(DataError, match="share a prompt but not its final answer"):
        read_data(gsm, UpsampleConfig(on_conflict="error").data_format())


def test_an_experiment_refuses_them_when_it_reads_its_data(gsm, tmp_path, caplog):
    from datalever import experiment
    from datalever.checks import ConfigError
    from datalever.experiment.data import import_data
    from datalever.rundir import RunDir
    from datalever.train import TrainConfig

    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "What is 9 - 1?", "answer": "#### 8"}) + "\n")
    cfg = experiment.ExperimentConfig(run_dir=str(tmp_path / "run"), train_file=gsm, test_file=str(test))
    with caplog.at_level(logging.WARNING):
        import_data(cfg, RunDir(cfg.run_dir))
    assert [r.getMessage() for r in caplog.records if "share a prompt" in r.getMessage()] == [
        f"warning: {gsm}: {CONFLICTS}; no model can be right on both (on_conflict error refuses such data)"
    ]
    strict = experiment.ExperimentConfig(
        run_dir=str(tmp_path / "strict"), train_file=gsm, test_file=str(test), on_conflict="error"
    )
    with pytest.raises(DataError, match=f"^{gsm}: 5 examples"):
        import_data(strict, RunDir(strict.run_dir))
    with pytest.raises(ConfigError, match="train.on_conflict is set by the experiment; give the experiment's own"):
        experiment.ExperimentConfig(train_file=gsm, test_file=str(test), train=TrainConfig(on_conflict="error"))


def test_on_conflict_takes_warn_or_error():
    from datalever.checks import ConfigError

    with pytest.raises(ConfigError, match="on_conflict must be one of warn, error; got 'ignore'"):
        DataFormat(on_conflict="ignore")
