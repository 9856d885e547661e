"""What the command line says when it cannot read what it was given, in one line (`--help` is the place for the usage
text): a `--config` file that is not YAML (the line and column), names an option the command does not have (with
the closest one: by spelling, or by another trainer's name for it) or names one twice; and the parser's own errors
(an unknown flag, a value of the wrong type, an unknown command) condensed from its several lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml
from jsonargparse import ArgumentError

from datalever.checks import ConfigError


def config_files(argv: list[str]) -> list[str]:
    """The files that `--config FILE` (or `--config=FILE`) names, in order."""
    files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    files += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    return files


# What other trainers call an option (Hugging Face's Trainer, TRL), or an earlier datalever did, for "did you mean": a
# name nobody misspelled.
OTHER_NAMES = {
    "arm": "distribution",  # upsample's, before this session (an experiment's arm is a whole recipe)
    "learning_rate": "optim.lr",
    "num_train_epochs": "epochs",
    "weight_decay": "optim.weight_decay",
    "optimizer": "optim.name",
    "per_device_train_batch_size": "micro_batch_size",
    "max_seq_length": "max_length",
    "output_dir": "out",
    "model_name_or_path": "model",
}


def check_config_file(config_cls, path: str) -> None:
    """A `--config` file that can be read: it exists, is YAML, holds `option: value` lines, and names only options
    of `config_cls` (nested configs' options too, as `train: {epochs: 3}` or `train.epochs: 3`), each once.
    Otherwise a ConfigError naming the file, the line and the cause, with the closest option for a misspelled one."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(f"--config {path}: a directory, not a YAML file")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it as UTF-8 text ({e})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        yaml.safe_load(text)  # what composes may still not construct (an unknown tag)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"{path}: {_yaml_error(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if root is None:
        raise ConfigError(f"{path}: no `option: value` lines in it (empty, or comments only)")
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {root.value!r}"
        raise ConfigError(f"{path}: expected `option: value` lines, got {kind}")
    problem = _mapping_problem(root, config_cls, "", option_names(config_cls))
    if problem:
        raise ConfigError(f"{path}: {problem}")


def _yaml_error(e: yaml.MarkedYAMLError) -> str:
    """A YAML parser's error as one clause: the line and column (1-based) and the problem, with what it was
    parsing and where that began."""
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = ""
    if e.context and e.context_mark and e.context_mark is not mark:
        context = f" ({e.context} at line {e.context_mark.line + 1})"
    return f"not valid YAML: {where}{e.problem or e.context}{context}"


def _mapping_problem(node: yaml.MappingNode, cls, prefix: str, options: list[str]) -> str | None:
    """The first key of a YAML mapping that is no option of `cls` (or given twice), as one clause naming its line."""
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode):
            return f"line {line}: an option name must be text"
        key = key_node.value
        if key in seen:
            return f"line {line}: option {prefix + key!r} given twice (also at line {seen[key]}; YAML keeps the last)"
        seen[key] = line
        hint = _option_type(cls, key)
        if hint is None:
            return f"line {line}: unknown option {prefix + key!r}{did_you_mean(prefix + key, options)}"
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint) and not isinstance(value_node, yaml.MappingNode):
            shown = value_node.value if isinstance(value_node, yaml.ScalarNode) else "a list"
            return (
                f"line {line}: option {prefix + key!r} holds options of its own ({key}: {{OPTION: VALUE}}, or "
                f"{key}.OPTION: VALUE), got {shown!r}"
            )
        if dataclasses.is_dataclass(hint):
            problem = _mapping_problem(value_node, hint, f"{prefix}{key}.", options)
        elif dataclasses.is_dataclass(item) and isinstance(value_node, yaml.SequenceNode):
            scope = f"{prefix}{key}[]."
            other = next((v for v in value_node.value if not isinstance(v, yaml.MappingNode)), None)
            if other is not None:
                shown = other.value if isinstance(other, yaml.ScalarNode) else "a list"
                return f"line {other.start_mark.line + 1}: each item of {prefix + key!r} holds options, got {shown!r}"
            found = (_mapping_problem(v, item, scope, option_names(item, scope)) for v in value_node.value)
            problem = next(filter(None, found), None)
        else:
            problem = None
        if problem:
            return problem
    return None


def _option_type(cls, dotted: str):
    """The type of a (dotted) option of a config dataclass, Optional unwrapped; None if there is no such option."""
    hint = cls
    for name in dotted.split("."):
        if not dataclasses.is_dataclass(hint) or name not in {f.name for f in dataclasses.fields(hint)}:
            return None
        hint = typing.get_type_hints(hint)[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
    return hint


def option_names(cls, prefix: str = "") -> list[str]:
    """Every option of a config dataclass as a dotted name, nested configs' options included (`optim.lr`)."""
    names = []
    for f in dataclasses.fields(cls):
        hint = _option_type(cls, f.name)
        names.append(prefix + f.name)
        if dataclasses.is_dataclass(hint):
            names += option_names(hint, f"{prefix}{f.name}.")
    return names


def did_you_mean(name: str, options: list[str], *, flag: str = "") -> str:
    """ " (did you mean 'optim.lr'?)" (with `flag` "--": " (did you mean --optim.lr?)") for the option closest to an
    unknown `name`: by spelling within its scope (`train.lerning_rate` among train's options), by another trainer's
    name for it (`learning_rate`), or by its last part alone (`lrr` -> `optim.lr`); "" when none is close."""
    scope = name.rsplit(".", 1)[0] + "." if "." in name else ""
    rest, leaf = name[len(scope) :], name.rsplit(".", 1)[-1]
    within = [o[len(scope) :] for o in options if o.startswith(scope)]
    guess = difflib.get_close_matches(rest, within, n=1)
    if not guess:
        other = difflib.get_close_matches(leaf, OTHER_NAMES, n=1)
        guess = [OTHER_NAMES[other[0]]] if other and OTHER_NAMES[other[0]] in within else []
    if not guess:
        leaves = {o.rsplit(".", 1)[-1]: o for o in reversed(within)}  # the shallowest option of a leaf name
        guess = [leaves[g] for g in difflib.get_close_matches(leaf, leaves, n=1)]
    if not guess:
        return ""
    return f" (did you mean {flag}{scope}{guess[0]}?)" if flag else f" (did you mean {scope + guess[0]!r}?)"


def usage_error(config_cls, error: ArgumentError) -> str:
    """The parser's error (often several lines: types, subtypes, the value) as one clause; an unknown option with
    the closest valid one."""
    message = str(error)
    options = option_names(config_cls) if config_cls is not None else []
    unrecognized = re.match(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unrecognized:
        words = unrecognized.group(1).split()
        flags = [w[2:].split("=")[0] for w in words if w.startswith("--")]
        if flags:
            return f"unknown option --{flags[0]}{did_you_mean(flags[0], options, flag='--')}"
        return f"unexpected argument {words[0]!r} (options are given as --name value)"
    unknown = re.search(r"does not accept option '([^']+)'", message)
    if unknown:
        return f"unknown option {unknown.group(1)!r}{did_you_mean(unknown.group(1), options)}"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.DOTALL)
    if key:
        name, detail = key.groups()
        unknown = re.search(r"Option '([^']+)' is not accepted", detail)
        hint = _option_type(config_cls, name) if config_cls is not None else None
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if unknown and dataclasses.is_dataclass(item):  # a list of configs (extra_arms): an item's option
            return f"{name}: unknown option {unknown.group(1)!r}{did_you_mean(unknown.group(1), option_names(item))}"
        not_item = re.search(
            r"Not a valid subclass of \w+\. Got value: (.*?)(?: Subclass types|$)", " ".join(detail.split())
        )
        if not_item:
            return f"{name}: each item holds options ({{OPTION: VALUE, ...}}), got {not_item.group(1)!r}"
        unloadable = re.search(r"Unable to load config '(.*?)'", detail)
        if unloadable:
            shown = unloadable.group(1)
            return f"{name}: expected its options (--{name}.OPTION VALUE, or '{{OPTION: VALUE}}'), got {shown!r}"
        given = re.search(r"(?:Given value|Got value): (.*)", detail)
        expected = [_type_name(t) for t in re.findall(r"Expected an? <class '([\w.]+)'>", detail)]
        if given and expected:
            return f"{name}: expected {' or '.join(dict.fromkeys(expected))}, got {given.group(1).strip()!r}"
        return f"{name}: {' '.join(detail.split())}"
    return " ".join(message.split())


def _type_name(name: str) -> str:
    return {"NoneType": "null", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
        name, f"a {name}"
    )


def in_file(argv: list[str], message: str) -> str:
    """A refused value named with the config file it came from: the last one that sets it, where the command line
    does not."""
    from datalever.provenance import flatten

    name = re.match(r"([\w.]+): ", message)
    if not name or any(a == f"--{name[1]}" or a.startswith(f"--{name[1]}=") for a in argv):
        return message
    for file in reversed(config_files(argv)):
        if name[1] in flatten(yaml.safe_load(Path(file).expanduser().read_text(encoding="utf-8"))):
            return f"{file}: {message}"
    return message


def unknown_command(argv: list[str], commands: dict) -> str:
    """The parser's refusal of a command line without a known command, as one clause: the closest command."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if not words:
        return "no command given; `datalever --help` lists them"
    names = [" ".join(c) for c in commands]
    groups = {c[0] for c in commands if len(c) == 2}
    if len(words) == 1 and words[0] in groups:
        return f"{words[0]} needs a command: {', '.join(c[1] for c in commands if c[0] == words[0])}"
    typed = " ".join(words) if words[0] in groups else words[0]
    guess = difflib.get_close_matches(typed, names, n=1)
    return f"unknown command {typed!r}" + (
        f" (did you mean {guess[0]!r}?)" if guess else "; `datalever --help` lists them"
    )
