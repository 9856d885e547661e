"""The demo: the whole method on the embedded default, in minutes on a laptop CPU.

It generates the math word-problem data, profiles it with a proxy, splits it into easy and hard,
trains `base`, `hard` and `random` arms, evaluates them and prints the table. Its settings are the
README study's, read from the configuration shipped in the package (`configs/embedded.yaml` in the
repository), with the demo's own arms, seeds and run directory; about 8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.resources import files

from datalever.cli import read_config
from datalever.experiment import ExperimentConfig
from datalever.experiment import run as experiment_run


@dataclass
class DemoConfig:
    """Run the method end to end on the embedded default data and print the results table."""

    run_dir: str = "runs/demo"
    """Run directory (rerunning the demo reuses what is finished there)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds; more seeds give confidence intervals."""
    arms: list[str] = field(default_factory=lambda: ["base", "hard", "random"])
    """Arms to train and compare."""
    quick: bool = False
    """A seconds-long smoke run (tiny data and model, configs/quick.yaml): checks the plumbing, not the method."""
    progress: bool = True
    """Show progress bars."""
    overwrite: bool = False
    """Rerun in a run_dir whose results were made with other settings (an earlier version's demo): delete what the
    demo wrote there and start again (without it such a rerun is refused, so no result is reused under other
    settings)."""


def shipped_config(name: str) -> ExperimentConfig:
    """An experiment configuration shipped with the package: `embedded` (the study) or `quick` (a smoke run)."""
    return read_config(ExperimentConfig, files("datalever") / "assets" / "configs" / f"{name}.yaml")


def run(cfg: DemoConfig) -> str:
    study = shipped_config("quick" if cfg.quick else "embedded")
    changes = dict(run_dir=cfg.run_dir, seeds=cfg.seeds, arms=cfg.arms, progress=cfg.progress, overwrite=cfg.overwrite)
    return experiment_run(dataclasses.replace(study, **changes))
