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
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
        """A resumable checkpoint's directory (`CheckpointDir` names what it holds)."""
        return self.checkpoints / f"step-{step}"

    def checkpoint_temporary(self, step: int) -> Path:
        """Where every process writes a checkpoint before it is renamed into place (one name they all know)."""
        return self.checkpoints / f".step-{step}.tmp"

    def temporary_step(self, path: Path) -> int | None:
        """N for `checkpoint_temporary(N)`, else None."""
        name = path.name
        if not (name.startswith(".step-") and name.endswith(".tmp")):
            return None
        step = name[len(".step-") : -len(".tmp")]
        return int(step) if step.isdigit() else None

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's event files (`--log_with [tensorboard]`), under <run name>/."""
        return self.root / "datalever"

    @property
    def wandb(self) -> Path:
        """wandb's files (`--log_with [wandb]`)."""
        return self.root / "wandb"


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

    @property
    def lm_eval(self) -> Path:
        """lm-evaluation-harness's accuracies on the same test set (`lmeval.run`); written last of its files."""
        return self.root / "lm_eval.json"

    @property
    def lm_eval_work(self) -> LmEvalDir:
        """lm-eval's task over the local test file, the documents it read and its per-sample log."""
        return LmEvalDir(self.root / "lm_eval")


@dataclass(frozen=True)
class LmEvalDir(_Layout):
    """What `lmeval.run` gives lm-evaluation-harness and gets back: a task directory for its `include_path`."""

    def task(self, name: str) -> Path:
        """The generated task config (a YAML that includes lm-eval's own task and points it at local files)."""
        return self.root / f"{name}.yaml"

    @property
    def docs(self) -> Path:
        """The test set as lm-eval's task reads its documents (JSON lines with the task's own columns)."""
        return self.root / "test.jsonl"

    @property
    def fewshot_docs(self) -> Path:
        """The examples lm-eval draws its few-shot examples from, where the task takes them from a split."""
        return self.root / "fewshot.jsonl"

    @property
    def samples(self) -> Path:
        """lm-eval's per-sample log: each document, the prompt it sent, the generation and each filter's verdict."""
        return self.root / "samples.jsonl"


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
class ComparisonDir(_Layout):
    """What `datalever compare-splits` writes (and a sweep's report, at its root, where its points' splits differ):
    how splits of one training set agree, each one's audit, and how far apart its clusters' losses are."""

    @property
    def md(self) -> Path:
        return self.root / "split_comparison.md"

    @property
    def json(self) -> Path:
        return self.root / "split_comparison.json"

    @property
    def plot(self) -> Path:
        return self.root / "split_comparison.png"


@dataclass(frozen=True)
class ArmDir(_Layout):
    """One arm's training set (from `datalever upsample`) and, in an experiment, its training and evaluation."""

    @property
    def examples(self) -> Path:
        """Every distinct example once (what training reads, with the manifest's multiplicities)."""
        return self.root / "examples.jsonl"

    @property
    def train_jsonl(self) -> Path:
        """The upsampled set in full, each example as many times as its multiplicity, in TRL's prompt/completion
        columns (for other trainers)."""
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

    @property
    def reused_from(self) -> Path:
        """In a sweep point, an arm linked from an earlier point's finished run of it: where from, and why."""
        return self.root / "reused_from.json"

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
        return DataDir(self.data).file(split)

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
        return SplitDir(self.root if features is None else self.splits / features)

    @property
    def splits(self) -> Path:
        """splits/: the further splits of the same profile, a directory each."""
        return self.root / "splits"

    def further_splits(self) -> list[str]:
        """The features of every split under splits/, sorted."""
        return sorted(p.name for p in self.splits.glob("*") if p.is_dir())

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

    @property
    def split_comparison(self) -> ComparisonDir:
        """A sweep's comparison of its points' splits (where the points profile differently)."""
        return ComparisonDir(self.root)

    # -------------------------------------------------------------------- the grid's bookkeeping (grid/)

    @property
    def grid(self) -> Path:
        """.grid/: claims, the configs workers read, job records. Bookkeeping, never results."""
        return self.root / ".grid"

    def claim(self, unit: str) -> Path:
        """The lock file a unit is claimed through (grid.units.claim)."""
        return self.grid / "claims" / f"{unit}.lock"

    def grid_config(self, digest: str) -> Path:
        """The experiment's settings as a driver gave them to its workers (named by their hash)."""
        return self.grid / f"config-{digest}.yaml"

    def job_record(self, unit: str) -> Path:
        """The SLURM job a driver submitted for a unit: its id and submitit folder."""
        return self.grid / "jobs" / f"{unit}.json"

    @property
    def slurm_jobs(self) -> Path:
        """submitit's folder pattern (%j: the job id): each job's script, pickles and scheduler output."""
        return self.grid / "slurm" / "%j"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def unit_log(self, unit: str) -> Path:
        """Everything a unit run in a process of its own printed (logs/<unit>.log, appended by each attempt)."""
        return self.logs / f"{unit}.log"

    def experiment_outputs(self) -> list[Path]:
        """What an experiment's stages wrote here (existing paths only): everything `--overwrite` removes.
        data/ counts only when `data synth` made it or the experiment read the given data into it (its
        synth.config.yaml or import.config.yaml is there): data of the user's own is never removed."""
        named = [self.trajectories, self.trajectories_meta, self.proxy.root, self.splits, self.root / "arms"]
        named += [self.root / "sweep", self.sweep_md, self.sweep_json]
        named += [self.split_comparison.md, self.split_comparison.json, self.split_comparison.plot]
        named += [self.split().split, self.split().summary, self.split().trajectories_plot, self.split().datamap_plot]
        named += [self.split().audit]
        named += [self.results_json, self.results_md, *self.root.glob("results_*.png"), self.logs]
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


def provenance_files(out_dir: str | os.PathLike, stage: str) -> tuple[Path, Path]:
    """`<stage>.config.yaml` (the settings) and `<stage>.meta.json` (versions, facts) in a stage's directory."""
    return Path(out_dir) / f"{stage}.config.yaml", Path(out_dir) / f"{stage}.meta.json"


@dataclass(frozen=True)
class DataDir(_Layout):
    """What `datalever data synth` writes (an experiment's data/): one datalever file per split."""

    def file(self, split: str) -> Path:
        return self.root / f"{split}.jsonl"


@dataclass(frozen=True)
class TheoryDir(_Layout):
    """What `datalever theory` writes."""

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    def plot(self, name: str) -> Path:
        return self.root / f"{name}.png"


@dataclass(frozen=True)
class CheckpointDir(_Layout):
    """A resumable training checkpoint (`TrainDir.checkpoint(step)`)."""

    @property
    def model(self) -> Path:
        """The HF model (safetensors) or the peft adapter, with the tokenizer: a `ModelDir`."""
        return self.root / "model"

    @property
    def trainer_state(self) -> Path:
        """Step, stream position, optimizer state, compute, the run's identity; written last: a checkpoint is complete
        when it is there."""
        return self.root / "trainer_state.pt"

    def rng(self, rank: int | str) -> Path:
        """A process's RNG state ("*" for a glob of every process's)."""
        return self.root / f"rng-{rank}.pt"


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

    @property
    def weights(self) -> Path:
        """A full model's weights (save_pretrained's single safetensors file)."""
        return self.root / "model.safetensors"

    @property
    def pretrain_record(self) -> Path:
        """How `datalever model pretrain` made the model (settings, corpus, losses)."""
        return self.root / "pretrain.json"

    @property
    def adapter_weights(self) -> Path:
        """A peft adapter's weights."""
        return self.root / "adapter_model.safetensors"
