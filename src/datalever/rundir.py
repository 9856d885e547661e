"""The run directory: where every stage's files live, written atomically, with provenance.

The layout classes below are the one place that names files and folders. A stage writes into its
own directory (`TrainDir`, `EvalDir`, `ArmDir`, `SplitDir`); an experiment's run directory
(`RunDir`) holds them all:

    RUN/
      data/{train,validation,test}.jsonl     the embedded dataset (unless files are given)
      trajectories.parquet, .meta.json       profile: one loss column per recorded step
      profile/                               profile: the proxy's training run (a TrainDir)
      split.parquet, split_summary.json ...  split with the experiment's features (a SplitDir)
      splits/<features>/                     a further split of the same profile
      arms/<arm>/seed<k>/                    an ArmDir: the upsampled set, train/ (TrainDir), eval/ (EvalDir)
      results.json, results.md, results_*.png
      <stage>.config.yaml, <stage>.meta.json provenance of each stage

Models built from a preset (`preset:NAME`) are not part of any run: they are deterministic by
name and seed and live in one cache (see `models.preset_cache_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False))


def write_parquet(path: str | os.PathLike, table) -> None:
    """Atomically write a pyarrow Table."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; when the block ends without an error it takes
    `path`'s place in one rename, so a crash never leaves a half-written directory under the final name.

    keep_existing: if `path` appeared meanwhile (another process built the same deterministic thing),
    keep it and discard this copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is as readable as any other output
    try:
        yield tmp
        if keep_existing and path.exists():
            shutil.rmtree(tmp)
        else:
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`, replacing an older one there."""
    if path.exists():
        shutil.rmtree(path)
    os.rename(tmp, path)


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class _Layout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is accepted too


@dataclass(frozen=True)
class TrainDir(_Layout):
    """What `datalever train` writes into its output directory."""

    @property
    def log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def summary(self) -> Path:
        """Written last: its presence marks a finished run."""
        return self.root / "train_summary.json"

    @property
    def model(self) -> Path:
        """The final model, a plain HF checkpoint directory (LoRA merged)."""
        return self.root / "model"

    @property
    def adapter(self) -> Path:
        """The LoRA adapter alone (LoRA runs)."""
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"


@dataclass(frozen=True)
class EvalDir(_Layout):
    """What `datalever eval` writes."""

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.jsonl"

    @property
    def metrics(self) -> Path:
        """Written last: its presence marks a finished evaluation."""
        return self.root / "metrics.json"


@dataclass(frozen=True)
class SplitDir(_Layout):
    """What `datalever split` writes."""

    @property
    def split(self) -> Path:
        return self.root / "split.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "split_summary.json"

    @property
    def audit(self) -> Path:
        """What hard membership tracks: AUROCs against length, composition and difficulty columns (audit.py)."""
        return self.root / "split_audit.json"

    @property
    def config(self) -> Path:
        return self.root / "split.config.yaml"

    @property
    def trajectories_plot(self) -> Path:
        return self.root / "split_trajectories.png"

    @property
    def datamap_plot(self) -> Path:
        return self.root / "split_datamap.png"


@dataclass(frozen=True)
class ArmDir(_Layout):
    """One arm's training set (from `datalever upsample`) and, in an experiment, its training and evaluation."""

    @property
    def examples(self) -> Path:
        """Every distinct example once (what training reads, with the manifest's multiplicities)."""
        return self.root / "examples.jsonl"

    @property
    def train_jsonl(self) -> Path:
        """The upsampled set in full, each example as many times as its multiplicity (for other trainers)."""
        return self.root / "train.jsonl"

    @property
    def manifest(self) -> Path:
        """id, multiplicity, origin of every example."""
        return self.root / "manifest.parquet"

    @property
    def counts(self) -> Path:
        """Written last: its presence marks a finished arm."""
        return self.root / "manifest.json"

    @property
    def train(self) -> TrainDir:
        return TrainDir(self.root / "train")

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.root / "eval")

    @property
    def curve(self) -> Path:
        """The learning curve: validation accuracy at points along training (and test accuracy where the
        validation accuracy was the best so far)."""
        return self.root / "curve.json"

    def eval_on(self, benchmark: str) -> EvalDir:
        """The evaluation on one benchmark: eval/ for the test (or validation) split, eval-<name>/ for a named
        test set."""
        return self.eval if benchmark in ("test", "validation") else EvalDir(self.root / f"eval-{benchmark}")


@dataclass(frozen=True)
class RunDir(_Layout):
    """An experiment's run directory: every stage's files under one root."""

    @property
    def data(self) -> Path:
        return self.root / "data"

    def data_file(self, split: str) -> Path:
        """data/<split>.jsonl: train, validation, test (or test-<name>): the embedded dataset, or the given data
        as the experiment read it."""
        return self.data / f"{split}.jsonl"

    @property
    def trajectories(self) -> Path:
        return self.root / "trajectories.parquet"

    @property
    def trajectories_meta(self) -> Path:
        """The trajectory store's commit record."""
        return self.root / "trajectories.meta.json"

    @property
    def proxy(self) -> TrainDir:
        """The proxy's training run (profile)."""
        return TrainDir(self.root / "profile")

    def split(self, features: str | None = None) -> SplitDir:
        """The split at the root, or a further split of the same profile under splits/<features>/."""
        return SplitDir(self.root if features is None else self.root / "splits" / features)

    def arm(self, arm: str) -> ArmDir:
        """arms/<arm>/: where a stand-alone `datalever upsample` writes."""
        return ArmDir(self.root / "arms" / arm)

    def seed_dir(self, arm: str, seed: int) -> ArmDir:
        """arms/<arm>/seed<k>/: one arm's run for one seed in an experiment."""
        return ArmDir(self.root / "arms" / arm / f"seed{seed}")

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    def plot(self, name: str) -> Path:
        return self.root / f"results_{name}.png"

    def sweep_point(self, name: str) -> Path:
        """sweep/<axis>=<value>,...: the run directory of one point of a sweep."""
        return self.root / "sweep" / name

    @property
    def sweep_md(self) -> Path:
        return self.root / "sweep_results.md"

    @property
    def sweep_json(self) -> Path:
        return self.root / "sweep_results.json"

    def experiment_outputs(self) -> list[Path]:
        """What an experiment's stages wrote here (existing paths only): everything `--overwrite` removes.
        data/ counts only when `data synth` made it or the experiment read the given data into it (its
        synth.config.yaml or import.config.yaml is there): data of the user's own is never removed."""
        named = [self.trajectories, self.trajectories_meta, self.proxy.root, self.root / "splits", self.root / "arms"]
        named += [self.root / "sweep", self.sweep_md, self.sweep_json]
        named += [self.split().split, self.split().summary, self.split().trajectories_plot, self.split().datamap_plot]
        named += [self.split().audit]
        named += [self.results_json, self.results_md, *self.root.glob("results_*.png")]
        named += [p for stage in ("experiment", "profile", "split") for p in provenance_files(self.root, stage)]
        if any(provenance_files(self.data, stage)[0].exists() for stage in ("synth", "import")):
            named.append(self.data)
        return [p for p in named if p.exists()]


def read_manifest(path: str | os.PathLike) -> dict[str, int]:
    """An arm's manifest (from `datalever upsample`) as {example id: multiplicity}."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "multiplicity"]).to_pydict()
    return {id_: int(m) for id_, m in zip(table["id"], table["multiplicity"])}


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return obj


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    # Read from package metadata: importing the libraries just for their versions costs seconds.
    for name in (
        "datalever",
        "torch",
        "transformers",
        "tokenizers",
        "accelerate",
        "peft",
        "datasets",
        "scikit-learn",
        "numpy",
        "pyarrow",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def fingerprint(examples: Iterable) -> str:
    """A hash of the examples' ids in order: two runs saw the same data iff the fingerprints agree."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(ex.id.encode())
        h.update(b"\n")
        n += 1
    return f"{h.hexdigest()[:16]}-{n}"


def provenance_files(out_dir: str | os.PathLike, stage: str) -> tuple[Path, Path]:
    """`<stage>.config.yaml` (the settings) and `<stage>.meta.json` (versions, facts) in a stage's directory."""
    return Path(out_dir) / f"{stage}.config.yaml", Path(out_dir) / f"{stage}.meta.json"


def content_fingerprint(examples: Iterable) -> str:
    """The ids in order (`fingerprint`) plus a hash of every example's text and source: edited content under
    kept ids differs. What profile and train compare before continuing a run."""
    h = hashlib.sha256()
    for ex in examples:
        for part in (ex.id, ex.prompt, ex.response, ex.source or ""):
            h.update(part.encode("utf-8"))
            h.update(b"\x1f")
    return f"{fingerprint(examples)}-{h.hexdigest()[:16]}"


def recorded_settings(out_dir: str | os.PathLike, stage: str) -> dict | None:
    """The settings a stage recorded in its directory (`<stage>.config.yaml`), or None if it has none."""
    config_file = provenance_files(out_dir, stage)[0]
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else None


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one dict with dotted names (`optim.lr`)."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differences(recorded: dict, config: Any, ignore: Iterable[str] = ()) -> list[str]:
    """The settings (dotted names, `old -> new`) in which `config` differs from recorded settings; a name in
    `ignore` (a top-level option or a dotted one) does not count. Settings recorded by another version count as
    the same work where they can: an option added since, at its default (what the earlier version did), and an
    option no longer there."""
    ignore = set(ignore)

    def kept(settings: dict) -> dict:
        return {k: v for k, v in flatten(settings).items() if k not in ignore and k.split(".")[0] not in ignore}

    now, before, defaults = kept(to_jsonable(config)), kept(recorded), flatten(to_jsonable(field_defaults(config)))
    return [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(now)
        if now[k] != before.get(k) and not (k not in before and k in defaults and now[k] == earlier_value(k, defaults))
    ]


# Options whose default does not do what runs did before the option existed: the value that does.
EARLIER_VALUES = {"chat_template": "none"}  # plain text; "auto" renders through a tokenizer's template


def earlier_value(key: str, defaults: dict) -> Any:
    """What a run recorded before `key` (a dotted name) existed did: its earlier value, else today's default."""
    return EARLIER_VALUES.get(key.rsplit(".", 1)[-1], defaults.get(key))


def field_defaults(config: Any) -> dict:
    """A config dataclass's defaults, nested configs included (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_jsonable(f.default_factory())  # the factory's own values (a proxy's lr 2e-3)
    return out


def refuse_other_settings(
    out_dir: str | os.PathLike, stage: str, config: Any, *, ignore: Iterable[str] = ()
) -> list[str]:
    """Outputs are replaced only by the same work: if `out_dir` holds this stage's outputs made with other
    settings, raise one line naming them, unless the config says `overwrite`. Returns the differences."""
    from datalever.checks import ConfigError

    recorded = recorded_settings(out_dir, stage)
    diffs = [] if recorded is None else settings_differences(recorded, config, {*ignore, "overwrite", "progress"})
    if diffs and not getattr(config, "overwrite", False):
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise ConfigError(
            f"{out_dir} holds {stage} outputs made with other settings ({shown}): use another output directory, "
            "or --overwrite true to replace them"
        )
    return diffs


def record_provenance(out_dir: str | os.PathLike, stage: str, config: Any, **extra: Any) -> None:
    """Write the stage's settings and facts (with the library versions) into its directory."""
    config_file, meta_file = provenance_files(out_dir, stage)
    write_yaml(config_file, config)
    write_json(meta_file, {"stage": stage, "versions": versions(), **extra})


@dataclass(frozen=True)
class ModelDir(_Layout):
    """An HF checkpoint directory (a saved model, e.g. `TrainDir.model`): the files datalever reads from one without
    loading the model (the split's audit)."""

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer_json(self) -> Path:
        """The fast tokenizer's file, which the `tokenizers` library reads without torch."""
        return self.root / "tokenizer.json"
