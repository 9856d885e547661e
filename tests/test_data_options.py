"""Data options on every command that reads data: schema, fields, template and split, a DatasetDict with several
splits in every stage, and an experiment that reads the given data once into RUN/data and evaluates on several
test sets (a column each in the report)."""

import dataclasses
import json
from pathlib import Path

import pytest

from datalever import cli, experiment, provenance, synth
from datalever.checks import ConfigError
from datalever.demo import shipped_config
from datalever.examples import DataFormat, content_id, load_examples, read_data, save_examples
from datalever.synth import generate

# The embedded generator's problems under other column names, so only --fields makes them readable.
FIELDS = {"question": "problem_text", "answer": "worked_answer"}


def _rows(n, seed):
    return [
        {"problem_text": r["question"], "worked_answer": r["answer"], "level": r["level"]} for r in generate(n, seed)
    ]


@pytest.fixture(scope="module")
def dataset_dict(tmp_path_factory):
    """A `save_to_disk` DatasetDict with train, validation and test splits (disjoint problems)."""
    import datasets

    rows = _rows(80, seed=3)
    unique = list({r["problem_text"]: r for r in rows}.values())
    parts = {"train": unique[:48], "validation": unique[48:56], "test": unique[56:64]}
    path = tmp_path_factory.mktemp("dd") / "dd"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(str(path))
    return str(path), parts


def _ids(rows):
    return [content_id(r["problem_text"], r["worked_answer"]) for r in rows]


def test_each_role_reads_its_own_split_and_the_mapping_applies(dataset_dict):
    path, parts = dataset_dict
    fmt = DataFormat(fields=FIELDS)
    for split, role in (("train", "train"), ("validation", "validation"), ("test", "test")):
        examples = read_data(path, fmt, default_split=role)
        assert [ex.id for ex in examples] == _ids(parts[split])
        assert examples[0].prompt == f"Question: {parts[split][0]['problem_text']}\nAnswer:\n"
    # An explicit split wins over the role's.
    assert [ex.id for ex in read_data(path, fmt, split="test", default_split="train")] == _ids(parts["test"])


def test_a_template_renders_the_prompt_and_leaves_the_ids(dataset_dict):
    path, parts = dataset_dict
    plain = read_data(path, DataFormat(fields=FIELDS), split="test")
    templated = read_data(path, DataFormat(fields=FIELDS, template="Q: {question} (level {level})\nA:\n"), split="test")
    assert [ex.id for ex in templated] == [ex.id for ex in plain]
    row = parts["test"][0]
    assert templated[0].prompt == f"Q: {row['problem_text']} (level {row['level']})\nA:\n"


def test_errors_name_the_option_that_fixes_them(dataset_dict, capsys):
    path, _ = dataset_dict
    with pytest.raises(SystemExit):
        cli.main(["data", "check", "--data", path])
    err = capsys.readouterr().err
    assert "holds the splits ['train', 'validation', 'test']; choose one with --split" in err
    with pytest.raises(SystemExit):
        cli.main(["data", "check", "--data", path, "--split", "test"])
    assert "--fields" in capsys.readouterr().err  # the columns match no schema
    cli.main(["data", "check", "--data", path, "--split", "test", "--fields", json.dumps(FIELDS)])
    assert "8 examples" in capsys.readouterr().out


def test_data_check_takes_a_schema(tmp_path, capsys):
    """prompt and response columns plus an id column read as datalever's own file by default; --schema says
    otherwise only for files datalever did not write (an id column of the user's is kept as metadata)."""
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$."}) + "\n")
    cli.main(["data", "check", "--data", str(path), "--schema", "math"])
    out = capsys.readouterr().out
    assert "1 examples" in out and "schema: math (given; columns: problem, solution)" in out
    cli.main(["data", "check", "--data", str(path)])
    assert "schema: math (detected; columns: problem, solution)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["data", "check", "--data", str(path), "--schema", "gsm8k"])
    assert "missing field 'question'" in capsys.readouterr().err


def test_data_check_tells_a_users_id_prompt_response_file_from_datalevers_own(tmp_path, capsys):
    """id/prompt/response columns are datalever's own schema; only a file with datalever's written columns is
    "written by datalever" (read as written), and conversational prompt/completion is read as messages."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"id": "a", "prompt": "Q?", "response": "4"}) + "\n")
    cli.main(["data", "check", "--data", str(mine)])
    out = capsys.readouterr().out
    assert "schema: datalever (detected; columns: id, prompt, response)" in out and "written by" not in out
    written = tmp_path / "written.jsonl"
    save_examples(str(written), load_examples(str(mine)))
    cli.main(["data", "check", "--data", str(written)])
    assert "schema: datalever (written by datalever: read as written; columns: id, prompt" in capsys.readouterr().out
    chat = tmp_path / "chat.jsonl"
    turns = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "4"}]}
    chat.write_text(json.dumps(turns) + "\n")
    cli.main(["data", "check", "--data", str(chat)])
    out = capsys.readouterr().out
    assert "schema: prompt_completion (detected; conversational: read as messages; columns: prompt, completion)" in out


def test_score_train_and_eval_read_a_dataset_dict_from_the_command_line(dataset_dict, tmp_path):
    path, parts = dataset_dict
    fields = json.dumps(FIELDS)
    scores = tmp_path / "scores.parquet"
    cli.main(["score", "--model", "preset:tiny", "--data", path, "--split", "validation", "--fields", fields,
              "--out", str(scores)])  # fmt: skip
    import pyarrow.parquet as pq

    assert pq.read_table(scores).column("id").to_pylist() == _ids(parts["validation"])
    out = tmp_path / "train"
    cli.main(["train", "--model", "preset:tiny", "--data", path, "--val_data", path, "--fields", fields,
              "--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "8", "--out", str(out),
              "--progress", "false"])  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["examples"] == len(parts["train"])  # the train split, by the role's default
    assert summary["final_val_loss"] is not None  # the validation split
    ev = tmp_path / "eval"
    cli.main(["eval", "--model", str(out / "model"), "--data", path, "--fields", fields, "--out", str(ev),
              "--max_new_tokens", "4", "--progress", "false"])  # fmt: skip
    predictions = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == _ids(parts["test"])  # the test split, by the role's default


def test_options_that_name_the_users_inputs_have_no_defaults(capsys):
    for command in (["score"], ["eval"], ["train"], ["data", "check"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--model", "preset:tiny"] if command != ["data", "check"] else command)
        assert "data is required" in capsys.readouterr().err, command


# ----------------------------------------------------------------------------- the experiment


def _experiment(run_dir, **changes):
    cfg = shipped_config("quick")
    cfg.run_dir, cfg.seeds, cfg.arms, cfg.progress = str(run_dir), [0], ["base", "hard"], False
    return dataclasses.replace(cfg, **changes)


def test_experiment_reads_the_data_once_and_reports_each_test_set(dataset_dict, tmp_path):
    path, parts = dataset_dict
    extra = tmp_path / "extra.jsonl"
    rows = [r for r in _rows(40, seed=11) if r["problem_text"] not in {x["problem_text"] for p in parts.values()
                                                                        for x in p}][:6]  # fmt: skip
    extra.write_text("".join(json.dumps({"question": r["problem_text"], "answer": r["worked_answer"]}) + "\n"
                             for r in rows))  # fmt: skip
    run = tmp_path / "run"
    cfg = _experiment(
        run, train_file=path, val_file=path, test_files={"held": path, "extra": str(extra)}, fields=FIELDS
    )
    experiment.run(cfg)
    data = run / "data"
    # Each source once, as datalever files, with its own split; the test sets are read with their own schema.
    assert [ex.id for ex in load_examples(str(data / "train.jsonl"))] == _ids(parts["train"])
    assert [ex.id for ex in load_examples(str(data / "validation.jsonl"))] == _ids(parts["validation"])
    assert [ex.id for ex in load_examples(str(data / "test-held.jsonl"))] == _ids(parts["test"])
    assert len(load_examples(str(data / "test-extra.jsonl"))) == len(rows)
    results = json.loads((run / "results.json").read_text())
    assert results["benchmarks"] == ["held", "extra"]
    for arm in ("base", "hard"):
        seed_dir = run / "arms" / arm / "seed0"
        for name, n in (("held", len(parts["test"])), ("extra", len(rows))):
            metrics = json.loads((seed_dir / f"eval-{name}" / "metrics.json").read_text())
            assert metrics["n"] == n
            assert results["arms"][arm]["benchmarks"][name]["per_seed"]["0"] == metrics["accuracy"]
        held = json.loads((seed_dir / "eval-held" / "metrics.json").read_text())
        assert results["arms"][arm]["accuracy"]["per_seed"]["0"] == held["accuracy"]  # the first decides
    markdown = (run / "results.md").read_text()
    assert "held acc % (mean ± 95% CI)" in markdown and "extra acc % (mean ± 95% CI)" in markdown
    assert "hard - base" in results["paired_by_benchmark"]["extra"]


def test_experiment_refuses_data_options_given_to_a_stage(tmp_path):
    cfg = _experiment(tmp_path)
    cfg.train.schema = "gsm8k"
    with pytest.raises(ValueError, match="train.schema is set by the experiment; give the experiment's own --schema"):
        experiment.ExperimentConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def test_experiment_keeps_the_users_data_out_of_its_data_directory(tmp_path):
    """RUN/data is the experiment's: `--overwrite` removes what it wrote there."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    mine = run / "data" / "mine.jsonl"
    mine.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "2\n#### 2"}) + "\n")
    with pytest.raises(ValueError, match="keep your data elsewhere"):
        experiment.data.data_files(_experiment(run, train_file=str(mine), test_file=str(mine), allow_overlap=True))
    assert Path(mine).exists()


def test_progress_bars_say_what_they_belong_to():
    from datalever import progress

    assert progress.label("train adamw") == "train adamw"
    with progress.context("hard seed1"):
        assert progress.label("train adamw") == "hard seed1 | train adamw"
        with progress.context("eval gsm8k"):
            assert progress.label("generate") == "hard seed1 eval gsm8k | generate"
    assert progress.label("generate") == "generate"


def test_conversational_prompt_completion_is_a_conversation(tmp_path):
    """TRL's conversational prompt/completion: the prompt's turns, then the completion's."""
    path = tmp_path / "conv.jsonl"
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    path.write_text(json.dumps(record) + "\n")
    (ex,) = load_examples(str(path))
    assert ex.messages == (("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "4"))
    assert ex.prompt == "System: Be brief.\nUser: What is 2+2?\nAssistant:\n" and ex.response == "4"


def test_a_question_copied_into_another_format_is_found_as_overlap():
    """A GSM8K test question inside Alpaca-format training data: different ids, different rendered prompts."""
    from datalever.examples import Example, find_overlap

    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    train = [Example("a", f"### Instruction:\n{question}\n\n### Response:\n", "7")]
    test = [Example("b", f"Question: {question.upper()}\nAnswer:\n", "#### 7")]
    (overlap,) = find_overlap({"train": train, "test": test})
    assert (overlap.same_id, overlap.same_prompt) == (0, 1)
    other = [Example("c", "Question: Something else entirely?\nAnswer:\n", "#### 1")]
    assert find_overlap({"train": train, "test": other}) == []


def test_test_templates_ask_a_test_set_as_the_training_data_was(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 plus 2?", "answer": "2+2=4\n#### 4"}) + "\n")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"instruction": "What is 3 plus 3?", "output": "6"}) + "\n")
    template = "### Instruction:\n{question}\n\n### Response:\n"
    cfg = _experiment(tmp_path / "run", train_file=str(train), test_files={"gsm8k": str(gsm)},
                      test_templates={"gsm8k": template})  # fmt: skip
    files = experiment.data.data_files(cfg)
    (ex,) = load_examples(files["test-gsm8k"])
    assert ex.prompt == "### Instruction:\nWhat is 2 plus 2?\n\n### Response:\n"
    with pytest.raises(ValueError, match=r"test_templates names \['math'\], which are not test sets"):
        _experiment(tmp_path / "run", train_file=str(train), test_files={"gsm8k": str(gsm)},
                    test_templates={"math": template})  # fmt: skip


def test_a_users_id_prompt_response_file_takes_the_template(tmp_path):
    """Only the exact columns datalever writes (with source and meta) are read as written."""
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "a1", "prompt": "2+2?", "response": "4"}) + "\n")
    (ex,) = load_examples(str(path), schema="prompt_response", template="Q: {prompt}\nA:\n")
    assert ex.prompt == "Q: 2+2?\nA:\n"


def test_errors_name_the_split_option_of_the_source(dataset_dict, tmp_path):
    path, _ = dataset_dict
    with pytest.raises(ValueError, match="has no split 'dev'.*--val_split"):
        read_data(path, DataFormat(fields=FIELDS), split="dev", split_option="--val_split")


def test_empty_messages_are_a_data_error_naming_the_line(tmp_path):
    from datalever.examples import DataError

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": None}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'messages' is empty"):
        load_examples(str(path), schema="messages")


def test_reserved_test_set_names_and_foreign_files_in_the_data_directory_are_refused(tmp_path):
    from datalever.examples import save_examples

    data = tmp_path / "other.jsonl"
    data.write_text(json.dumps({"question": "What is 1 plus 1?", "answer": "2\n#### 2"}) + "\n")
    with pytest.raises(ValueError, match="other than train and validation"):
        _experiment(tmp_path / "run", train_file=str(data), test_files={"validation": str(data)})
    # A datalever-format file the user put at RUN/data/train.jsonl is not the experiment's own: refused.
    run = tmp_path / "run2"
    (run / "data").mkdir(parents=True)
    save_examples(str(run / "data" / "train.jsonl"), load_examples(str(data)))
    cfg = _experiment(run, train_file=str(run / "data" / "train.jsonl"), test_file=str(data), allow_overlap=True)
    with pytest.raises(ValueError, match="keep your data elsewhere"):
        experiment.data.data_files(cfg)


def test_a_sweep_can_grow_in_the_same_run_directory(tmp_path):

    cfg = _experiment(tmp_path, sweep={"m": [1, 2]})
    provenance.record(tmp_path, "experiment", cfg)
    experiment.study.check_same_settings(_experiment(tmp_path, sweep={"m": [1, 2, 4]}))  # not refused


def test_profile_split_and_upsample_read_a_dataset_dict_from_the_command_line(dataset_dict, tmp_path):
    import pyarrow.parquet as pq

    path, parts = dataset_dict
    fields, run = json.dumps(FIELDS), tmp_path / "run"
    data = ["--data", path, "--fields", fields]
    proxy = ["--proxy", "preset:tiny", "--fraction", "1.0", "--checkpoints", "2", "--batch_size", "16"]
    cli.main(["profile", "--run_dir", str(run), *data, *proxy, "--micro_batch_size", "16", "--progress", "false"])
    assert pq.read_table(run / "trajectories.parquet").column("id").to_pylist() == _ids(parts["train"])
    cli.main(["split", "--run_dir", str(run), *data])
    audit = json.loads((run / "split_audit.json").read_text())
    assert "level" in json.dumps(audit)  # the difficulty column, read from the DatasetDict's train split
    cli.main(["upsample", "--run_dir", str(run), "--distribution", "hard", *data])
    n_hard = json.loads((run / "split_summary.json").read_text())["n_hard"]
    manifest = json.loads((run / "arms" / "hard" / "manifest.json").read_text())
    assert manifest["n_rows"] == len(parts["train"]) + n_hard


def test_a_validation_share_is_held_out_as_datasets_shuffle_orders_it(tmp_path):
    """The prototype's hold-out: `dataset.shuffle(seed=42)`, the first 95% trained on. The reference is `datasets`
    itself."""
    import datasets

    from datalever.experiment.data import hold_out

    rows = list(range(101))
    kept, held = hold_out(rows, 0.05, 42)
    shuffled = datasets.Dataset.from_dict({"i": rows}).shuffle(seed=42)["i"]
    n_kept = int(101 * 0.95)
    assert kept == shuffled[:n_kept] and held == shuffled[n_kept:]


def test_an_experiment_holds_out_validation_examples_from_its_training_file(tmp_path):
    train = tmp_path / "train.jsonl"
    synth.write_splits(str(tmp_path), n_train=40, n_val=4, n_test=8, seed=0)
    cfg = _experiment(tmp_path / "run", train_file=str(train), test_file=str(tmp_path / "test.jsonl"), val_holdout=0.25)
    files = experiment.data.data_files(cfg)
    kept, held = load_examples(files["train"]), load_examples(files["validation"])
    everything = {ex.id for ex in load_examples(str(train))}
    assert len(kept) == 30 and len(held) == 10 and {e.id for e in kept} | {e.id for e in held} == everything
    assert not {e.id for e in kept} & {e.id for e in held}
    with pytest.raises(ConfigError, match="give val_file or val_holdout, not both"):
        _experiment(tmp_path / "run2", train_file=str(train), val_file=str(train), val_holdout=0.1)
    with pytest.raises(ConfigError, match="val_holdout is a share of train_file below 1"):
        _experiment(tmp_path / "run2", train_file=str(train), val_holdout=1.0)
