"""The experiment: the whole study over arms, seeds and sweep points, written as units that the grid runs.

    config.py   ExperimentConfig and ArmConfig, checked before any work; which settings decide the numbers; sweeps
    data.py     the data read into RUN/data once, where every unit finds it; train/validation/test kept apart
    study.py    the study as units: data, profile, splits, each arm's data, training and evaluation, the report
    curve.py    learning curves: validation accuracy at the same optimizer steps in every arm

`datalever experiment` is `run(ExperimentConfig(...))`.
"""

from datalever.experiment.config import ArmConfig, ExperimentConfig
from datalever.experiment.study import run, units


def units_from_file(config_file: str):
    """The run directory and the units of the experiment whose settings a driver wrote to `config_file`: what a
    worker process or a SLURM job runs one of (`grid.worker`)."""
    from datalever.cli import read_config

    cfg = read_config(ExperimentConfig, config_file)
    return cfg.run_dir, units(cfg)


__all__ = ["ArmConfig", "ExperimentConfig", "run", "units", "units_from_file"]
