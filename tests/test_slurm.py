"""The grid through a real SLURM cluster (one node, started by the `slurm_cluster` fixture; skipped where SLURM is not
installed): the quick study's units as jobs, one of them preempted from outside while it trains (`scontrol
requeue`), and the report, weights and predictions equal to the same study run here, one unit at a time."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from datalever import experiment
from datalever.demo import shipped_config
from datalever.grid.slurm_config import SlurmConfig
from datalever.rundir import RunDir
from factories import comparable_results

pytestmark = pytest.mark.slow


def quick(run_dir: Path, **changes):
    cfg = shipped_config("quick")
    cfg.run_dir, cfg.arms, cfg.seeds, cfg.progress = str(run_dir), ["base", "hard"], [0], False
    cfg.train.epochs = 8  # 48 steps: long enough to preempt one while it trains
    return dataclasses.replace(cfg, **changes)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def requeue_once_it_trains(run_dir: Path, unit: str, seen: dict) -> None:
    """Watch for `unit`'s job, wait until it has trained a few steps, and requeue it from outside (SIGTERM, then the
    job goes back to the queue), as a preempting scheduler does."""
    record = RunDir(run_dir).job_record(unit)
    log = RunDir(run_dir).seed_dir("hard", 0).train.log
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if record.exists() and log.exists() and len(log.read_text().splitlines()) >= 3:
            seen["job"] = json.loads(record.read_text())["job_id"]
            seen["steps_before"] = len(log.read_text().splitlines())
            seen["requeue"] = subprocess.run(["scontrol", "requeue", seen["job"]], capture_output=True, text=True)
            return
        time.sleep(0.05)


def test_the_quick_grid_through_slurm_survives_a_requeue_and_reports_as_the_local_run(slurm_cluster, tmp_path):
    local = tmp_path / "local"
    experiment.run(quick(local))  # one unit at a time, here, one thread (as each job below)

    on_slurm = tmp_path / "slurm"
    seen: dict = {}
    watcher = threading.Thread(target=requeue_once_it_trains, args=(on_slurm, "arms/hard/seed0", seen), daemon=True)
    watcher.start()
    cfg = quick(on_slurm, launcher="slurm", slurm=SlurmConfig(cpus_per_run=1, time_min=30, signal_delay_s=60))
    experiment.run(cfg)
    watcher.join(timeout=10)

    assert seen.get("requeue") is not None and seen["requeue"].returncode == 0, seen
    job = subprocess.run(["scontrol", "show", "job", seen["job"]], capture_output=True, text=True).stdout
    assert "Restarts=1" in job, job  # preempted once, run again under the same id
    hard = RunDir(on_slurm).seed_dir("hard", 0)
    steps = [json.loads(line)["step"] for line in hard.train.log.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # every step once: nothing redone twice, nothing lost
    out = next(Path(json.loads(RunDir(on_slurm).job_record("arms/hard/seed0").read_text())["folder"]).glob("*.out"))
    assert "resuming from" in out.read_text()  # from the checkpoint SIGTERM made, not from the start

    assert comparable_results(on_slurm) == comparable_results(local)
    for arm in ("base", "hard"):
        here, there = RunDir(local).seed_dir(arm, 0), RunDir(on_slurm).seed_dir(arm, 0)
        assert digest(there.train.model / "model.safetensors") == digest(here.train.model / "model.safetensors")
        assert digest(there.eval.predictions) == digest(here.eval.predictions)


def test_a_rerun_reattaches_and_a_finished_grid_is_only_reported(slurm_cluster, tmp_path):
    """Detached: every unit submitted at once, each after the jobs it reads; the same command later finds them
    finished (or waits for them) and writes the report without submitting anything again."""
    cfg = quick(tmp_path / "run", slurm=SlurmConfig(cpus_per_run=1, time_min=30, signal_delay_s=60, detach=True))
    cfg = dataclasses.replace(cfg, launcher="slurm")
    said = experiment.run(cfg)
    assert "rerun the same command" in said and not RunDir(cfg.run_dir).results_json.exists()
    jobs = {p: json.loads(p.read_text())["job_id"] for p in RunDir(cfg.run_dir).grid.rglob("jobs/**/*.json")}
    assert len(jobs) == 6  # profile, split, and for each arm its data and its training (no driver to build the data)
    attached = dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, detach=False))
    experiment.run(attached)
    assert RunDir(cfg.run_dir).results_json.exists()
    again = {p: json.loads(p.read_text())["job_id"] for p in RunDir(cfg.run_dir).grid.rglob("jobs/**/*.json")}
    assert again == jobs  # nothing submitted twice
