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
