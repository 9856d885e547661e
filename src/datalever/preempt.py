"""Preemption: a signal asks a long run to stop at the next step boundary, save a checkpoint and exit with a status
that means "requeue me", instead of dying with everything since its last timed checkpoint lost.

The signals: SIGTERM (what `kill`, a preempting scheduler and SLURM's `scontrol requeue` send before SIGKILL) and the
warnings a SLURM job asks for before its time runs out (`--signal=USR1@120`, or submitit's USR2). `train` and
`profile` listen while their optimizer steps run (`listening`): the step in progress finishes, every process agrees
to stop at the same step (`StopRequest.agreed`), a checkpoint is saved and `Preempted` is raised. The command line
turns it into exit status `REQUEUE_EXIT` (75, EX_TEMPFAIL: "try again"); rerunning the same command resumes from that
checkpoint and ends where an uninterrupted run ends.

Who requeues: after SIGTERM, whoever sent it (a scheduler that preempts or requeues brings the job back, `scancel`
does not mean it to come back); after a warning signal inside a SLURM job the job requeues itself
(`requeue_slurm_job`), since its time limit would otherwise end it for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterator

REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped on request with its state saved; run again to continue
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2")  # a scheduler's "your time is nearly up": nobody else will requeue


class Preempted(BaseException):
    """A run stopped on a signal after saving its state at `step` (a BaseException, like KeyboardInterrupt: no
    `except Exception` on the way up takes it for a failure)."""

    def __init__(self, signal_name: str, step: int, where: str):
        self.signal_name, self.step, self.where = signal_name, step, where
        super().__init__(f"stopped by {signal_name} after step {step}; its checkpoint is in {where}")

    @property
    def warning(self) -> bool:
        """A time-limit warning (the job must requeue itself), not a SIGTERM from whoever will bring it back."""
        return self.signal_name in WARNING_SIGNALS


class StopRequest:
    """The first stop signal received while listening (None: none)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum: int, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def agreed(self, accelerator) -> str | None:
        """The signal every process stops for, or None: under several processes one that got a signal stops them
        all at the same step (a checkpoint's gathers are collectives). One int per step beside the step's own
        all-reduce."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signal_name
        import torch
        import torch.distributed as dist

        code = STOP_SIGNALS.index(self.signal_name) + 1 if self.signal_name else 0
        flag = torch.tensor([code], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return STOP_SIGNALS[int(flag.item()) - 1] if int(flag.item()) else None


@contextmanager
def listening() -> Iterator[StopRequest]:
    """Catch the stop signals while the block runs (their earlier handlers come back after it). Outside the main
    thread Python cannot install handlers: the request then never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    earlier = {name: signal.signal(getattr(signal, name), request) for name in STOP_SIGNALS}
    try:
        yield request
    finally:
        for name, handler in earlier.items():
            signal.signal(getattr(signal, name), handler)


def requeue_slurm_job() -> bool:
    """Inside a SLURM job, ask SLURM to requeue it (it restarts with the same job id and resumes from the saved
    state); False outside one, or when SLURM refuses."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    return done.returncode == 0
