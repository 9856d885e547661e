"""The SLURM launcher: each unit a SLURM job, submitted through submitit, which the driver watches or leaves.

A job runs the unit as a local worker does (`UnitJob`: claim, run, exit status), on the node SLURM gives it, with
the resources `SlurmConfig` asks for. The driver records each job (RUN/.grid/jobs/<unit>.json), so that rerunning the
same command later reattaches to the jobs still queued or running instead of submitting them again, collects the
finished ones and retries what failed. With `detach` it submits every unfinished unit at once, each waiting for the
jobs of the units it reads (sbatch --dependency=afterok), and returns.

Preemption and time limits: SLURM sends the warning signal `signal_delay_s` before the limit (submitit asks for USR2)
and SIGTERM before a preemption or an `scontrol requeue`. While a unit trains or profiles, datalever's own handlers
(`preempt`) finish the step in progress and save a checkpoint; after the warning the job requeues itself, after
SIGTERM whoever sent it brings it back (or, `scancel`, does not). A requeued job restarts under the same id and the
unit continues from its checkpoint. Outside training, submitit's handler requeues the job on the warning (`UnitJob` is
checkpointable: it restarts as it started).

The run directory must be on a filesystem every node sees: the driver refuses one on a local disk when the cluster
has other nodes (`check_shared`), and every job checks it can see the run directory before it starts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths, pickle_load

from datalever import rundir
from datalever.grid.driver import Outcome
from datalever.grid.local import CLAIMED_EXIT, tail_of
from datalever.grid.slurm_config import SlurmConfig
from datalever.grid.units import Unit
from datalever.preempt import REQUEUE_EXIT, Preempted, requeue_slurm_job
from datalever.rundir import RunDir

LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs"}
RESULT_GRACE_S = 30.0  # how long a job that left the queue may take to show its result on a shared filesystem


class UnitJob(submitit.helpers.Checkpointable):
    """One unit as a SLURM job (submitit pickles it; its `checkpoint` requeues it as it started)."""

    def __init__(self, study: str, config_file: str, unit: str, processes: int):
        self.study, self.config_file, self.unit, self.processes = study, config_file, unit, processes

    def __call__(self) -> int:
        return run_job(self.study, self.config_file, self.unit, self.processes)


def run_job(study: str, config_file: str, unit: str, processes: int) -> int:
    """Inside the job: check the run directory is visible here, then run the unit as a worker does; the exit status.
    A unit stopped by a signal with its state saved leaves the job without a result (SLURM brings it back)."""
    from datalever.grid import worker

    if not Path(config_file).exists():
        raise RuntimeError(
            f"node {socket.gethostname()} cannot see the run directory ({config_file} is not there): put the run "
            "directory on a filesystem every node mounts"
        )
    threads = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads and "DATALEVER_THREADS" not in os.environ:
        os.environ["DATALEVER_THREADS"] = threads
    try:
        return worker.run_unit(study, config_file, unit, processes, reraise=(Preempted,))
    except Preempted as stopped:
        if stopped.warning:  # the time limit is near: nobody else brings the job back
            requeue_slurm_job()
        raise  # a BaseException: submitit writes no result, so the driver keeps waiting for the requeued job


class Slurm:
    """Units as SLURM jobs (`SlurmConfig`: partition, account, time, resources, a limit on jobs at once)."""

    def __init__(self, study: str, root: str | Path, config_file: Path, cfg: SlurmConfig, gpus_per_run: int = 0):
        self.study, self.root, self.config_file, self.cfg = study, Path(root), config_file, cfg
        self.gpus_per_run = gpus_per_run
        self.capacity = cfg.max_running or 1_000_000
        self.running: dict[str, tuple[str, float]] = {}  # unit -> (job id, when it left the queue or 0)
        self.detached = ""  # with detach: what was submitted, said to the user instead of a report
        check_cluster()
        if cfg.check_shared:
            check_shared(self.root)
        self.executor = self._executor()

    # ----------------------------------------------------------------- submitting

    def _executor(self):
        executor = submitit.AutoExecutor(folder=str(RunDir(self.root).slurm_jobs), cluster="slurm")
        params = {"timeout_min": self.cfg.time_min, "slurm_signal_delay_s": self.cfg.signal_delay_s}
        params["cpus_per_task"] = self.cfg.cpus_per_run or (8 * self.gpus_per_run if self.gpus_per_run else 2)
        params["tasks_per_node"], params["nodes"] = 1, 1
        if self.gpus_per_run:
            params["gpus_per_node"] = self.gpus_per_run
        if self.cfg.mem_per_run_gb:
            params["mem_gb"] = self.cfg.mem_per_run_gb
        for name in ("partition", "account", "qos"):
            if getattr(self.cfg, name):
                params[f"slurm_{name}"] = getattr(self.cfg, name)
        executor.update_parameters(**params)
        return executor

    def submit(self, unit: Unit, after: list[str] = ()) -> str:
        """Submit `unit` (waiting for the jobs `after`, if any); records and returns its job id."""
        extra = dict(self.cfg.extra)
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
        self.executor.update_parameters(name=f"datalever:{unit.name}", slurm_additional_parameters=extra)
        job = self.executor.submit(UnitJob(self.study, str(self.config_file), unit.name, max(1, self.gpus_per_run)))
        record = {"job_id": job.job_id, "folder": str(job.paths.folder), "submitted": time.time()}
        rundir.write_json(RunDir(self.root).job_record(unit.name), record)
        return job.job_id

    # ----------------------------------------------------------------- the launcher

    def start(self, unit: Unit) -> str:
        job_id = self.live_job(unit.name)
        how = "reattached to"
        if job_id is None:
            job_id, how = self.submit(unit), "submitted as"
        self.running[unit.name] = (job_id, 0.0)
        return f"{how} SLURM job {job_id}"

    def live_job(self, unit: str) -> str | None:
        """The job an earlier driver submitted for `unit`, if it is still queued or running."""
        record = RunDir(self.root).job_record(unit)
        if not record.exists():
            return None
        job_id = rundir.read_json(record)["job_id"]
        return job_id if job_id in queued([job_id]) else None

    def wait(self, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        while True:
            ended = self._ended()
            if ended or time.monotonic() >= deadline or not self.running:
                return ended
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _ended(self) -> list[Outcome]:
        live = queued([job for job, _ in self.running.values()])
        ended = []
        for unit, (job_id, left) in list(self.running.items()):
            if job_id in live:
                self.running[unit] = (job_id, 0.0)  # requeued jobs come back: the clock restarts
                continue
            outcome = self._outcome(unit, job_id)
            if outcome is None:  # out of the queue, its result not visible yet
                left = left or time.monotonic()
                self.running[unit] = (job_id, left)
                if time.monotonic() - left < RESULT_GRACE_S:
                    continue
                outcome = Outcome(unit, "failed", f"SLURM job {job_id}", log=self._paths(job_id).stdout)
                outcome.tail = (tail_of(outcome.log) + f"\nSLURM job {job_id} ended without a result").strip()
            del self.running[unit]
            ended.append(outcome)
        return ended

    def _outcome(self, unit: str, job_id: str) -> Outcome | None:
        """How the job ended, from submitit's result file (None while it is not there)."""
        paths = self._paths(job_id)
        if not paths.result_pickle.exists():
            return None
        where = f"SLURM job {job_id}"
        kind, value = pickle_load(paths.result_pickle)
        if kind != "success":
            return Outcome(unit, "failed", where, log=paths.stdout, tail=(tail_of(paths.stderr) or str(value)).strip())
        status = {0: "done", CLAIMED_EXIT: "elsewhere", REQUEUE_EXIT: "preempted"}.get(value, "failed")
        tail = tail_of(paths.stderr) if status == "failed" else ""
        return Outcome(unit, status, where, log=paths.stdout, tail=tail)

    def _paths(self, job_id: str) -> JobPaths:
        return JobPaths(RunDir(self.root).slurm_jobs, job_id=job_id)

    def stop(self) -> None:
        """The driver is stopped: the jobs go on (rerun the same command to reattach)."""
        if self.running:
            jobs = ", ".join(job for job, _ in self.running.values())
            print(f"[grid] SLURM jobs {jobs} go on; rerun the same command to reattach", flush=True)

    # ----------------------------------------------------------------- detach

    def submit_all(self, units: list[Unit]) -> str:
        """Submit every unfinished unit at once, each after the jobs of the unfinished units it reads (bookkeeping
        the driver does, reading the data in, is done first; the report is written by a later rerun)."""
        jobs: dict[str, str] = {}
        by_name = {u.name: u for u in units}
        for unit in units:  # the study lists units after the units they read
            if unit.kind == "report" or unit.done():
                continue
            if unit.kind == "data":
                unit.run()
                continue
            waits = [jobs[name] for name in unit.after if name in jobs and by_name[name].kind != "data"]
            jobs[unit.name] = self.live_job(unit.name) or self.submit(unit, after=waits)
        self.detached = (
            f"submitted or found queued {len(jobs)} SLURM jobs ({', '.join(jobs.values()) or 'none'}); "
            "rerun the same command to see where they stand, retry what failed and write the report"
        )
        return self.detached


def queued(job_ids: list[str]) -> set[str]:
    """The jobs among `job_ids` that SLURM still holds (pending, running, requeued, suspended...)."""
    if not job_ids:
        return set()
    done = subprocess.run(
        ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=60
    )
    return set(done.stdout.split()) & set(job_ids) if done.returncode == 0 else set()


def check_cluster() -> None:
    missing = [tool for tool in ("sbatch", "squeue", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"launcher slurm: {', '.join(missing)} not found: run where SLURM's client commands are")
    probe = subprocess.run(["squeue", "-h", "-o", "%i", "-u", "nobody"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise RuntimeError(
            f"launcher slurm: SLURM does not answer ({' '.join(probe.stderr.split()) or 'squeue failed'})"
        )


def filesystem_type(path: Path) -> str:
    """The type of the filesystem `path` lies on (the longest mount point of /proc/mounts above it)."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (path == Path(point) or Path(point) in path.parents) and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def cluster_nodes() -> set[str]:
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=60)
    return set(done.stdout.split()) if done.returncode == 0 else set()


def check_shared(root: Path) -> None:
    """Refuse a run directory on a local disk when the cluster has nodes other than this one: their jobs could not
    see it."""
    root.mkdir(parents=True, exist_ok=True)
    kind = filesystem_type(root)
    here = socket.gethostname().split(".")[0]
    others = sorted(cluster_nodes() - {here})
    if kind in LOCAL_FILESYSTEMS and others:
        nodes = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise RuntimeError(
            f"launcher slurm: {root} is on a local {kind} filesystem, which the cluster's other nodes ({nodes}) cannot "
            "see: use a run directory on a shared filesystem (NFS, Lustre, GPFS, BeeGFS), or --slurm.check_shared "
            "false if it is shared after all"
        )
