"""Learning curves: validation accuracy along an arm's training, at the same optimizer steps in every arm, so arms
are compared at equal steps (and at equal compute: each point records the tokens and FLOPs spent so far)."""

from __future__ import annotations

import itertools
import math

from datalever import progress, rundir
from datalever.examples import load_examples
from datalever.experiment.config import ExperimentConfig, test_sets
from datalever.experiment.data import eval_data
from datalever.rundir import ArmDir
from datalever.tokens import Formatter
from datalever.train import TrainConfig, total_steps


class CurveRecorder:
    """Validation accuracy along one arm's training (a `train.run` on_step hook), kept in the arm's curve.json.

    Each point records the optimizer step, the epoch, the tokens and FLOPs spent so far and the accuracy; a point
    whose validation accuracy is the best so far also records the test sets' accuracies (what the checkpoint chosen
    on validation scores on test). A resumed run finds its earlier points in the file; points are computed on the
    live model, and a checkpoint follows each, so a kill loses no point."""

    def __init__(self, cfg: ExperimentConfig, tcfg: TrainConfig, arm_dir: ArmDir, files: dict, steps: list[int]):
        self.cfg, self.tcfg, self.arm_dir, self.files, self.steps = cfg, tcfg, arm_dir, files, steps
        self.points = (
            {p["step"]: p for p in rundir.read_json(arm_dir.curve)["points"]} if arm_dir.curve.exists() else {}
        )
        self._formatter = None
        self._examples: dict[str, list] = {}  # by benchmark: read once, not at every point

    @classmethod
    def for_arm(cls, cfg: ExperimentConfig, tcfg: TrainConfig, arm_dir: ArmDir, files: dict) -> CurveRecorder | None:
        if not cfg.curve_every or not files.get("validation"):
            return None
        epoch_len = sum(rundir.read_manifest(arm_dir.manifest).values())
        n_train = len(load_examples(files["train"]))
        return cls(cfg, tcfg, arm_dir, files, curve_steps(cfg, tcfg, n_train, epoch_len))

    def __call__(self, step: int, record: dict, model, accelerator) -> None:
        if step not in self.steps or step in self.points:
            return
        point = {
            "step": step,
            "epoch": record["epoch"],
            "tokens": record["compute_tokens"],
            "flops": record["compute_flops"],
            "val_accuracy": self._accuracy(model, accelerator, "validation", self.cfg.curve_limit),
        }
        best = max((p["val_accuracy"] for p in self.points.values()), default=-1.0)
        # The checkpoint chosen on validation so far: its test accuracy (at the last step the evaluation stage
        # measures the same weights; the report takes its numbers).
        if point["val_accuracy"] > best and step != self.steps[-1]:
            point["test_accuracy"] = {
                name: self._accuracy(model, accelerator, name, self.cfg.eval_limit)
                for name in test_sets(self.cfg) or ["test"]
                if self.cfg.eval_split == "test"
            }
        self.points[step] = point
        if accelerator.is_main_process:
            rundir.write_json(self.arm_dir.curve, {"steps": self.steps, "points": sorted_points(self.points)})

    def _accuracy(self, model, accelerator, benchmark: str, limit: int | None) -> float:
        from datalever.evaluate import evaluate_during_training
        from datalever.generation import GenerationOptions
        from datalever.models import load_tokenizer, resolve_model

        if self._formatter is None:
            tokenizer = load_tokenizer(resolve_model(self.tcfg.model, seed=self.tcfg.seed))
            self._formatter = Formatter(tokenizer, self.tcfg.chat_template)
        if benchmark not in self._examples:
            self._examples[benchmark] = load_examples(eval_data(self.cfg, self.files, benchmark))[:limit]
        examples = self._examples[benchmark]
        with progress.context(f"curve {benchmark}"):
            metrics, _ = evaluate_during_training(
                model,
                accelerator,
                self._formatter.tokenizer,
                examples,
                GenerationOptions(
                    max_new_tokens=self.cfg.eval_max_new_tokens,
                    batch_size=self.cfg.eval_batch_size,
                    progress=self.cfg.progress,
                ),
                formatter=self._formatter,
            )
        return metrics["accuracy"]


def sorted_points(points: dict) -> list[dict]:
    return [points[s] for s in sorted(points)]


def curve_steps(cfg: ExperimentConfig, tcfg: TrainConfig, n_train: int, epoch_len: int) -> list[int]:
    """Every `curve_every` epochs of the training data as given (n_train examples: one grid for all arms, so they
    meet at equal steps), up to and including the arm's last step."""
    last = total_steps(tcfg, epoch_len)
    # Rounded up as total_steps rounds an epoch count: the base arm's last step is a grid point.
    grid = (math.ceil(k * cfg.curve_every * n_train / tcfg.batch_size) for k in itertools.count(1))
    return sorted({*itertools.takewhile(lambda step: step <= last, grid), last})
