"""An experiment's data: read once into RUN/data as datalever files (or the embedded dataset generated there), which
every unit then reads by the same paths (`data_paths`), and the check that train, validation and test share no
example."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from datalever import checks, provenance, rundir
from datalever.examples import (
    DataFormat,
    check_overlap,
    examples_written_by_datalever,
    load_examples,
    read_data,
    save_examples,
)
from datalever.experiment.config import ExperimentConfig, test_sets
from datalever.rundir import RunDir
from datalever.synth import SPLITS, run_synth


def data_paths(cfg: ExperimentConfig) -> dict[str, str]:
    """The run's data files by role (train, validation) and test data name, as `data_files` writes them (nothing is
    read or written here: what every unit computes to find them)."""
    run_dir = RunDir(cfg.run_dir)
    if not cfg.train_file:
        return {split: str(run_dir.data_file(split)) for split in SPLITS}
    names = {"train": cfg.train_file, "validation": cfg.val_file or (cfg.train_file if cfg.val_holdout else None)}
    names.update({test_data_name(name): path for name, path in test_sets(cfg).items()})
    return {name: str(run_dir.data_file(name)) for name, path in names.items() if path is not None}


def data_files(cfg: ExperimentConfig) -> dict[str, str]:
    """The run's data files in RUN/data, by role (train, validation) and test set name: the given data read
    once into datalever files, or the embedded dataset generated there."""
    run_dir = RunDir(cfg.run_dir)
    if cfg.train_file:
        return import_data(cfg, run_dir)
    if not run_dir.data_file("test").exists():  # synth writes test last
        run_synth(dataclasses.replace(cfg.synth, out=str(run_dir.data)))
    return data_paths(cfg)


def import_data(cfg: ExperimentConfig, run_dir: RunDir) -> dict[str, str]:
    """Read each given data source with its options and write it to RUN/data/<name>.jsonl (atomically, every
    invocation: an edited source shows up as other data, which the stages refuse to mix with earlier results)."""
    fmt = cfg.data_format()
    sources = {
        "train": (cfg.train_file, fmt, cfg.train_split, "train", "--train_split"),
        "validation": (cfg.val_file, fmt, cfg.val_split, "validation", "--val_split"),
    }
    for name, path in test_sets(cfg).items():
        # A test set from the training data's own source (another split of it) is read with the same options;
        # another is detected from its columns (GSM8K, MATH, ...), whatever the training data's format.
        own = path in (cfg.train_file, cfg.val_file)
        template = (cfg.test_templates or {}).get(name)
        test_format = fmt if own else DataFormat(on_conflict=fmt.on_conflict)
        if template is not None:
            test_format = dataclasses.replace(test_format, template=template)
        sources[test_data_name(name)] = (path, test_format, cfg.test_split, "test", "--test_split")
    for name, (path, data_format, split, role, option) in sources.items():
        if path is None:
            continue
        target = run_dir.data_file(name)
        examples = read_data(path, data_format, split=split, default_split=role, split_option=option)
        if name == "train" and cfg.val_holdout:
            if _is_own_file(path, target):  # what an earlier import kept: holding out again would shrink it each time
                raise checks.ConfigError(f"val_holdout: train_file {path} is this run's own copy; give the original")
            examples, held_out = hold_out(examples, cfg.val_holdout, cfg.val_holdout_seed)
            save_examples(str(run_dir.data_file("validation")), held_out)
        if not _is_own_file(path, target):
            save_examples(str(target), examples)
    provenance.record(run_dir.data, "import", cfg.data_format(), sources={k: v[0] for k, v in sources.items()})
    return data_paths(cfg)


def hold_out(examples: list, share: float, seed: int) -> tuple[list, list]:
    """(kept, held out): the examples in the order `datasets`' Dataset.shuffle(seed=seed) gives them (numpy's
    default_rng(seed).permutation), the first int(n * (1 - share)) kept, the rest held out: the prototype's
    `dataset.shuffle(seed=42)`, then `select(range(int(len * 0.95)))` for training and the rest for validation."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_kept = int(len(examples) * (1 - share))
    return [examples[i] for i in order[:n_kept]], [examples[i] for i in order[n_kept:]]


def _is_own_file(path: str, target: Path) -> bool:
    """Whether `path` is the very datalever file the experiment would write (an earlier run's, or `data synth`'s):
    then it is read as it is. Other data inside RUN/data is refused: the experiment writes there, and
    `--overwrite` removes what it wrote."""
    source = Path(path).expanduser()
    if not source.exists() or not source.resolve().is_relative_to(target.parent.resolve()):
        return False
    made_here = any(rundir.provenance_files(target.parent, stage)[0].exists() for stage in ("synth", "import"))
    if source.resolve() == target.resolve() and made_here and examples_written_by_datalever(source):
        return True  # written by `data synth` or an earlier import: the experiment's own
    raise checks.ConfigError(
        f"{path} lies in {target.parent}, where the experiment writes the data it reads; keep your data elsewhere"
    )


def test_data_name(name: str) -> str:
    """The data file a test set is read into: test.jsonl for the one test set `test`, else test-<name>.jsonl."""
    return "test" if name == "test" else f"test-{name}"


def eval_data(cfg: ExperimentConfig, files: dict, benchmark: str) -> str:
    return files["validation" if benchmark == "validation" else test_data_name(benchmark)]


def check_splits_apart(cfg: ExperimentConfig, files: dict) -> dict:
    """Train, validation and test must not share examples: a shared example makes a validation or test
    score measure memory. Refused unless allow_overlap; the result goes into the report either way."""
    named = {split: load_examples(path) for split, path in files.items() if path}  # datalever files in RUN/data
    overlaps = check_overlap(named, allow_overlap=cfg.allow_overlap)
    return {"splits": list(named), "overlaps": [o.to_dict() for o in overlaps]}
