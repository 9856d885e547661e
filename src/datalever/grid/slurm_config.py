"""What a SLURM cluster is asked for, per unit: `datalever experiment --launcher slurm --slurm.partition gpu ...`."""

from __future__ import annotations

from dataclasses import dataclass, field

from datalever import checks


@dataclass
class SlurmConfig:
    """SLURM settings for `--launcher slurm` (each unit is one job, submitted through submitit)."""

    partition: str | None = None
    """Partition to run in (sbatch --partition); default: the cluster's default partition."""
    account: str | None = None
    """Account to charge (sbatch --account)."""
    qos: str | None = None
    """Quality of service (sbatch --qos)."""
    time_min: int = 240
    """Time limit of each job, in minutes (sbatch --time). A unit that needs longer is stopped shortly before the limit
    with its state saved (`signal_delay_s`) and requeued; it then continues from there."""
    cpus_per_run: int | None = None
    """CPUs per job (sbatch --cpus-per-task); default: 8 per GPU with GPUs, else 2."""
    mem_per_run_gb: float | None = None
    """Memory per job in GB (sbatch --mem); default: the partition's."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which a job is warned (sbatch --signal=USR2@this): the step in progress
    finishes, a checkpoint is saved and the job requeues itself."""
    max_running: int | None = None
    """How many jobs of this experiment run at once (the driver submits no more); default: no limit of ours. Not
    with detach (the driver is not there to hold jobs back)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Other sbatch options, e.g. '{constraint: a100, exclude: node7}' (names without the leading --)."""
    detach: bool = False
    """Submit every unfinished unit (each waiting for the jobs of the units it reads) and return at once instead of
    waiting; rerun the same command later to see where the grid stands, retry what failed and write the report."""
    check_shared: bool = True
    """Refuse a run directory on a filesystem that other nodes cannot see (a local disk: ext4, xfs, tmpfs, overlay)
    when the cluster has nodes other than this one; false: run anyway (every job also checks, and fails with a line
    naming its node, when it cannot see the run directory)."""

    def __post_init__(self) -> None:
        checks.positive("slurm.time_min", self.time_min)
        checks.positive("slurm.cpus_per_run", self.cpus_per_run, optional=True)
        checks.positive("slurm.mem_per_run_gb", self.mem_per_run_gb, optional=True)
        checks.positive("slurm.signal_delay_s", self.signal_delay_s)
        checks.positive("slurm.max_running", self.max_running, optional=True)
        if self.signal_delay_s >= self.time_min * 60:
            raise checks.ConfigError(
                f"slurm.signal_delay_s={self.signal_delay_s} must be shorter than the time limit ({self.time_min} min)"
            )
        if self.detach and self.max_running is not None:
            raise checks.ConfigError("slurm.max_running needs the driver to wait: drop it, or slurm.detach")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise checks.ConfigError(f"slurm.extra maps sbatch option names to values, got {self.extra!r}")
