"""Launchers on this machine: one unit at a time in this process (the default), or N worker processes.

`InProcess` runs each unit here, with its claim held, as `datalever experiment` always did: its bars and lines go to
this terminal. `Workers` runs up to N units at once, each in a process of its own (`python -m datalever.grid.worker`)
whose output goes to the unit's log file (logs/<unit>.log), dividing the machine: on a CPU each unit gets cores / N
threads; on a GPU machine each unit sees only its own `gpus_per_run` devices (CUDA_VISIBLE_DEVICES), and a unit with
several runs under torchrun, one process per device, as `datalever train` does under DDP.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from datalever.grid.driver import Outcome
from datalever.grid.units import ClaimedElsewhere, Unit, claim_together
from datalever.preempt import REQUEUE_EXIT, Preempted
from datalever.rundir import RunDir

CLAIMED_EXIT = 73  # a worker found its unit claimed by another process (EX_CANTCREAT: the claim could not be made)
TAIL_LINES = 20  # the lines of a failed unit's log shown with its failure


class InProcess:
    """Each unit run here, one at a time."""

    capacity = 1
    synchronous = True  # start() returns when the unit has run

    def __init__(self, root: str | Path):
        self.root = root
        self.ended: list[Outcome] = []

    def start(self, unit: Unit) -> str:
        start = time.monotonic()
        try:
            with claim_together(self.root, unit.name):
                finished_elsewhere = unit.done()  # between its being found ready and its claim: nothing to do
                if not finished_elsewhere:
                    unit.run()
            outcome = Outcome(unit.name, "done", "finished by another process" if finished_elsewhere else "here")
        except ClaimedElsewhere:
            outcome = Outcome(unit.name, "elsewhere")
        except Preempted:
            raise  # this process was asked to stop: the driver stops with it (the unit's state is saved)
        except Exception as e:
            outcome = Outcome(unit.name, "failed", error=e, tail=f"{type(e).__name__}: {e}")
        outcome.seconds = time.monotonic() - start
        self.ended.append(outcome)
        return "here"

    def wait(self, timeout: float) -> list[Outcome]:
        ended, self.ended = self.ended, []
        return ended

    def stop(self) -> None:
        pass


def cpu_count() -> int:
    """The cores this process may run on (its affinity: a container's or a scheduler's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (its own setting, else every device)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class Workers:
    """Up to `workers` units at once, each in a worker process of its own, which rebuilds the units of the module
    `study` from `config_file`."""

    def __init__(self, study: str, root: str | Path, config_file: Path, workers: int, gpus_per_run: int = 0):
        self.study, self.root, self.config_file, self.capacity = study, Path(root), config_file, workers
        self.gpus_per_run = gpus_per_run
        self.free_gpus = visible_gpus() if gpus_per_run else []
        if gpus_per_run and len(self.free_gpus) < gpus_per_run * workers:
            raise ValueError(
                f"workers={workers} x gpus_per_run={gpus_per_run} needs {workers * gpus_per_run} GPUs; "
                f"{len(self.free_gpus)} are visible ({','.join(self.free_gpus) or 'none'})"
            )
        self.threads = max(1, cpu_count() // workers)
        self.procs: dict[str, tuple[subprocess.Popen, float, list[str], Path]] = {}

    def command(self, unit: Unit) -> list[str]:
        """The worker's command line (with several GPUs it claims the unit, then runs it under torchrun)."""
        processes = max(1, self.gpus_per_run)
        return [sys.executable, "-m", "datalever.grid.worker", "--study", self.study, "--config", str(self.config_file),
                "--unit", unit.name, "--processes", str(processes)]  # fmt: skip

    def environment(self, gpus: list[str]) -> dict[str, str]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        env["DATALEVER_THREADS"] = str(self.threads)
        env["TOKENIZERS_PARALLELISM"] = "false"
        if self.gpus_per_run:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def start(self, unit: Unit) -> str:
        gpus, self.free_gpus = self.free_gpus[: self.gpus_per_run], self.free_gpus[self.gpus_per_run :]
        log = RunDir(self.root).unit_log(unit.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command(unit))}\n")
            out.flush()
            # A session of its own: Ctrl-C at the driver's terminal reaches the driver alone, which then stops its
            # workers with SIGTERM (train and profile save the step in progress) instead of killing them mid-step.
            proc = subprocess.Popen(
                self.command(unit),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.environment(gpus),
                cwd=os.getcwd(),
                start_new_session=True,
            )
        self.procs[unit.name] = (proc, time.monotonic(), gpus, log)
        devices = f"GPU {','.join(gpus)}" if gpus else f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return f"pid {proc.pid}, {devices}, log {log}"

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        while True:
            ended = [self._outcome(name) for name, (proc, *_) in list(self.procs.items()) if proc.poll() is not None]
            if ended or time.monotonic() >= deadline or not self.procs:
                return ended
            time.sleep(0.1)

    def _outcome(self, name: str) -> Outcome:
        proc, start, gpus, log = self.procs.pop(name)
        self.free_gpus += gpus
        status = {0: "done", CLAIMED_EXIT: "elsewhere", REQUEUE_EXIT: "preempted"}.get(proc.returncode, "failed")
        tail = tail_of(log) if status == "failed" else ""
        where = f"pid {proc.pid}, exit {proc.returncode}"
        return Outcome(name, status, where, time.monotonic() - start, log, tail)

    def stop(self) -> None:
        """SIGTERM to every worker (train and profile save their state and exit), then wait for them."""
        for proc, *_ in self.procs.values():
            proc.terminate()
        for proc, *_ in self.procs.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def tail_of(log: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log (carriage-return redraws reduced to their last state)."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
    return "\n".join(shown[-lines:])
