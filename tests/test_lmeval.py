"""lm-evaluation-harness on a saved model and a local test set (lmeval.py), and its place in the experiment.

The default suite checks what datalever builds for lm-eval (the questions taken back out of the prompts, the task
directory, the refusals) without running it; the slow tests run lm-eval itself, offline, and check its numbers
against lm-eval's own extraction computed here by hand on the generations it logged."""

import importlib.util
import json
import re
import sys

import pytest
import yaml

from datalever import lmeval, rundir
from datalever.checks import ConfigError
from datalever.examples import Example, save_examples

PROTOTYPE_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def _gsm8k(i: int, prompt: str | None = None, answer: int | None = None) -> Example:
    question = f"What is {i} plus {i + 1}?"
    answer = 2 * i + 1 if answer is None else answer
    return Example(f"g{i}", prompt or f"Question: {question}\nAnswer:\n", f"{i} + {i + 1} = {answer}\n#### {answer}")


def test_the_kind_comes_from_the_gold_answers():
    assert lmeval.detect_kind([_gsm8k(i) for i in range(3)]) == "gsm8k"
    boxed = [Example(f"m{i}", "Problem: p\nSolution:\n", f"so \\boxed{{{i}}}") for i in range(3)]
    assert lmeval.detect_kind(boxed + [_gsm8k(0)]) == "math"
    with pytest.raises(ValueError, match="cannot tell the kind"):
        lmeval.detect_kind([Example("x", "p", "the answer is 3"), *boxed[:1]])


def test_the_question_is_taken_back_out_of_the_prompt():
    question = "Tom has 3 apples.\n\nHow many?"
    plain = Example("a", f"Question: {question}\nAnswer:\n", "#### 3")
    assert lmeval.question_of(plain, []) == question  # datalever's gsm8k template, tried by default
    asked = Example("b", PROTOTYPE_TEMPLATE.format(instruction=question), "#### 3")
    assert lmeval.question_of(asked, [PROTOTYPE_TEMPLATE]) == question
    alpaca = Example("c", f"### Instruction:\n{question}\n\n### Response:\n", "#### 3")
    assert lmeval.question_of(alpaca, []) == question
    chat = Example(
        "d", "User: hi\nAssistant:\n", "#### 3", messages=(("system", "s"), ("user", question), ("assistant", "#### 3"))
    )
    assert lmeval.question_of(chat, []) == question
    with pytest.raises(ValueError, match="example e: its prompt .* matches none of the templates"):
        lmeval.question_of(Example("e", "Q) what?", "#### 3"), [PROTOTYPE_TEMPLATE])
    # a template that is nothing but its field would match any prompt: never tried
    with pytest.raises(ValueError, match="matches none"):
        lmeval.question_of(Example("f", "Q) what?", "#### 3"), ["{prompt}"])


def test_the_task_includes_lm_evals_own_and_reads_local_files(tmp_path, monkeypatch):
    monkeypatch.setattr(lmeval, "_lm_eval_task_yaml", lambda task: f"/lm_eval/tasks/{'/'.join(task.yaml)}")
    work = rundir.EvalDir(tmp_path).lm_eval_work
    task = lmeval.TASKS["gsm8k"]
    docs = lmeval._documents([_gsm8k(1), _gsm8k(2)], task, [])
    assert docs[0] == {"question": "What is 1 plus 2?", "answer": "1 + 2 = 3\n#### 3", "id": "g1"}
    lmeval._write_task(work, "datalever_gsm8k", task, docs, None)
    config = yaml.safe_load(work.task("datalever_gsm8k").read_text())
    assert config == {
        "include": "/lm_eval/tasks/gsm8k/gsm8k.yaml",
        "task": "datalever_gsm8k",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "training_split": None,
        "test_split": "test",
        "fewshot_split": None,  # zero-shot: no GSM8K train split here
        "dataset_kwargs": {"data_files": {"test": str(work.docs)}},
    }
    assert [json.loads(line) for line in work.docs.read_text().splitlines()] == docs
    lmeval._write_task(work, "datalever_gsm8k", task, docs, docs[:1])
    config = yaml.safe_load(work.task("datalever_gsm8k").read_text())
    assert config["fewshot_split"] == config["training_split"] == "train"
    assert config["dataset_kwargs"]["data_files"] == {"test": str(work.docs), "train": str(work.fewshot_docs)}
    math = lmeval.TASKS["math"]
    lmeval._write_task(work, "datalever_minerva_math", math, [{"problem": "p", "solution": "\\boxed{1}"}], None)
    config = yaml.safe_load(work.task("datalever_minerva_math").read_text())
    assert config["include"].endswith("minerva_math/minerva_math_algebra.yaml") and "fewshot_split" not in config


def test_gold_answers_lm_eval_cannot_read_are_refused():
    with pytest.raises(ValueError, match="1 gold responses lack '####'"):
        lmeval._documents([_gsm8k(1), Example("x", "Question: q\nAnswer:\n", "so 3")], lmeval.TASKS["gsm8k"], [])


def test_without_lm_eval_one_line_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ImportError, match=r"^lm-eval is not installed: pip install 'datalever\[lm-eval\]'$"):
        lmeval.run("model", "data.jsonl", tmp_path)


def test_the_command_refuses_before_any_work_without_lm_eval(tmp_path, monkeypatch, capsys):
    from datalever import cli

    data = tmp_path / "test.jsonl"
    save_examples(str(data), [_gsm8k(1)])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["lm-eval", "--data", str(data), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["datalever lm-eval: error: lm-eval: lm-eval is not installed: pip install 'datalever[lm-eval]'"]
    assert not (tmp_path / "out").exists()


def _experiment(tmp_path, **kw):
    from datalever.experiment import ExperimentConfig

    return ExperimentConfig(run_dir=str(tmp_path / "run"), **kw)


def test_the_experiment_refuses_lm_eval_settings_before_any_work(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^lm_eval: lm-eval is not installed: pip install 'datalever\[lm-eval\]'"):
        _experiment(tmp_path, lm_eval=True)
    assert not _experiment(tmp_path).lm_eval  # off by default: no lm-eval needed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match="lm_eval_fewshot is for lm_eval"):
        _experiment(tmp_path, lm_eval_fewshot={"test": "x.jsonl"})
    with pytest.raises(ConfigError, match=r"lm_eval_fewshot names \['gsm8k'\], which are not what the arms"):
        _experiment(tmp_path, lm_eval=True, lm_eval_fewshot={"gsm8k": "x.jsonl"})
    with pytest.raises(ConfigError, match="lm_eval_fewshot test: no such file"):
        _experiment(tmp_path, lm_eval=True, lm_eval_fewshot={"test": str(tmp_path / "missing.jsonl")})


def test_the_experiment_runs_lm_eval_after_its_own_evaluation(tmp_path, monkeypatch):
    from datalever.experiment import study
    from datalever.rundir import RunDir

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "lm_eval" else real(name, *a))
    shots = tmp_path / "shots.jsonl"
    save_examples(str(shots), [_gsm8k(7)])
    cfg = _experiment(tmp_path, lm_eval=True, lm_eval_fewshot={"test": str(shots)}, eval_limit=3, eval_batch_size=5)
    arm_dir = RunDir(cfg.run_dir).seed_dir("hard", 0)
    out = arm_dir.eval_on("test")
    rundir.write_json(out.metrics, {"accuracy": 0.5, "n": 3})  # datalever's evaluation, done
    calls = []
    monkeypatch.setattr(lmeval, "run", lambda *a, **kw: calls.append((a, kw)) or rundir.write_json(out.lm_eval, {}))
    assert not study.evaluated(cfg, arm_dir)  # lm-eval's JSON is part of a finished evaluation
    assert study.evaluate(cfg, arm_dir, {"test": "RUN/data/test.jsonl"}, "test") == {"accuracy": 0.5, "n": 3}
    (model, data, where), kw = calls[0]
    assert (model, data, where) == (str(arm_dir.train.model), "RUN/data/test.jsonl", out.root)
    assert kw["fewshot"] == str(shots) and kw["limit"] == 3 and kw["batch_size"] == 5 and kw["templates"] == []
    assert study.evaluated(cfg, arm_dir)
    study.evaluate(cfg, arm_dir, {"test": "RUN/data/test.jsonl"}, "test")
    assert len(calls) == 1  # done once


# ----------------------------------------------------------------------------- lm-eval itself (slow)


def _lm_eval_or_skip():
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'datalever[lm-eval]')")


def _ignoring(text: str) -> str:
    """gsm8k's exact_match normalization (lm-eval's metric options in gsm8k.yaml), by hand."""
    for pattern in (",", "\\$", "(?s).*#### ", "\\.$"):
        text = re.sub(pattern, "", text)
    return text.lower()


def _strict(generation: str) -> str:
    found = re.findall(r"#### (\-?[0-9\.\,]+)", generation)  # the first match
    return found[0].strip() if found else "[invalid]"


def _flexible(generation: str) -> str:
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", generation)  # the last match, its non-empty group
    return next(g for g in found[-1] if g).strip() if found else "[invalid]"


@pytest.mark.slow
def test_lm_eval_on_a_tiny_model_matches_its_own_extraction_by_hand(tmp_path):
    """gsm8k-style rows asked 5-shot from a local few-shot file: the accuracies lm-eval writes are its extraction
    on the generations it logged, computed here; then golds set to what the model wrote make them non-zero."""
    _lm_eval_or_skip()
    from datalever.models import resolve_model

    model = resolve_model("embedded:demo-base")  # the demo preset pretrained on arithmetic: it writes numbers
    shots = tmp_path / "shots.jsonl"
    save_examples(str(shots), [_gsm8k(10 + i) for i in range(5)])
    prompts = [_gsm8k(i, prompt=PROTOTYPE_TEMPLATE.format(instruction=f"What is {i} plus {i + 1}?")) for i in range(6)]
    data = tmp_path / "test.jsonl"
    save_examples(str(data), prompts)

    def run(out):
        found = lmeval.run(model, str(data), out, templates=[PROTOTYPE_TEMPLATE], fewshot=str(shots), max_gen_toks=24)
        samples = [json.loads(line) for line in rundir.EvalDir(out).lm_eval_work.samples.read_text().splitlines()]
        assert json.loads(rundir.EvalDir(out).lm_eval.read_text()) == found
        return found, samples

    found, samples = run(tmp_path / "first")
    assert found["task"] == "gsm8k" and found["num_fewshot"] == 5 and found["n"] == 6
    assert found["lm_eval_version"] and found["max_gen_toks"] == 24
    assert found["prompt"].endswith("Question: What is 0 plus 1?\nAnswer:")  # lm-eval's prompt, not the arm's
    assert found["prompt"].count("Question:") == 6  # five shots from the local file, then the question
    by_filter = {}
    for s in samples:
        generation, gold = s["resps"][0][0], s["doc"]["answer"]
        extract = _strict if s["filter"] == "strict-match" else _flexible
        assert s["filtered_resps"][0] == extract(generation)
        assert s["exact_match"] == float(_ignoring(extract(generation)) == _ignoring(gold))
        by_filter.setdefault(s["filter"], []).append(s["exact_match"])
    assert found["accuracy"] == {k: sum(v) / len(v) for k, v in by_filter.items()}
    assert set(found["accuracy"]) == {"strict-match", "flexible-extract"}

    # The same questions with the golds the model wrote for half of them (its flexible extraction).
    written = {s["doc"]["id"]: _flexible(s["resps"][0][0]) for s in samples if s["filter"] == "flexible-extract"}
    numbers = [i for i, ex in enumerate(prompts) if re.fullmatch(r"-?[0-9]+", written[ex.id])][:3]
    assert numbers, f"the model wrote no whole number: {written}"
    for i in numbers:
        prompts[i] = _gsm8k(i, prompt=prompts[i].prompt, answer=int(written[prompts[i].id]))
    save_examples(str(data), prompts)
    again, samples = run(tmp_path / "second")
    assert again["accuracy"]["flexible-extract"] == pytest.approx(len(numbers) / 6)
    assert [s["resps"] for s in samples] == [s["resps"] for s in run(tmp_path / "first")[1]]  # same generations


@pytest.mark.slow
def test_lm_eval_minerva_math_on_a_tiny_preset(tmp_path):
    _lm_eval_or_skip()
    if not importlib.util.find_spec("antlr4") or not __import__("importlib.metadata").metadata.version(
        "antlr4-python3-runtime"
    ).startswith("4.11"):
        pytest.skip("lm-eval's minerva_math needs antlr4-python3-runtime 4.11 (pip install 'datalever[lm-eval]')")
    rows = [
        Example(
            f"m{i}", f"Problem: What is ${i}/2$?\nSolution:\n", f"$\\frac{{{i}}}{{2}}$: \\boxed{{\\frac{{{i}}}{{2}}}}"
        )
        for i in (1, 3)
    ]
    data = tmp_path / "math.jsonl"
    save_examples(str(data), rows)
    from datalever import cli

    cli.main(["lm-eval", "--model", "preset:tiny", "--data", str(data), "--out", str(tmp_path), "--max_gen_toks", "8"])
    found = json.loads(rundir.EvalDir(tmp_path).lm_eval.read_text())
    assert found["task"] == "minerva_math" and found["kind"] == "math" and found["num_fewshot"] == 4
    assert found["prompt"].startswith("Problem:\nFind the domain") and found["prompt"].endswith(
        "What is $1/2$?\n\nSolution:"
    )
    samples = [json.loads(line) for line in rundir.EvalDir(tmp_path).lm_eval_work.samples.read_text().splitlines()]
    assert len(samples) == 2
    for name in ("exact_match", "math_verify"):
        assert found["accuracy"][name] == sum(s[name] for s in samples) / 2


@pytest.mark.slow
def test_the_experiment_reports_lm_eval_beside_datalever(tmp_path):
    """The quick embedded study with lm_eval: each arm's lm_eval.json, the report's table, and a rerun that runs
    nothing again."""
    _lm_eval_or_skip()
    from datalever import experiment
    from datalever.demo import shipped_config
    from datalever.rundir import RunDir

    cfg = shipped_config("quick")
    cfg.run_dir, cfg.seeds, cfg.arms, cfg.progress = str(tmp_path), [0], ["base", "hard"], False
    cfg.lm_eval, cfg.eval_limit = True, 6
    cfg = type(cfg)(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})  # checked as a user's config is
    text = experiment.run(cfg)
    outputs = [RunDir(tmp_path).seed_dir(arm, 0).eval.lm_eval for arm in cfg.arms]
    for path in outputs:
        found = json.loads(path.read_text())
        assert found["task"] == "gsm8k" and found["n"] == 6 and found["num_fewshot"] == 0
        assert all(0 <= v <= 1 for v in found["accuracy"].values())
    assert "| base | test |" in text and "gsm8k, 0-shot" in text and "Why the two can differ" in text
    stamps = [p.stat().st_mtime_ns for p in outputs]
    experiment.run(cfg)
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
