"""The grid: units run after what they read, finished units are never rerun, a failure is reported while the rest goes
on, a claim keeps two processes from running one unit and is taken over when its holder dies; local workers give the
same numbers as one unit at a time; plain progress lines in a log. The references are hand-built graphs whose runs
are recorded, and the same study run in one process."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datalever import experiment, progress
from datalever.demo import shipped_config
from datalever.grid import driver
from datalever.grid.local import InProcess
from datalever.grid.units import ClaimedElsewhere, Unit, check_graph, claim, claimed_elsewhere
from datalever.rundir import RunDir
from factories import comparable_results

ROOT = Path(__file__).resolve().parents[1]


def graph(ran: list, fail: set = frozenset(), done: set = frozenset()) -> list[Unit]:
    """a -> b -> d, a -> c: each unit appends its name when it runs; those in `fail` raise; those in `done` are
    finished already."""

    def make(name, after=()):
        def run():
            ran.append(name)
            if name in fail:
                raise ValueError(f"{name} broke")

        return Unit(name, "work", run=run, done=lambda: name in done or name in ran and name not in fail, after=after)

    return [make("a"), make("b", ("a",)), make("c", ("a",)), make("d", ("b",))]


def test_units_run_after_what_they_read_and_finished_ones_are_not_run_again(tmp_path):
    ran = []
    driver.run(graph(ran, done={"a"}), tmp_path, InProcess(tmp_path), show=False)
    assert ran == ["b", "c", "d"]  # a finished before; each after the units it reads, in the graph's order


def test_a_failure_is_reported_after_the_rest_and_a_rerun_retries_only_what_is_unfinished(tmp_path):
    ran = []
    with pytest.raises(ValueError, match="b broke"):  # one failure here: its own exception
        driver.run(graph(ran, fail={"b"}), tmp_path, InProcess(tmp_path), show=False)
    assert ran == ["a", "b", "c"]  # c does not read b: it ran; d reads b: it did not
    again = []
    driver.run(graph(again, done={"a", "c"}), tmp_path, InProcess(tmp_path), show=False)
    assert again == ["b", "d"]


def test_two_failures_are_named_together(tmp_path):
    with pytest.raises(driver.GridFailed, match=r"2 unit\(s\) failed: b, c"):
        driver.run(graph([], fail={"b", "c"}), tmp_path, InProcess(tmp_path), show=False)


@pytest.mark.parametrize(
    "units, message",
    [
        ([Unit("a", "w", print, bool), Unit("a", "w", print, bool)], "two units are named 'a'"),
        ([Unit("a", "w", print, bool, ("z",))], "waits for \\['z'\\]"),
        ([Unit("a", "w", print, bool, ("b",)), Unit("b", "w", print, bool, ("a",))], "in a circle: a -> b -> a"),
    ],
)
def test_a_broken_graph_is_refused(units, message):
    with pytest.raises(ValueError, match=message):
        check_graph(units)


HOLD = """
import sys, time
from datalever.grid.units import claim
with claim(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_claim(root: Path, unit: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root), unit], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_claim_is_exclusive_across_processes_and_free_once_its_holder_is_killed(tmp_path):
    holder = hold_claim(tmp_path, "arms/hard/seed0")
    try:
        assert claimed_elsewhere(tmp_path, "arms/hard/seed0")
        with pytest.raises(ClaimedElsewhere):
            with claim(tmp_path, "arms/hard/seed0"):
                pass
        with claim(tmp_path, "arms/base/seed0"):  # another unit: its own claim
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup of its own; the kernel lets the lock go
        holder.wait()
    assert not claimed_elsewhere(tmp_path, "arms/hard/seed0")


def test_a_unit_claimed_elsewhere_is_left_to_its_holder_and_taken_over_when_it_dies(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "POLL_S", 0.05)
    holder = hold_claim(tmp_path, "b")
    ran = []

    def kill_holder_after_c():  # c runs while b is held elsewhere; then b's holder dies without finishing it
        ran.append("c")
        holder.kill()
        holder.wait()

    units = graph(ran)
    units[2] = dataclasses.replace(units[2], run=kill_holder_after_c)
    driver.run(units, tmp_path, InProcess(tmp_path), show=False)
    assert ran == ["a", "c", "b", "d"]  # b was left while claimed, then taken over


def test_in_a_log_a_bar_is_a_plain_line_every_tenth_not_a_redraw_per_update():
    out = io.StringIO()
    with progress.bar(total=1000, desc="train adamw", file=out) as bar:
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10 and lines[-1].startswith("train adamw: 1000/1000 (100%)")
    assert lines[0].startswith("train adamw: 100/1000 (10%)") and lines[0].endswith("loss=0.5")


def test_a_bar_also_writes_a_line_every_so_often(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    out = io.StringIO()
    bar = progress.bar(total=10_000, desc="x", file=out)
    for _ in range(5):
        clock["t"] += progress.LINE_EVERY_S
        bar.update(1)  # 5 of 10000: no tenth reached, but 30 s passed each time
    bar.close()
    assert len(out.getvalue().splitlines()) == 5


# ----------------------------------------------------------------------------- the study's units


def quick(run_dir, **changes):
    cfg = shipped_config("quick")
    cfg.run_dir, cfg.progress = str(run_dir), False
    return dataclasses.replace(cfg, **changes)


def test_the_study_s_units_read_what_they_need(tmp_path):
    cfg = quick(tmp_path, arms=["base", "hard", "base-long", "hard-final"], seeds=[0])
    units = {u.name: u for u in experiment.units(cfg)}
    assert units["profile"].after == ("data",)
    assert units["split"].after == units["splits/final"].after == ("profile",)
    assert units["arms/hard-final/seed0/data"].after == ("splits/final",)
    assert units["arms/base-long/seed0"].after == ("arms/base-long/seed0/data", "arms/hard/seed0/data")
    assert set(units["report"].after) == {"data", "split", "splits/final", *(f"arms/{a}/seed0" for a in cfg.arms)}
    assert units["arms/base/seed0/data"].after == ("data",)  # the data as given reads no split
    assert [u.name for u in units.values() if u.in_driver] == ["data", *(f"arms/{a}/seed0/data" for a in cfg.arms),
                                                               "report"]  # fmt: skip


def test_new_grid_options_are_checked_before_any_work(tmp_path):
    from datalever.checks import ConfigError
    from datalever.grid.slurm_config import SlurmConfig

    for changes, message in [
        ({"workers": 0}, "workers must be > 0"),
        ({"gpus_per_run": -1}, "gpus_per_run must be >= 0"),
        ({"launcher": "ray"}, "launcher must be one of local, slurm"),
        ({"launcher": "slurm", "workers": 2}, "with launcher slurm use slurm.max_running"),
    ]:
        with pytest.raises(ConfigError, match=message):
            quick(tmp_path, **changes)
    with pytest.raises(ConfigError, match="signal_delay_s=600 must be shorter"):
        SlurmConfig(time_min=5, signal_delay_s=600)
    with pytest.raises(ConfigError, match="max_running needs the driver to wait"):
        SlurmConfig(detach=True, max_running=2)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- processes (slow)


def digests(run_dir: Path, arms, seeds) -> dict:
    found = {}
    for arm in arms:
        for seed in seeds:
            d = RunDir(run_dir).seed_dir(arm, seed)
            for path in (d.train.model / "model.safetensors", d.eval.predictions, d.curve):
                found[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def experiment_command(run_dir: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "datalever", "experiment", "--config", str(ROOT / "configs" / "quick.yaml"),
            "--run_dir", str(run_dir), "--progress", "false", *options]  # fmt: skip


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_two_workers_give_the_numbers_of_one_unit_at_a_time(tmp_path):
    """--workers 2 (a thread each) against the same units one at a time here, with one thread: weights, predictions,
    curves and results bit-identical."""
    subprocess.run(experiment_command(tmp_path / "one"), env=ONE_THREAD, check=True, capture_output=True)
    shown = ["--workers", "2", "--progress", "true"]  # bars change no number: here they show what a unit's log holds
    two = subprocess.run(experiment_command(tmp_path / "two", *shown), env=ONE_THREAD, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "started arms/hard/seed1" in two.stderr and "1 thread" in two.stderr
    arms, seeds = ["base", "hard", "random"], [0, 1]
    assert digests(tmp_path / "two", arms, seeds) == digests(tmp_path / "one", arms, seeds)
    assert comparable_results(tmp_path / "two") == comparable_results(tmp_path / "one")
    log = RunDir(tmp_path / "two").unit_log("arms/hard/seed0").read_text()
    assert "\r" not in log and "train adamw: " in log  # plain progress lines in a unit's log, no redraws


@pytest.mark.slow
def test_two_drivers_on_one_run_directory_never_run_a_unit_twice(tmp_path):
    """What once went wrong: two experiments started together on one run directory both trained the same arms into
    the same log. Now each unit is claimed: every step is logged once, and both drivers end with the same report."""
    run = tmp_path / "run"
    drivers = [subprocess.Popen(experiment_command(run), env=ONE_THREAD, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [d.communicate(timeout=1200) for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [err[-2000:] for _, err in outputs]
    for arm in ("base", "hard", "random"):
        for seed in (0, 1):
            log = RunDir(run).seed_dir(arm, seed).train.log.read_text().splitlines()
            steps = [json.loads(line)["step"] for line in log]
            assert steps == list(range(1, len(steps) + 1)), (arm, seed)
    lines = [line for _, err in outputs for line in err.splitlines() if line.startswith("[grid]")]
    finished = [line.split()[3] for line in lines if " finished arms/" in line and line.endswith("(here)")]
    assert sorted(finished) == sorted(f"arms/{a}/seed{s}" for a in ("base", "hard", "random") for s in (0, 1))
    assert "claimed by another process" in outputs[0][1] + outputs[1][1]


@pytest.mark.slow
def test_a_failed_unit_names_its_log_and_last_lines_while_the_others_finish(tmp_path):
    """A split that cannot be made (relative features need two recorded steps; the profile records one) fails in its
    worker; the arms that do not read it finish; the driver exits non-zero naming the unit and its log."""
    options = ["--workers", "2", "--seeds", "[0]", "--arms", "[base, rel]", "--profile.checkpoints", "1"]
    options += ["--extra_arms", "[{name: rel, data: hard, features: relative}]"]
    done = subprocess.run(experiment_command(tmp_path, *options), env=ONE_THREAD, capture_output=True, text=True)
    assert done.returncode == 2
    log = RunDir(tmp_path).unit_log("splits/relative")
    assert "failed: splits/relative" in done.stderr and str(log) in done.stderr
    assert "relative" in log.read_text() and "needs" in done.stderr  # the log's last lines, shown
    assert RunDir(tmp_path).seed_dir("base", 0).eval.metrics.exists()  # the unit that does not read it finished
    assert not RunDir(tmp_path).seed_dir("rel", 0).root.exists()
    assert "1 unit(s) failed: splits/relative" in done.stderr and "rerun the same command" in done.stderr


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_unit_on_several_processes_runs_under_torchrun_with_its_claim_held_by_the_worker(tmp_path):
    """What --gpus_per_run 2 starts for a unit (here on CPUs: torchrun with two gloo processes): the worker claims the
    unit, runs it under torchrun, and the arm trains on two processes."""
    from datalever.experiment.study import settings_file

    cfg = quick(tmp_path, arms=["base"], seeds=[0])
    units = {u.name: u for u in experiment.units(cfg)}
    for name in ("data", "profile", "split", "arms/base/seed0/data"):
        units[name].run()
    command = [sys.executable, "-m", "datalever.grid.worker", "--study", "datalever.experiment", "--config",
               str(settings_file(cfg)), "--unit", "arms/base/seed0", "--processes", "2"]  # fmt: skip
    done = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(RunDir(tmp_path).seed_dir("base", 0).train.summary.read_text())
    assert summary["world_size"] == 2 and units["arms/base/seed0"].done()
