"""The command line: every command's --help documents every option; bad input is a clean error."""

import dataclasses
import json
import typing

import pytest

from datalever import cli


def _options(cls, prefix=""):
    """(flag, docstring present) for every field of a config dataclass, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _options(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("path", sorted(cli.COMMANDS), ids=lambda p: " ".join(p))
def test_help_documents_every_option(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*path, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    config_cls, _ = cli._load(path)
    for option in _options(config_cls):
        assert f"--{option} " in text or f"--{option}\n" in text, f"{option} missing from `{' '.join(path)} --help`"


def test_every_field_has_a_docstring():
    """jsonargparse reads attribute docstrings; a field without one shows up in --help undocumented."""
    import ast
    import inspect

    for path in cli.COMMANDS:
        config_cls, _ = cli._load(path)
        seen = [config_cls]
        while seen:
            cls = seen.pop()
            tree = ast.parse(inspect.getsource(cls))
            body = tree.body[0].body
            for i, node in enumerate(body):
                if isinstance(node, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    assert isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant), (
                        f"{cls.__name__}.{node.target.id} has no docstring"
                    )
            hints = typing.get_type_hints(cls)
            seen += [t for t in hints.values() if dataclasses.is_dataclass(t)]


def test_bad_input_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?" "answer": "x"}\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "check", "--data", str(bad)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2: malformed JSON" in err and "Traceback" not in err


def refused(argv: list[str], capsys) -> str:
    """What the command line says when it refuses `argv`: exactly one line on stderr, exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err.rstrip("\n")


NOT_YAML = "n_train: [1, 2\nseed: 3\n"  # the list is never closed: YAML finds out at line 2, column 5 (the ':')


@pytest.mark.parametrize("command", [["data", "synth"], ["train"], ["experiment"]], ids=" ".join)
def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, capsys, command):
    """Once the whole usage text (49 lines), then the parser's message about "<unicode string>"."""
    config = tmp_path / "c.yaml"
    config.write_text(NOT_YAML)
    assert refused([*command, "--config", str(config)], capsys) == (
        f"datalever {' '.join(command)}: error: {config}: not valid YAML: line 2, column 5: expected ',' or ']', but "
        "got ':' (while parsing a flow sequence at line 1)"
    )


# A config file's mistake, and what is said about it (after "FILE: "), by hand: the line, the option as written (with
# its scope), and the closest option of that scope, by spelling or by another trainer's name for it.
BAD_KEYS = [
    (["data", "synth"], "n_train: 3\nnonsense_key: 1\n", "line 2: unknown option 'nonsense_key'"),
    (
        ["data", "synth"],
        "n_train: 3\nseed: 1\nn_trian: 4\n",
        "line 3: unknown option 'n_trian' (did you mean 'n_train'?)",
    ),
    (["train"], "optim.lrr: 1.0e-4\n", "line 1: unknown option 'optim.lrr' (did you mean 'optim.lr'?)"),
    (
        ["train"],
        "optim:\n  lr: 1.0e-4\n  wieght_decay: 0.1\n",
        "line 3: unknown option 'optim.wieght_decay' (did you mean 'optim.weight_decay'?)",
    ),
    (
        ["train"],
        "epochs: 1\nseed: 1\nepochs: 2\n",
        "line 3: option 'epochs' given twice (also at line 1; YAML keeps the last)",
    ),
    (
        ["experiment"],
        "arms: [base]\ntrain:\n  epochs: 2\n  lerning_rate: 1.0e-4\n",
        "line 4: unknown option 'train.lerning_rate' (did you mean 'train.optim.lr'?)",
    ),
    (["experiment"], "arms: [base]\nseds: [1, 2]\n", "line 2: unknown option 'seds' (did you mean 'seeds'?)"),
    (
        ["experiment"],
        "extra_arms:\n  - {name: x, dta: hard}\n",
        "line 2: unknown option 'extra_arms[].dta' (did you mean 'extra_arms[].data'?)",
    ),
    # Once tracebacks, when the config was built or the run began ('NoneType' object is not subscriptable, ...).
    (
        ["train"],
        "optim: null\n",
        "line 1: option 'optim' holds options of its own (optim: {OPTION: VALUE}, or optim.OPTION: VALUE), got 'null'",
    ),
    (
        ["experiment"],
        "arms: [base]\ntrain: 3\n",
        "line 2: option 'train' holds options of its own (train: {OPTION: VALUE}, or train.OPTION: VALUE), got '3'",
    ),
    (["experiment"], "extra_arms:\n  - 3\n", "line 2: each item of 'extra_arms' holds options, got '3'"),
    (["profile"], "- fraction: 0.5\n", "expected `option: value` lines, got a list"),
    (["profile"], "# nothing yet\n", "no `option: value` lines in it (empty, or comments only)"),
]


@pytest.mark.parametrize(
    "command, text, said", BAD_KEYS, ids=[f"{' '.join(c)}-{i}" for i, (c, _, _) in enumerate(BAD_KEYS)]
)
def test_a_config_file_with_an_unknown_key_names_it_and_the_closest_option(tmp_path, capsys, command, text, said):
    """Once the usage text (46 lines), then "does not accept option 'nonsense_key'"; a key given twice, silently the
    last."""
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert (
        refused([*command, "--config", str(config)], capsys)
        == f"datalever {' '.join(command)}: error: {config}: {said}"
    )


def test_read_config_refuses_what_the_command_line_refuses(tmp_path):
    """An experiment's YAML read by a worker or the demo (`read_config`): the same one line, as a ConfigError."""
    from datalever import experiment
    from datalever.checks import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as error:
        cli.read_config(experiment.ExperimentConfig, config)
    assert str(error.value) == f"{config}: line 2: unknown option 'train.optim.lrr' (did you mean 'train.optim.lr'?)"
    config.write_text(NOT_YAML)
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: line 2, column 5: "):
        cli.read_config(experiment.ExperimentConfig, config)


MISTYPED = [
    (
        ["train", "--lerning_rate", "3"],
        "datalever train: error: unknown option --lerning_rate (did you mean --optim.lr?)",
    ),
    (["train", "--optim.lrr", "3"], "datalever train: error: unknown option --optim.lrr (did you mean --optim.lr?)"),
    (
        ["data", "synth", "--n_trian", "3"],
        "datalever data synth: error: unknown option --n_trian (did you mean --n_train?)",
    ),
    (
        ["upsample", "--arm", "hard"],  # upsample's option before it was named apart from the experiment's arms
        "datalever upsample: error: unknown option --arm (did you mean --distribution?)",
    ),
    (["train", "--max_steps", "abc"], "datalever train: error: max_steps: expected an integer or null, got 'abc'"),
    (["train", "--progress", "maybe"], "datalever train: error: progress: expected true or false, got 'maybe'"),
    (["train", "extra"], "datalever train: error: unexpected argument 'extra' (options are given as --name value)"),
    (["trian"], "datalever: error: unknown command 'trian' (did you mean 'train'?)"),
    (["data", "chek"], "datalever: error: unknown command 'data chek' (did you mean 'data check'?)"),
    (["data"], "datalever: error: data needs a command: synth, check"),
]


@pytest.mark.parametrize("argv, said", MISTYPED, ids=[" ".join(a) for a, _ in MISTYPED])
def test_a_mistyped_command_line_is_one_line(capsys, argv, said):
    assert refused(argv, capsys) == said


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: fast\n")
    assert refused(["train", "--config", str(config)], capsys) == (
        f"datalever train: error: {config}: optim.lr: expected a number, got 'fast'"
    )


def test_config_file_then_override(tmp_path):
    """--config loads values; options given after it override them."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_train: 7\nn_val: 3\nn_test: 2\nseed: 5\n")
    out = tmp_path / "data"
    cli.main(["data", "synth", "--config", str(cfg), "--n_train", "9", "--out", str(out)])
    assert len((out / "train.jsonl").read_text().splitlines()) == 9
    assert len((out / "validation.jsonl").read_text().splitlines()) == 3
    assert "seed: 5" in (out / "synth.config.yaml").read_text()


def test_version(capsys):
    from datalever import __version__

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"datalever {__version__}"


def test_a_busy_machine_is_named_before_the_work_starts(tmp_path, monkeypatch, capsys):
    """Two processes on two cores once ran 12x slower without a word."""
    cores = len(cli.os.sched_getaffinity(0))
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    cli.main(["data", "synth", "--out", str(tmp_path), "--n_train", "2", "--n_val", "1", "--n_test", "1"])
    assert f"the machine is busy (load {cores + 0.5:.1f} on {cores} cores)" in capsys.readouterr().err
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (cores - 1.0, 0.0, 0.0))
    cli.main(["data", "synth", "--out", str(tmp_path), "--n_train", "2", "--n_val", "1", "--n_test", "1"])
    assert "busy" not in capsys.readouterr().err


def test_every_stage_says_what_it_did_and_where_in_one_line(tmp_path, capsys):
    """train, eval, profile, split and upsample once printed nothing on success."""
    run, data = tmp_path / "run", tmp_path / "run" / "data"

    def last_line(*argv):
        quiet = ["--progress", "false"] if argv[0] in ("profile", "train", "eval") else []
        cli.main([*argv, *quiet])
        lines = capsys.readouterr().out.strip().splitlines()
        return lines[-1]

    last_line("data", "synth", "--out", str(data), "--n_train", "24", "--n_val", "4", "--n_test", "4")
    line = last_line(
        "profile",
        "--run_dir",
        str(run),
        "--proxy",
        "preset:tiny",
        "--fraction",
        "1",
        "--checkpoints",
        "2",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "8",
    )
    assert line == f"24 examples, losses recorded at steps [2, 3]; {run / 'trajectories.parquet'}"
    line = last_line("split", "--run_dir", str(run))
    summary = json.loads((run / "split_summary.json").read_text())
    warnings = "".join(f"; warning: {w}" for w in summary["audit_warnings"])
    assert (
        line == f"{summary['n_hard']} hard and {summary['n_easy']} easy examples (0 flagged, left out); "
        f"{run / 'split.parquet'}, audit: {run / 'split_audit.json'}{warnings}"
    )
    line = last_line("upsample", "--run_dir", str(run), "--distribution", "hard")
    assert line.startswith(
        f"hard distribution: {24 + summary['n_hard']} training rows (24 distinct, {summary['n_hard']} extra"
    )
    train_out = tmp_path / "train"
    line = last_line(
        "train",
        "--model",
        "preset:tiny",
        "--data",
        str(data / "train.jsonl"),
        "--out",
        str(train_out),
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--micro_batch_size",
        "8",
    )
    final = json.loads((train_out / "train_summary.json").read_text())["final_train_loss"]
    assert line.startswith("trained 2 steps in ") and f"final loss {final:.4f}; model: {train_out / 'model'}" in line
    line = last_line(
        "eval",
        "--model",
        str(train_out / "model"),
        "--data",
        str(data / "test.jsonl"),
        "--out",
        str(tmp_path / "eval"),
        "--max_new_tokens",
        "4",
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert line.startswith(f"accuracy {metrics['accuracy']:.1%} on 4 examples")


def test_a_config_that_is_missing_or_a_directory_is_one_line(tmp_path, capsys):
    assert refused(["train", "--config", str(tmp_path / "no.yaml")], capsys) == (
        f"datalever train: error: --config {tmp_path / 'no.yaml'}: no such file"
    )
    assert refused(["train", "--config", str(tmp_path)], capsys) == (
        f"datalever train: error: --config {tmp_path}: a directory, not a YAML file"
    )
