"""The study: one profile and its splits, then for every arm and seed its training set, fine-tuning, learning curve
and evaluation on every test set, and a report with confidence intervals and paired comparisons.

It is written as a graph of units (`units`), each the path of its outputs in the run directory:

    data                      the data read into RUN/data (or generated there); the leakage check
    profile                   the proxy's run and the trajectory store
    split, splits/<features>  the easy/hard split(s) the arms use
    arms/<arm>/seed<S>/data   the arm's training set (upsample; the driver builds it itself)
    arms/<arm>/seed<S>        its training, curve points and evaluation on every test set
    report                    results.{json,md} and the plots

and, for a sweep, the same under sweep/<point>/ for every point (an arm that does not depend on what a point changes
is linked from the first point that trained it: `link`), and the sweep's report last. `run` checks the settings
against what the run directory holds, then hands the units to the grid, which runs each when the units it reads are
finished, in this process or elsewhere (`grid`). A finished unit is never run again; a killed one resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from datalever import progress, provenance, rundir
from datalever.evaluate import EvalConfig
from datalever.evaluate import run as eval_run
from datalever.experiment.config import (
    CONTROL_ARMS,
    NOT_COMPARED,
    SPLIT_AXES,
    SWEEP_AXES,
    ArmConfig,
    ExperimentConfig,
    arm_spec,
    benchmarks,
    oracle_arm,
    point_name,
    sweep_config,
    sweep_points,
)
from datalever.experiment.curve import CurveRecorder
from datalever.experiment.data import check_splits_apart, data_files, data_paths, eval_data
from datalever.grid import driver
from datalever.grid.local import InProcess, Workers
from datalever.grid.units import Unit
from datalever.profile import run as profile_run
from datalever.report import write_report
from datalever.rundir import ArmDir, RunDir, SplitDir
from datalever.split import SplitConfig
from datalever.split import run as split_run
from datalever.train import TrainConfig, total_steps
from datalever.train import run as train_run
from datalever.upsample import UpsampleConfig
from datalever.upsample import run as upsample_run


def run(cfg: ExperimentConfig) -> str:
    """The whole study (every sweep point, with a sweep); returns the report's text."""
    t0 = time.perf_counter()
    for each in [cfg, *(sweep_config(cfg, point) for point in sweep_points(cfg))]:
        check_same_settings(each)
        provenance.record(each.run_dir, "experiment", each)
    launcher = launcher_for(cfg)
    if cfg.launcher == "slurm" and cfg.slurm.detach:
        return launcher.submit_all(units(cfg))
    driver.run(units(cfg), cfg.run_dir, launcher, show=cfg.progress)
    run_dir = RunDir(cfg.run_dir)
    results, plots = (run_dir.sweep_md, run_dir.plot("frontier")) if cfg.sweep else (run_dir.results_md, None)
    where = f"results: {results}" + (f" (plots: {run_dir.plot('*')})" if plots is None else f" (plot: {plots})")
    return f"{results.read_text().rstrip()}\n\n{where}; this invocation took {time.perf_counter() - t0:.0f} s"


STUDY = "datalever.experiment"  # the module a worker or a job asks for the units (`units_from_file`)


def launcher_for(cfg: ExperimentConfig):
    """Where the units run: here one at a time (the default), N local workers, or SLURM jobs. Workers and jobs
    rebuild the units from the settings as this driver has them (`settings_file`)."""
    if cfg.launcher == "slurm":
        from datalever.grid.slurm import Slurm

        return Slurm(STUDY, cfg.run_dir, settings_file(cfg), cfg.slurm, cfg.gpus_per_run)
    if cfg.workers == 1 and cfg.gpus_per_run <= 1:
        return InProcess(cfg.run_dir)
    return Workers(STUDY, cfg.run_dir, settings_file(cfg), cfg.workers, cfg.gpus_per_run)


def settings_file(cfg: ExperimentConfig) -> Path:
    """The settings in a file named by their hash in RUN/.grid/ (drivers with other arms or seeds write their own)."""
    text = yaml.safe_dump(rundir.to_jsonable(cfg), sort_keys=False)
    path = RunDir(cfg.run_dir).grid_config(hashlib.sha256(text.encode()).hexdigest()[:16])
    if not path.exists():
        rundir.atomic_write_text(path, text)
    return path


def units(cfg: ExperimentConfig) -> list[Unit]:
    """Every unit of the study, in the order one process runs them."""
    if not cfg.sweep:
        return experiment_units(cfg)
    found, points = [], sweep_points(cfg)
    for i, point in enumerate(points):
        links = {}
        for arm in cfg.arms:
            earlier = first_unchanged(cfg, points[:i], point, arm)
            if earlier is not None:
                changed = sorted(axis for axis in point if point[axis] != earlier[axis])
                links[arm] = Link(f"sweep/{point_name(earlier)}/", sweep_config(cfg, earlier).run_dir, changed)
        found += experiment_units(sweep_config(cfg, point), prefix=f"sweep/{point_name(point)}/", links=links)
    reports = tuple(f"sweep/{point_name(point)}/report" for point in points)
    return found + [Unit("report", "report", lambda: sweep_report(cfg), lambda: False, reports, in_driver=True)]


@dataclass(frozen=True)
class Link:
    """Where a sweep point finds an arm's run it would repeat unchanged: an earlier point's units and run directory,
    and the axes that differ (none of which the arm depends on)."""

    prefix: str
    run_dir: str
    changed: list[str]


def experiment_units(cfg: ExperimentConfig, prefix: str = "", links: dict[str, Link] | None = None) -> list[Unit]:
    """The units of one experiment (one sweep point) named under `prefix`; `links`: the arms this point links from an
    earlier point instead of training them again."""
    links = links or {}
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    data, profile = f"{prefix}data", f"{prefix}profile"
    oracle = oracle_arm(cfg.profile.proxy)  # the proxy is an arm's fine-tuned model: its run comes first
    reads = (data,) if oracle is None else (data, f"{prefix}arms/{oracle}/seed{cfg.profile.seed}")
    found = [
        Unit(data, "data", run=lambda: prepare_data(cfg), done=lambda: False, in_driver=True),
        Unit(profile, "profile", run=lambda: run_profile(cfg), done=lambda: profiled(cfg), after=reads),
    ]
    for features in dict.fromkeys([cfg.features] + [a.features or cfg.features for a in arms]):
        run, done = partial(run_split, cfg, features), partial(split_done, cfg, features)
        found.append(Unit(prefix + split_unit(cfg, features), "split", run=run, done=done, after=(profile,)))
    for arm, seed in itertools.product(arms, cfg.seeds):
        found += arm_units(cfg, arm, seed, prefix, links.get(arm.name))
    # the report shows the splits too: it waits for them even where no arm reads one (arms: [base])
    arm_runs = tuple(u.name for u in found if u.kind in ("split", "train", "link"))
    found.append(Unit(f"{prefix}report", "report", run=lambda: report(cfg), done=lambda: False,
                      after=(data, *arm_runs), in_driver=True))  # fmt: skip
    return found


def arm_units(cfg: ExperimentConfig, arm: ArmConfig, seed: int, prefix: str, link: Link | None) -> list[Unit]:
    """An arm and seed: its training set, then its training and evaluation (or, in a sweep point that would repeat
    an earlier point's run of it, a link to that run)."""
    where = f"{prefix}arms/{arm.name}/seed{seed}"
    done = partial(evaluated, cfg, RunDir(cfg.run_dir).seed_dir(arm.name, seed))
    if link is not None:
        source = f"{link.prefix}arms/{arm.name}/seed{seed}"
        return [Unit(where, "link", run=partial(link_arm, cfg, link, arm, seed), done=done, after=(source,))]
    reads = [f"{where}/data"]
    if arm.match_steps_of:
        reads.append(f"{prefix}arms/{arm.match_steps_of}/seed{seed}/data")
    arm_data = Unit(
        f"{where}/data",
        "upsample",
        run=partial(prepare_arm_data, cfg, arm, seed),
        done=RunDir(cfg.run_dir).seed_dir(arm.name, seed).counts.exists,
        # the data as given reads no split (so an arm:base proxy can profile with the base arm's model)
        after=(prefix + split_unit(cfg, arm.features or cfg.features),) if arm.reads_split else (f"{prefix}data",),
        in_driver=True,  # a second's work on files: a process or a job of its own would cost more than the work
    )
    return [arm_data, Unit(where, "train", run=partial(run_arm, cfg, arm, seed), done=done, after=tuple(reads))]


# ----------------------------------------------------------------------------- before any unit


def check_same_settings(cfg: ExperimentConfig) -> None:
    """Results in run_dir are reused only if made with these settings; otherwise refuse, or with
    `overwrite` delete what the experiment wrote there and start again."""
    run_dir = RunDir(cfg.run_dir)
    if not provenance.refuse_other_settings(run_dir.root, "experiment", cfg, ignore=NOT_COMPARED):
        return
    for path in run_dir.experiment_outputs():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare_data(cfg: ExperimentConfig) -> None:
    """The data read into RUN/data (every invocation: an edited source shows up as other data), and refused if its
    splits share examples."""
    check_splits_apart(cfg, data_files(cfg))


# ----------------------------------------------------------------------------- profile and split


def run_profile(cfg: ExperimentConfig) -> None:
    with progress.context("profile"):
        profile_run(profile_config(cfg))


def profile_config(cfg: ExperimentConfig):
    return dataclasses.replace(
        cfg.profile, proxy=proxy_model(cfg), run_dir=cfg.run_dir, data=data_paths(cfg)["train"], progress=cfg.progress
    )


def proxy_model(cfg: ExperimentConfig) -> str:
    """The profile's proxy; an `arm:NAME` proxy is that arm's fine-tuned model of seed profile.seed."""
    oracle = oracle_arm(cfg.profile.proxy)
    if oracle is None:
        return cfg.profile.proxy
    return str(RunDir(cfg.run_dir).seed_dir(oracle, cfg.profile.seed).train.model)


def profiled(cfg: ExperimentConfig) -> bool:
    meta = RunDir(cfg.run_dir).trajectories_meta
    return meta.exists() and bool(rundir.read_json(meta).get("complete"))


def split_unit(cfg: ExperimentConfig, features: str) -> str:
    """The split's unit: where it lives, "split" for the experiment's own features, else "splits/<features>"."""
    return "split" if features == cfg.features else f"splits/{features}"


def split_dir(cfg: ExperimentConfig, features: str | None) -> SplitDir:
    """Where the split with these features lives: the run directory for the experiment's own features."""
    own = features is None or features == cfg.features
    return RunDir(cfg.run_dir).split(None if own else features)


def split_config(cfg: ExperimentConfig, features: str) -> SplitConfig:
    return SplitConfig(
        run_dir=cfg.run_dir,
        features=features,
        stratify=cfg.stratify,
        small_sources=cfg.small_sources,
        small_source_rule=cfg.small_source_rule,
        min_source_size=cfg.min_source_size,
        hard_by=cfg.hard_by,
        seed=cfg.profile.seed,
        data=data_paths(cfg)["train"],
        out=str(split_dir(cfg, features).root),
    )


def split_done(cfg: ExperimentConfig, features: str) -> bool:
    """A split left by an earlier invocation is reused only if made with these settings (else one line, refused).
    Its paths are the experiment's own, inside the run directory: a run directory moved elsewhere continues."""
    out = split_dir(cfg, features)
    if not out.summary.exists():
        return False
    provenance.refuse_other_settings(out.root, "split", split_config(cfg, features), ignore=("run_dir", "data", "out"))
    return True


def run_split(cfg: ExperimentConfig, features: str) -> None:
    if not split_done(cfg, features):
        split_run(split_config(cfg, features))


def run_method(cfg: ExperimentConfig, files: dict | None = None) -> None:
    """The shared front of every arm, in this process: one profile, and one split per set of features the arms use
    (what the units profile and split/* do, for a caller that wants only them)."""
    run_profile(cfg)
    for features in dict.fromkeys([cfg.features] + [arm_spec(cfg, a).features or cfg.features for a in cfg.arms]):
        run_split(cfg, features)


# ----------------------------------------------------------------------------- an arm and seed


def prepare_arm_data(cfg: ExperimentConfig, arm: ArmConfig, seed: int) -> ArmDir:
    """Upsample for this arm and seed into arms/<arm>/seed<S>/ (examples.jsonl + manifest.parquet)."""
    out = RunDir(cfg.run_dir).seed_dir(arm.name, seed)
    if not out.counts.exists():
        files = data_paths(cfg)
        upsample_run(
            UpsampleConfig(
                run_dir=cfg.run_dir,
                distribution=arm.data,
                m=cfg.m,
                seed=seed,
                synth_fn=arm.synth_fn,
                data=files["train"],
                heldout=[f for name, f in files.items() if name != "train"],
                split_table=str(split_dir(cfg, arm.features).split) if arm.reads_split else None,
                out=str(out.root),
            )
        )
    return out


def arm_train_config(cfg: ExperimentConfig, arm: ArmConfig, seed: int, arm_dir: ArmDir) -> TrainConfig:
    tcfg = copy.deepcopy(cfg.train)
    tcfg.data = str(arm_dir.examples)
    tcfg.manifest = str(arm_dir.manifest)
    tcfg.val_data = data_paths(cfg).get("validation")
    tcfg.out = str(arm_dir.train.root)
    tcfg.seed = seed
    tcfg.progress = cfg.progress
    tcfg.run_name = f"{Path(cfg.run_dir).name}/{arm.name}/seed{seed}"  # the trackers' run: experiment/arm/seed
    if arm.optimizer:
        tcfg.optim = dataclasses.replace(tcfg.optim, name=arm.optimizer)
    if arm.match_steps_of:  # as many steps as the other arm's data makes (its unit data has run: a dependency)
        other = RunDir(cfg.run_dir).seed_dir(arm.match_steps_of, seed)
        tcfg.max_steps = total_steps(cfg.train, sum(rundir.read_manifest(other.manifest).values()))
    return tcfg


def evaluated(cfg: ExperimentConfig, arm_dir: ArmDir) -> bool:
    outputs = ("metrics", "lm_eval") if cfg.lm_eval else ("metrics",)
    return all(getattr(arm_dir.eval_on(name), o).exists() for name in benchmarks(cfg) for o in outputs)


def run_arm(cfg: ExperimentConfig, arm: ArmConfig, seed: int) -> dict:
    """Train (or find trained) and evaluate on every benchmark; returns {benchmark: metrics}."""
    with progress.context(f"{arm.name} seed{seed}"):
        arm_dir = RunDir(cfg.run_dir).seed_dir(arm.name, seed)
        files = data_paths(cfg)
        if not evaluated(cfg, arm_dir):
            tcfg = arm_train_config(cfg, arm, seed, arm_dir)
            recorder = CurveRecorder.for_arm(cfg, tcfg, arm_dir, files)
            if recorder is None:
                train_run(tcfg)
            else:
                train_run(tcfg, on_step=recorder, checkpoint_steps=set(recorder.steps))
        return {name: evaluate(cfg, arm_dir, files, name) for name in benchmarks(cfg)}


def evaluate(cfg: ExperimentConfig, arm_dir: ArmDir, files: dict, name: str) -> dict:
    """datalever's evaluation of the arm's saved model on one test set, then (with `lm_eval`) lm-eval's."""
    out = arm_dir.eval_on(name)
    if out.metrics.exists():
        metrics = rundir.read_json(out.metrics)
    else:
        eval_cfg = EvalConfig(
            model=str(arm_dir.train.model),
            data=eval_data(cfg, files, name),
            out=str(out.root),
            max_new_tokens=cfg.eval_max_new_tokens,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            chat_template=cfg.train.chat_template,
            trust_remote_code=cfg.train.trust_remote_code,
            progress=cfg.progress,
        )
        with progress.context(f"eval {name}"):
            metrics = eval_run(eval_cfg)
    if cfg.lm_eval and not out.lm_eval.exists():
        from datalever import lmeval

        with progress.context(f"lm-eval {name}"):
            lmeval.run(
                str(arm_dir.train.model),
                eval_data(cfg, files, name),
                out.root,
                # the question is taken back out of each prompt: the templates it may have been rendered with
                templates=[t for t in ((cfg.test_templates or {}).get(name), cfg.template) if t],
                fewshot=(cfg.lm_eval_fewshot or {}).get(name),
                batch_size=cfg.eval_batch_size,
                limit=cfg.eval_limit,
                trust_remote_code=cfg.train.trust_remote_code,
            )
    return metrics


# ----------------------------------------------------------------------------- the report


def report(cfg: ExperimentConfig) -> dict:
    arms = [arm_spec(cfg, name) for name in cfg.arms]
    return write_report(
        RunDir(cfg.run_dir).root,
        [a.name for a in arms],
        cfg.seeds,
        controls=CONTROL_ARMS,
        eval_split=cfg.eval_split,
        benchmarks=benchmarks(cfg),
        data_checks={"overlap": check_splits_apart(cfg, data_paths(cfg))},
        split_arms=[a.name for a in arms if a.data != "base"],
    )


# ----------------------------------------------------------------------------- a sweep


def sweep_report(cfg: ExperimentConfig) -> str:
    from datalever.report_sweep import write_sweep_report

    points = [point_name(point) for point in sweep_points(cfg)]
    return write_sweep_report(RunDir(cfg.run_dir).root, points, compare_splits=bool(set(cfg.sweep) & set(SPLIT_AXES)))


def arm_axes(cfg: ExperimentConfig, arm: ArmConfig) -> set[str]:
    """The sweep axes an arm's training depends on. An arm that trains the data as given (base, sam) depends on
    the epochs only: not on m, nor on the profile behind the split (fraction, K). Any other arm, on all of them."""
    if arm.reads_split:
        return set(SWEEP_AXES)
    if arm.match_steps_of is not None:  # the length of another arm's data (never itself matched: _check_arms)
        return {"epochs"} | arm_axes(cfg, arm_spec(cfg, arm.match_steps_of))
    return {"epochs"}


def first_unchanged(cfg: ExperimentConfig, earlier: list[dict], point: dict, arm: str) -> dict | None:
    """The first earlier sweep point whose run of `arm` this point would repeat unchanged (none of the axes the arm
    depends on differs), or None: base and sam across an m sweep train once."""
    axes = arm_axes(cfg, arm_spec(cfg, arm))
    return next((e for e in earlier if not {a for a in point if point[a] != e[a]} & axes), None)


def link_arm(cfg: ExperimentConfig, link: Link, arm: ArmConfig, seed: int) -> None:
    """Link into this point the earlier point's finished run of `arm`: the same settings and seed give the same run,
    so it is not repeated. The linked arm records where it came from (reused_from.json)."""
    from accelerate import PartialState

    source = RunDir(link.run_dir).seed_dir(arm.name, seed)
    target = RunDir(cfg.run_dir).seed_dir(arm.name, seed)
    with PartialState().main_process_first():  # under DDP one process links; the others then find the link
        if target.root.exists() and not evaluated(cfg, target):
            raise RuntimeError(
                f"{target.root} holds an unfinished run of {arm.name}, which this sweep point links from "
                f"{source.root} instead: remove it"
            )
        if not target.root.exists():
            link_tree(source.root, target.root, note={"source": str(source.root), "changed": link.changed})
            print(
                f"{arm.name} seed {seed}: reused from {source.root} (it does not depend on {' or '.join(link.changed)})"
            )


def link_tree(source: Path, target: Path, note: dict) -> None:
    """A copy of a directory made of hard links where the filesystem allows (a model's weights are not duplicated),
    with `note` as reused_from.json, built under a temporary name (rundir.atomic_dir): a crash never leaves a
    half-copied arm that looks finished."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, dst)

    with rundir.atomic_dir(target, keep_existing=True) as tmp:
        shutil.copytree(source, tmp, copy_function=link, dirs_exist_ok=True)
        rundir.write_json(ArmDir(tmp).reused_from, note)
