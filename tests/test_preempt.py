"""Preemption: a stop signal ends a run after the step in progress with a checkpoint and exit status 75, and the
rerun ends bit-identical to a run never interrupted (the reference: an uninterrupted run of the same config)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datalever import preempt, train
from datalever.optim import OptimConfig
from datalever.rundir import TrainDir
from datalever.train import checkpoint
from factories import assert_same_weights, read_log, synth_splits, train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_splits(tmp_path_factory)


def signal_at(step: int, signum: int):
    def hook(at, *_):
        if at == step:
            os.kill(os.getpid(), signum)

    return hook


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.parametrize("name", ["adamw", "sam"])
def test_a_signal_saves_the_step_in_progress_and_the_rerun_ends_the_same(data, tmp_path, signum, name):
    """No checkpoint by time or step count: the only one is the one the signal asks for, at step 3."""
    kw = dict(max_steps=6, save_every_minutes=0, optim=OptimConfig(name=name, lr=3e-3))
    reference = train_config(data, tmp_path / "reference", **kw)
    train.run(reference)

    cfg = train_config(data, tmp_path / "stopped", **kw)
    with pytest.raises(preempt.Preempted) as stopped:
        train.run(cfg, on_step=signal_at(3, signum))
    assert stopped.value.step == 3 and stopped.value.signal_name == signal.Signals(signum).name
    assert stopped.value.warning == (signum == signal.SIGUSR1)
    assert checkpoint.latest(TrainDir(cfg.out)) == TrainDir(cfg.out).checkpoint(3)
    assert not TrainDir(cfg.out).summary.exists()
    assert [r["step"] for r in read_log(cfg.out)] == [1, 2, 3]

    resumed = []
    train.run(cfg, on_step=lambda step, *_: resumed.append(step))
    assert resumed == [4, 5, 6]
    assert_same_weights(TrainDir(reference.out).model, TrainDir(cfg.out).model)
    assert read_log(cfg.out) == [{**r, "tokens_per_s": r2["tokens_per_s"], "compute_wall_s": r2["compute_wall_s"]}
                                 for r, r2 in zip(read_log(reference.out), read_log(cfg.out))]  # fmt: skip


def test_the_handlers_are_put_back_after_the_run(data, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    train.run(train_config(data, tmp_path / "run", max_steps=1))
    assert signal.getsignal(signal.SIGTERM) is before


def test_kill_term_of_the_command_saves_exits_75_and_the_rerun_resumes(data, tmp_path):
    """What a user (or a scheduler) does: `kill -TERM` of a running `datalever train`."""
    out = tmp_path / "run"
    args = ["--model", "preset:tiny", "--data", data["train"], "--out", str(out), "--max_steps", "60"]
    args += ["--batch_size", "8", "--micro_batch_size", "8", "--optim.lr", "3e-3", "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "datalever", "train", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    log = TrainDir(out).log
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == preempt.REQUEUE_EXIT, stderr
    assert "stopped by SIGTERM after step" in stderr and "rerun the same command" in stderr
    step = checkpoint.latest(TrainDir(out))
    assert step is not None and int(step.name.split("-")[1]) == len(read_log(out)) < 60

    again = subprocess.run([sys.executable, "-m", "datalever", "train", *args], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    reference = train_config(
        data, tmp_path / "reference", val_data=None, max_steps=60, micro_batch_size=8, warmup_ratio=0.03
    )
    train.run(reference)
    assert_same_weights(TrainDir(reference.out).model, TrainDir(out).model)
