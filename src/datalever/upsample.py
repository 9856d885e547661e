"""Upsample: build the training set of one arm from the split.

Arms (m = ``UpsampleConfig.m``, the number of *extra* uses of a selected example):

- ``hard``: every hard example is used 1 + m times, every other example once.
- ``easy``: the control: every easy example (clustered, not hard) is used 1 + m times.
- ``random``: the control with the same budget as ``hard``: n_hard examples drawn uniformly
  without replacement from all non-flagged examples (seeded; drawn from the ids in sorted order, so
  the draw does not depend on row order) are used 1 + m times. It adds exactly m * n_hard copies,
  as the hard arm does, with the same multiplicity histogram.
- ``base``: every example once.

Flagged examples (excluded from clustering) stay in the data once in every arm.

Synthesis (optional, ``synth_fn="module:function"``): the function is imported with importlib and
called on each *selected* example of the arm (the hard ones for ``hard``; for the controls, their
own selection) to make ``synth_per_hard`` new examples each, used once. If the function accepts
``n`` / ``seed`` keyword arguments they are passed (seed derived from the run seed and the parent
id); otherwise it is called with the example alone and its list cut to ``synth_per_hard``.

A variant whose id is already taken (the same content as an original or as an earlier variant), or that
reproduces a training problem reworded (below), is dropped and counted (``n_synth_dropped_duplicates``),
never added twice. A variant that reproduces a
held-out problem (``heldout``: by default the validation and test files beside the training file)
is dropped and counted too (``n_synth_dropped_heldout``): training on a test problem would inflate
the very accuracy the experiment measures. "Reproduces" means the same prompt text (ignoring case
and spacing), or the same numbers in the prompt with the same final answer (a reworded copy).

Outputs in ``RUN/arms/<arm>/`` (or ``out``): ``train.jsonl`` (materialized: each example repeated multiplicity
times, in a seeded shuffled order; it holds duplicate ids by design; columns prompt, completion, id, source: TRL's
SFTTrainer reads it as it is), ``examples.jsonl`` (each
example once: with the manifest, what `datalever train` reads, drawing each example as often as
its multiplicity without copying data), ``manifest.parquet`` (id, source, multiplicity, origin "original"|"synth",
parent_id for synth) and ``manifest.json`` (counts).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from datalever import checks, provenance, rundir
from datalever.answers import extract_answer
from datalever.examples import DataFormat, Example, read_data
from datalever.provenance import Classified
from datalever.rundir import ArmDir, RunDir

# The training distributions upsample builds: the original data, or hard/easy/random examples upsampled. (An
# experiment's arm is a whole recipe that names one of them, `ArmConfig.data`, with an optimizer and a length.)
DISTRIBUTIONS = ("hard", "easy", "random", "base")
MAX_M = 100  # extra uses of a selected example


class UpsampleError(ValueError):
    """The arm cannot be built as asked (the message says why)."""


@dataclass
class UpsampleConfig(DataFormat):
    """Build one arm's training set from the split: every example once, the selected ones 1 + m times."""

    run_dir: str = "runs/demo"
    """Run directory: reads split.parquet and the training examples, writes arms/<distribution>/."""
    distribution: str = "hard"
    """Which examples get extra copies: 'hard', 'easy' (control), 'random' (control, same number of extra copies as
    'hard') or 'base' (none). An experiment's arm names one in its `data`."""
    m: int = 1
    """Extra uses of each selected example: 1 = used twice (2x), 2 = three times (3x)."""
    seed: int = 0
    """Seed of the random arm's draw, of synthesis and of the shuffled order of train.jsonl."""
    synth_fn: str | None = None
    """Optional generator of variants, 'module:function' taking an Example and returning new Examples (e.g.
    'datalever.synth:variants' for the embedded dataset)."""
    synth_per_hard: int = 1
    """With synth_fn: synthesized variants added per selected example (each used once)."""
    data: str | None = None
    """Training examples the split was made from (read with the same data options as profile); default
    RUN/data/train.jsonl."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset); default: train."""
    split_table: str | None = None
    """The easy/hard split to read (split.parquet); default RUN/split.parquet. Distribution 'base' reads none."""
    heldout: list[str] | None = None
    """With synth_fn: held-out example files (validation, test) that variants must not reproduce; default:
    validation.jsonl and test.jsonl beside the training file, where they exist."""
    out: str | None = None
    """Output directory of the arm; default RUN/arms/<arm>."""
    overwrite: bool = False
    """Replace an arm built in the same place with other settings (without it such a rerun is refused)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.one_of("distribution", self.distribution, DISTRIBUTIONS)
        checks.non_negative("m", self.m)
        # Each selected example is used 1 + m times: beyond MAX_M the arm is one example repeated, not a
        # reweighted dataset (the paper's question stops at 10x), and building it takes minutes.
        checks.at_most("m", self.m, MAX_M)
        checks.non_negative("synth_per_hard", self.synth_per_hard)
        if self.synth_fn and self.distribution == "base":
            raise checks.ConfigError("synth_fn with distribution 'base': it selects no examples to synthesize from")


# ----------------------------------------------------------------------------------------------
# Multiplicities (pure)


def _check_split(split_df: pd.DataFrame) -> None:
    for col in ("id", "hard"):
        if col not in split_df.columns:
            raise UpsampleError(f"split table lacks column {col!r} (has {list(split_df.columns)})")
    if split_df["id"].duplicated().any():
        raise UpsampleError("split table has duplicate ids")


def _flagged(split_df: pd.DataFrame) -> pd.Series:
    if "flag" in split_df.columns:
        return split_df["flag"].fillna("").astype(str) != ""
    if "assigned" in split_df.columns:
        return split_df["assigned"] == "flagged"
    return pd.Series(False, index=split_df.index)


def selected_ids(split_df: pd.DataFrame, distribution: str, seed: int) -> list[str]:
    """The ids that get extra copies in `distribution`, in split-table order."""
    _check_split(split_df)
    if distribution not in DISTRIBUTIONS:
        raise UpsampleError(f"unknown distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
    flagged = _flagged(split_df)
    hard = split_df["hard"].astype(bool) & ~flagged
    if distribution == "base":
        return []
    if distribution == "hard":
        return split_df.loc[hard, "id"].astype(str).tolist()
    if distribution == "easy":
        easy = ~hard & ~flagged
        if "assigned" in split_df.columns:  # small sources are hard whole; only clustered rows are "easy"
            easy &= split_df["assigned"] == "kmeans"
        return split_df.loc[easy, "id"].astype(str).tolist()
    # random: as many examples as the hard arm selects, uniformly without replacement
    pool = sorted(split_df.loc[~flagged, "id"].astype(str))
    n = int(hard.sum())
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(pool), size=n, replace=False).tolist()) if n else set()
    picked = {pool[i] for i in chosen}
    return [i for i in split_df["id"].astype(str) if i in picked]


def multiplicities(split_df: pd.DataFrame, distribution: str, m: int = 1, seed: int = 0) -> dict[str, int]:
    """id -> number of uses in `distribution` (see the module docstring), in split-table order."""
    if int(m) != m or m < 0:
        raise UpsampleError(f"m must be a non-negative integer, got {m!r}")
    sel = set(selected_ids(split_df, distribution, seed))
    return {i: 1 + int(m) if i in sel else 1 for i in split_df["id"].astype(str)}


# ----------------------------------------------------------------------------------------------
# Synthesis


def load_callable(spec: str) -> Callable:
    """Import 'package.module:function' (dotted attribute paths allowed after the colon)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UpsampleError(f"synth_fn must look like 'module:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    if not mod_name or not attr:
        raise UpsampleError(f"synth_fn must look like 'module:function', got {spec!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise UpsampleError(f"synth_fn {spec!r}: cannot import module {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UpsampleError(f"synth_fn {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UpsampleError(f"synth_fn {spec!r} is not callable")
    return obj


def _seed_for(seed: int, example_id: str) -> int:
    """A per-parent seed: stable whatever the order in which parents are visited."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:4], "little")


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def problem_keys(ex: Example) -> list:
    """What identifies a problem up to rewording: its spacing- and case-normalized prompt, and (when it has
    numbers and a final answer) the sorted numbers of the prompt with the answer."""
    keys: list = [" ".join(ex.prompt.lower().split())]
    numbers, answer = tuple(sorted(_NUMBER.findall(ex.prompt))), extract_answer(ex.response)
    if numbers and answer is not None:
        keys.append((numbers, answer))
    return keys


def synthesize(
    fn: Callable,
    parents: list[Example],
    n: int,
    seed: int,
    originals: Sequence[Example],
    heldout: Sequence[Example] = (),
) -> tuple[list[tuple[Example, str]], int, int]:
    """Call `fn` on each parent; returns (new example, parent id) pairs, the number of variants dropped
    because they are not new (their id is taken: one of the `originals`, the training examples, or a variant made
    from an earlier parent; or they reproduce an original up to rewording: see `problem_keys`), and the number
    dropped because they reproduce a held-out example."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: list[tuple[Example, str]] = []
    seen = {ex.id for ex in originals}
    heldout_keys = {k for ex in heldout for k in problem_keys(ex)}
    original_keys = {k for ex in originals for k in problem_keys(ex)}
    dropped = dropped_heldout = 0
    for parent in parents:
        kwargs = {}
        if var_kw or "n" in params:
            kwargs["n"] = n
        if var_kw or "seed" in params:
            kwargs["seed"] = _seed_for(seed, parent.id)
        made = list(fn(parent, **kwargs))[:n]
        for ex in made:
            if not isinstance(ex, Example):
                raise UpsampleError(f"synth_fn returned {type(ex).__name__}, not an Example (parent {parent.id})")
            # Same content as an existing example, or a training problem reworded (new names, same numbers and
            # answer): adding it would repeat a problem while counting it as a new one.
            if ex.id in seen or original_keys.intersection(problem_keys(ex)):
                dropped += 1
                continue
            if heldout_keys.intersection(problem_keys(ex)):
                dropped_heldout += 1
                continue
            seen.add(ex.id)
            out.append((ex, parent.id))
    return out, dropped, dropped_heldout


# ----------------------------------------------------------------------------------------------
# The stage


def heldout_paths(cfg: UpsampleConfig, train_file: Path) -> list[str]:
    if cfg.heldout is not None:
        missing = [f for f in cfg.heldout if not Path(f).exists()]
        if missing:
            raise UpsampleError(f"held-out file(s) not found: {missing}")
        return list(cfg.heldout)
    beside = [train_file.with_name(f"{split}.jsonl") for split in ("validation", "test")]
    return [str(p) for p in beside if p.exists()]


def run(cfg: UpsampleConfig) -> dict:
    """Build `RUN/arms/<distribution>/` (or `out`); returns the counts written to manifest.json."""
    from datalever.examples import load_examples

    run_dir = RunDir(cfg.run_dir)
    arm_dir = ArmDir(cfg.out) if cfg.out else run_dir.arm(cfg.distribution)
    provenance.refuse_other_settings(arm_dir.root, "upsample", cfg, ignore=UPSAMPLE_SETTINGS.ignored)
    split_path = Path(cfg.split_table) if cfg.split_table else run_dir.split().split
    split_df, examples, train_file = read_inputs(cfg, run_dir, split_path)

    if split_df is None:  # base: every example once
        mult, selected = {ex.id: 1 for ex in examples}, []
    else:
        mult = multiplicities(split_df, cfg.distribution, cfg.m, cfg.seed)
        selected = selected_ids(split_df, cfg.distribution, cfg.seed)
    rows = [
        {"id": ex.id, "source": ex.source, "multiplicity": mult[ex.id], "origin": "original", "parent_id": None}
        for ex in examples
    ]
    unique = list(examples)

    synth: list[tuple[Example, str]] = []
    n_dropped = n_dropped_heldout = 0
    heldout_files: list[str] = []
    if cfg.synth_fn and cfg.synth_per_hard > 0:
        fn = load_callable(cfg.synth_fn)
        heldout_files = heldout_paths(cfg, train_file)
        heldout = [ex for f in heldout_files for ex in load_examples(f)]
        by_id = {ex.id: ex for ex in examples}
        synth, n_dropped, n_dropped_heldout = synthesize(
            fn, [by_id[i] for i in selected], cfg.synth_per_hard, cfg.seed, examples, heldout
        )
        for ex, parent in synth:
            rows.append({"id": ex.id, "source": ex.source, "multiplicity": 1, "origin": "synth", "parent_id": parent})
            unique.append(ex)

    manifest = pd.DataFrame(rows, columns=["id", "source", "multiplicity", "origin", "parent_id"])
    order = shuffled_rows(manifest, cfg.seed)
    write_arm(arm_dir, unique, order, manifest)

    flagged = None if split_df is None else _flagged(split_df)
    counts = {
        "distribution": cfg.distribution,
        "m": cfg.m,
        "seed": cfg.seed,
        "n_examples": len(examples),
        "n_flagged": None if flagged is None else int(flagged.sum()),  # base reads no split: None
        "n_hard": None if flagged is None else int((split_df["hard"].astype(bool) & ~flagged).sum()),
        "n_selected": len(selected),
        "n_extra_copies": int(sum(mult.values()) - len(mult)),
        "n_synth": len(synth),
        "n_synth_dropped_duplicates": n_dropped,
        "n_synth_dropped_heldout": n_dropped_heldout,
        "heldout_files": heldout_files,
        "n_unique": len(unique),
        "n_rows": len(order),
        "multiplicity_histogram": {str(k): int(v) for k, v in sorted(manifest["multiplicity"].value_counts().items())},
        "synth_fn": cfg.synth_fn,
        "train_file": str(train_file),
        "train_fingerprint": provenance.fingerprint(examples),
    }
    provenance.record(arm_dir.root, "upsample", cfg, counts=counts)
    rundir.write_json(arm_dir.counts, counts)  # last: its presence marks a finished arm
    return counts


def read_inputs(
    cfg: UpsampleConfig, run_dir: RunDir, split_path: Path
) -> tuple[pd.DataFrame | None, list[Example], Path]:
    """The split table (None for distribution base, which needs none), the training examples it was made from
    (every one in it, and no other) and their file."""
    import pyarrow.parquet as pq

    from datalever.examples import looks_local

    needs_split = cfg.distribution != "base"
    if needs_split and not split_path.exists():
        raise UpsampleError(f"no split at {split_path} (run the split stage first)")
    train_file = Path(cfg.data) if cfg.data else run_dir.data_file("train")
    if looks_local(str(train_file)) and not train_file.exists():
        raise UpsampleError(f"training examples not found at {train_file} (set --data)")
    examples = read_data(str(train_file), cfg.data_format(), split=cfg.split, default_split="train")
    if not needs_split:
        return None, examples, train_file
    split_df = pq.read_table(split_path).to_pandas()
    split_ids = set(split_df["id"].astype(str))
    not_in_split = [ex.id for ex in examples if ex.id not in split_ids]
    not_in_train = sorted(split_ids - {ex.id for ex in examples})
    if not_in_split or not_in_train:
        raise UpsampleError(
            f"{train_file} and {split_path} disagree: {len(not_in_split)} example(s) not in the split "
            f"(e.g. {not_in_split[:2]}), {len(not_in_train)} split id(s) not in the examples "
            f"(e.g. {not_in_train[:2]}); was the split made from another training set?"
        )
    return split_df, examples, train_file


def shuffled_rows(manifest: pd.DataFrame, seed: int) -> list[int]:
    """train.jsonl's rows: each manifest row as many times as its multiplicity, in a seeded shuffled order."""
    order = [i for i, m in enumerate(manifest["multiplicity"]) for _ in range(m)]
    rng = np.random.default_rng(seed)
    return [order[j] for j in rng.permutation(len(order))]


def write_prompt_completion(path: Path, examples: list[Example]) -> None:
    """The examples as rows of TRL's prompt/completion format (what its SFTTrainer reads as it is: loss on the
    completion only), with the datalever id and source beside them, atomically."""
    import json

    rows = [{"prompt": ex.prompt, "completion": ex.response, "id": ex.id, "source": ex.source} for ex in examples]
    rundir.atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_arm(arm_dir: ArmDir, unique: list[Example], order: list[int], manifest: pd.DataFrame) -> None:
    """train.jsonl (the upsampled set in full, in TRL's columns), examples.jsonl (each example once, datalever's) and
    manifest.parquet."""
    import pyarrow as pa

    from datalever.examples import save_examples

    arm_dir.root.mkdir(parents=True, exist_ok=True)
    write_prompt_completion(arm_dir.train_jsonl, [unique[j] for j in order])
    save_examples(str(arm_dir.examples), unique)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("multiplicity", pa.int64()),
            ("origin", pa.string()),
            ("parent_id", pa.string()),
        ]
    )
    rundir.write_parquet(arm_dir.manifest, pa.Table.from_pandas(manifest, preserve_index=False, schema=schema))


UPSAMPLE_SETTINGS = Classified(
    # Every one decides the arm's files. The paths are compared as given: an arm is rebuilt only from the same
    # files (an experiment reads its data into RUN/data, so its paths stay the same).
    decide=(
        "schema",
        "fields",
        "template",
        "run_dir",
        "distribution",
        "m",
        "seed",
        "synth_fn",
        "synth_per_hard",
        "data",
        "split",
        "split_table",
        "heldout",
        "out",
    ),
    ignored=("overwrite", "on_conflict"),
)
