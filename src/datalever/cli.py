"""The command line: a thin layer over each stage's config dataclass and `run` function.

Every option comes from a dataclass field and its docstring, so `--help` documents all of them;
`--config FILE.yaml` loads values, and options given after it override them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import typing

import jsonargparse
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from datalever.checks import ConfigError
from datalever.preempt import REQUEUE_EXIT, Preempted, requeue_slurm_job
from datalever.usage import check_config_file, config_files, in_file, unknown_command, usage_error

jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

# command path -> (module, config class, run function, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str, str]] = {
    ("demo",): (
        "datalever.demo",
        "DemoConfig",
        "run",
        "Run the whole method on the embedded default data (the first thing to try).",
    ),
    ("data", "synth"): (
        "datalever.synth",
        "SynthConfig",
        "run_synth",
        "Generate the embedded math word-problem dataset (GSM8K format) with train/validation/test splits.",
    ),
    ("data", "check"): (
        "datalever.examples",
        "CheckConfig",
        "run_check",
        "Load a dataset file, detect its schema and report counts, sources and problems.",
    ),
    ("model", "build"): (
        "datalever.models",
        "ModelBuildConfig",
        "run_model_build",
        "Build a model preset from scratch as an HF checkpoint directory.",
    ),
    ("model", "pretrain"): (
        "datalever.pretrain",
        "PretrainConfig",
        "run",
        "Pretrain a preset on arithmetic and copy drills (how the embedded demo-base was made).",
    ),
    ("score",): (
        "datalever.losses",
        "ScoreConfig",
        "run",
        "Score every example's response loss under a model (the loss engine).",
    ),
    ("profile",): (
        "datalever.profile",
        "ProfileConfig",
        "run",
        "Train a proxy briefly and record every training example's loss trajectory.",
    ),
    ("split",): ("datalever.split", "SplitConfig", "run", "Cluster loss trajectories into easy and hard examples."),
    ("compare-splits",): (
        "datalever.split_compare",
        "CompareConfig",
        "run",
        "Compare the easy/hard splits several runs made of one training set (agreement, audit, divergence).",
    ),
    ("upsample",): (
        "datalever.upsample",
        "UpsampleConfig",
        "run",
        "Build one arm's training set (hard, easy, random or base) from the split.",
    ),
    ("train",): (
        "datalever.train",
        "TrainConfig",
        "run",
        "Fine-tune a causal LM (AdamW, Muon or SAM; full or LoRA) with the response-only loss.",
    ),
    ("eval",): (
        "datalever.evaluate",
        "EvalConfig",
        "run",
        "Greedy-decode answers and report exact-match accuracy overall, per source and per difficulty.",
    ),
    ("lm-eval",): (
        "datalever.lmeval",
        "LmEvalConfig",
        "run_command",
        "Evaluate a model with lm-evaluation-harness itself on a local test set, offline (gsm8k or minerva_math).",
    ),
    ("experiment",): (
        "datalever.experiment",
        "ExperimentConfig",
        "run",
        "Run every arm over every seed: profile, split, upsample, train, evaluate, report.",
    ),
    ("theory",): (
        "datalever.theory",
        "TheoryConfig",
        "run",
        "Simplicity bias of GD, SAM and reshaped data in multi-head linear attention.",
    ),
}


def _load(command: tuple[str, ...]):
    module, cls, fn, _ = COMMANDS[command]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, fn)


def _parser(**kwargs) -> ArgumentParser:
    """A parser that raises its errors (`main` says them in one line) instead of printing the usage text: `--help`
    is the place for that."""
    return ArgumentParser(exit_on_error=False, **kwargs)


def _subparser(config_cls, help_text: str) -> ArgumentParser:
    parser = _parser(description=(config_cls.__doc__ or help_text).strip())
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML file of option values; options after it override it."
    )
    parser.add_class_arguments(config_cls, nested_key=None, fail_untyped=True)
    return parser


def build_parser(only: tuple[str, ...] | None = None) -> ArgumentParser:
    """The parser; only the chosen command's module is imported (the others get a help line), so start-up is fast."""
    from datalever import __version__

    parser = _parser(
        prog="datalever", description="datalever: the training-data distribution as a lever on LLM fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"datalever {__version__}")
    top = parser.add_subcommands(dest="command")
    groups: dict[str, typing.Any] = {}
    # Level order: first all top-level names, then the second level (jsonargparse requires it).
    for path, (_, _, _, help_text) in COMMANDS.items():
        if len(path) == 1:
            sub = _subparser(_load(path)[0], help_text) if only == path else _parser(description=help_text)
            top.add_subcommand(path[0], sub, help=help_text)
        elif path[0] not in groups:
            group = _parser(description=f"`{path[0]}` commands.")
            top.add_subcommand(
                path[0], group, help=f"{path[0]} commands: " + ", ".join(p[1] for p in COMMANDS if p[0] == path[0])
            )
            groups[path[0]] = group
    for name, group in groups.items():
        subs = group.add_subcommands(dest="command")
        for path, (_, _, _, help_text) in COMMANDS.items():
            if len(path) == 2 and path[0] == name:
                sub = _subparser(_load(path)[0], help_text) if only == path else _parser(description=help_text)
                subs.add_subcommand(path[1], sub, help=help_text)
    return parser


def _to_dataclass(cls, values: dict):
    """Build a (possibly nested) config dataclass from parsed values: nested configs and lists of
    them (e.g. an experiment's extra_arms) arrive as dicts."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f.name if f.name in values else "\u200b" + f.name  # jsonargparse escapes names like `keys`
        if key in values:
            kwargs[f.name] = _to_value(hints[f.name], values[key])
    return cls(**kwargs)


def _to_value(hint, value):
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _to_dataclass(hint, value)
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
    if dataclasses.is_dataclass(item) and isinstance(value, list):
        return [_to_dataclass(item, v) if isinstance(v, dict) else v for v in value]
    return value


def read_config(config_cls, path: str | os.PathLike):
    """A config dataclass from a YAML file, read exactly as `--config FILE` reads it on the command line; a file that
    is not valid YAML, or names an option the config does not have, is a ConfigError of one line."""
    check_config_file(config_cls, str(path))
    try:
        values = _subparser(config_cls, "").parse_args(["--config", str(path)]).as_dict()
    except ArgumentError as e:
        raise ConfigError(f"{path}: {usage_error(config_cls, e)}") from None
    values.pop("config", None)
    return _to_dataclass(config_cls, values)


def _command_path(argv: list[str]) -> tuple[str, ...] | None:
    words = [a for a in argv if not a.startswith("-")]
    for n in (2, 1):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return None


def _quiet_libraries() -> None:
    """Keep the console for our own progress bars: no per-shard bars or hub chatter from HF libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    path = _command_path(argv)
    parser = build_parser(only=path)
    config_cls = _load(path)[0] if path else None
    try:
        if config_cls is not None and not {"-h", "--help"} & set(argv):
            for file in config_files(argv):
                check_config_file(config_cls, file)
        ns = parser.parse_args(argv)
    except ConfigError as e:
        _usage_exit(path, str(e))
    except ArgumentError as e:
        _usage_exit(
            path, unknown_command(argv, COMMANDS) if path is None else in_file(argv, usage_error(config_cls, e))
        )
    node = ns
    for name in path or ():
        node = node[name]
    if path is None:
        parser.print_help()
        return
    config_cls, run = _load(path)
    values = {k: v for k, v in node.as_dict().items() if k != "config"}
    try:
        config = _to_dataclass(config_cls, values)  # checks every option before any work starts
        _warn_if_busy()
        result = run(config)
    except Preempted as stopped:
        exit_preempted(path, stopped)
    except (ValueError, OSError, RuntimeError) as e:
        # Bad input or a refused run: the message names the file, line and problem; a traceback
        # would only bury it. DATALEVER_DEBUG=1 shows the traceback.
        if os.environ.get("DATALEVER_DEBUG"):
            raise
        print(f"datalever {' '.join(path)}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(result if isinstance(result, str) else summary_line(path, config, result))
    _leave_process_group()


def _usage_exit(path: tuple[str, ...] | None, message: str) -> typing.NoReturn:
    """A command line that cannot be read: one line and exit status 2 (as argparse), `--help` for the usage."""
    command = f"datalever {' '.join(path)}" if path else "datalever"
    print(f"{command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def exit_preempted(path: tuple[str, ...], stopped: Preempted) -> typing.NoReturn:
    """One line for a run stopped on a signal with its state saved, a requeue where the job must ask for it
    itself, and the exit status that means "run me again"."""
    requeued = stopped.warning and requeue_slurm_job()
    then = "SLURM requeues the job" if requeued else "rerun the same command to continue from there"
    print(f"datalever {' '.join(path)}: {stopped}; {then}", file=sys.stderr)
    sys.exit(REQUEUE_EXIT)


def summary_line(path: tuple[str, ...], config, result: dict) -> str:
    """What a stage that returns a dict did, and where its outputs are, in one line."""
    from datalever.rundir import EvalDir, RunDir, SplitDir, TrainDir

    command = path[0]
    if command == "train":
        where = TrainDir(config.out)
        return (
            f"trained {result['steps']} steps in {result['compute']['wall_s']:.0f} s, final loss "
            f"{result['final_train_loss']:.4f}; model: {where.model}, log: {where.log}"
        )
    if command == "eval":
        return (
            f"accuracy {result['accuracy']:.1%} on {result['n']} examples ({result['n_no_answer']} without an "
            f"answer, {result['n_no_marker']} without an answer marker); {EvalDir(config.out).metrics}"
        )
    if command == "profile":
        store = RunDir(config.run_dir).trajectories
        return f"{result['n_examples']} examples, losses recorded at steps {result['steps']}; {store}"
    if command == "split":
        where = SplitDir(config.out) if config.out else RunDir(config.run_dir).split()
        warnings = "".join(f"; warning: {w}" for w in result.get("audit_warnings", []))
        return (
            f"{result['n_hard']} hard and {result['n_easy']} easy examples "
            f"({result['n_flagged_excluded']} flagged, left out); {where.split}, audit: {where.audit}{warnings}"
        )
    if command == "upsample":
        where = config.out or RunDir(config.run_dir).arm(config.distribution).root
        return (
            f"{result['distribution']} distribution: {result['n_rows']} training rows ({result['n_unique']} distinct, "
            f"{result['n_extra_copies']} extra copies); {where}"
        )
    return f"done; outputs in {getattr(config, 'out', None) or getattr(config, 'run_dir', '.')}"


def _warn_if_busy() -> None:
    """Say so when other work already keeps every core busy: two torch processes sharing two cores ran 12x
    slower. The thread count is not changed behind the user's back: on a CPU it decides the numbers too."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores:
        print(
            f"datalever: warning: the machine is busy (load {load:.1f} on {cores} cores): this run may be several "
            "times slower; run alone, or give each process its share of threads (OMP_NUM_THREADS)",
            file=sys.stderr,
        )


def _leave_process_group() -> None:
    """Under torchrun, leave the process group explicitly: gloo torn down at interpreter exit can abort."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
