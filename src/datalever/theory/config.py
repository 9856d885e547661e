"""The options of `datalever theory`: one dataclass, whose field docstrings are the CLI's --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from datalever import checks


@dataclass
class TheoryConfig:
    """Simplicity bias of GD, SAM (global / per-head) and hard-example upsampling in multi-head linear
    attention trained on in-context linear regression; see docs/theory.md."""

    out: str = "runs/theory"
    """Output directory for the table (results.md), the numbers (results.json) and the plots."""
    d: int = 8
    """Input dimension (number of eigenvectors of Sigma)."""
    eigenvalues: Optional[list[float]] = None
    """Eigenvalues of Sigma (distinct, any order; sorted descending). None: `d` values spaced geometrically
    from `eig_max` to `eig_min`."""
    eig_max: float = 1.0
    """Largest eigenvalue when `eigenvalues` is None."""
    eig_min: float = 0.25
    """Smallest eigenvalue when `eigenvalues` is None."""
    rotate: bool = True
    """Random (seeded, fixed) orthonormal eigenbasis for Sigma; False: the coordinate axes."""
    context: int = 32
    """Context length N (tokens with a label before the query); also the 1/N in the model."""
    heads: int = 16
    """Number of attention heads H (rank-one key and query, one value row each)."""
    init_scale: float = 0.05
    """Std of every parameter at random init; also the per-factor scale v0 of the aligned init."""
    lr: float = 0.1
    """Step size; time t = step * lr approximates gradient-flow time (tau = 1 for the half-MSE loss)."""
    steps: int = 6000
    """Training steps per run (full-batch GD / SAM on the pool)."""
    log_every: int = 10
    """Record the learned map, train and test loss every this many steps."""
    rho_per_head: float = 0.02
    """SAM radius with the perturbation normalized per head (each head moved by rho). An aligned head stalls at
    the saddle from rho = sqrt(3) x init_scale; from a random init small heads stall earlier (docs/theory.md)."""
    rho_global: float = 0.15
    """SAM radius with the perturbation normalized by the run's global gradient norm. Its limit is not sqrt(3) x
    init_scale: in the default setting every seed learns every direction up to 0.2 (4 x init_scale) and seeds
    stall from 0.25 (the sweep); the entropy it gains there is a longer wait at the saddle (docs/theory.md)."""
    seeds: int = 5
    """Number of seeds (each: its own pool, test set, proxy and random init, shared by all arms)."""
    seed: int = 0
    """First seed; seeds are seed, seed+1, ..."""
    pool: int = 16384
    """Training pool size (sequences) per seed; GD is full-batch on it."""
    test: int = 16384
    """Fresh test sequences per seed."""
    record_fraction: float = 0.1
    """Length of the proxy GD run (own random init) whose per-sequence losses pick the hard sequences, as a
    fraction of the target's run (`steps`): the practical method records a proxy over 1/3 epoch while the
    target trains 3 epochs, about 1/9 of the target's passes. 0.1 of the default run is t=60, about the
    top half of the directions learned."""
    proxy_checkpoints: int = 8
    """Number of evenly spaced checkpoints in the proxy run at which each sequence's loss is recorded."""
    hard_features: list[str] = field(default_factory=lambda: ["loss", "final"])
    """One reshaped arm per entry, each k-means (k=2) on: 'loss' (raw loss trajectory, the practical method),
    'final' (last checkpoint's loss only, the paper's ablation), 'log' (log loss trajectory), 'ratio' (log of
    loss[t+1]/loss[t])."""
    upsample: float = 3.0
    """Each hard sequence counts this many times in the reshaped pool (3.0 = the paper's m=2)."""
    controls: bool = True
    """Also train GD on two control pools: as many easy (lowest mean proxy loss) or random sequences as the
    first hard cluster, upsampled alike."""
    aligned: bool = True
    """Also train every arm from the aligned init (the ODE ansatz) and compare with the reduced ODEs."""
    ode_dt: float = 0.05
    """RK4 step of the plotted reduced-ODE curves (the ODE learning times use quadrature / an adaptive
    solver)."""
    final_window: float = 0.05
    """Fraction of the logged trajectory, at its end, averaged to give each direction's final value."""
    sweep: bool = True
    """Also train SAM (random init, every seed) at each radius of `sweep_rho_per_head` and `sweep_rho_global`,
    and integrate the reduced ODEs on the same radii: entropy, stalls and test loss against rho."""
    sweep_rho_per_head: list[float] = field(
        default_factory=lambda: [0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.087, 0.1, 0.13]
    )
    """Radii of the per-head sweep: up to and past the aligned stall radius sqrt(3) x init_scale (0.087)."""
    sweep_rho_global: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4]
    )
    """Radii of the global sweep: up to and past where seeds stall."""
    search: bool = True
    """Also train GD (random init, every seed) on every reshaped pool of the grid `search_features` x
    `search_upsample` x `search_record_fraction`: how far the data lever gets toward SAM."""
    search_features: list[str] = field(default_factory=lambda: ["loss", "final"])
    """Hard-cluster features of the search (as `hard_features`)."""
    search_upsample: list[float] = field(default_factory=lambda: [2.0, 3.0, 5.0, 10.0])
    """Upsampling factors of the search (how many times each hard sequence counts)."""
    search_record_fraction: list[float] = field(default_factory=lambda: [0.05, 0.1, 1 / 6, 1 / 3, 0.5])
    """Proxy recording fractions of the search (as `record_fraction`)."""
    confirm: bool = True
    """Rerun GD, the best non-stalling SAM of each normalization and the best reshaped pool (chosen on the sweep
    and search seeds by entropy alone) on as many fresh seeds, so the winners are not measured on the seeds
    that chose them."""
    device: str = "cpu"
    """Torch device for the simulation ('cpu' or 'cuda')."""
    threads: int = 1
    """torch.set_num_threads for the run (the CI machine has two cores)."""
    plots: bool = True
    """Write the PNG plots."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        # Refused here, in a second and naming the option, rather than minutes into the training.
        for name in ("d", "context", "heads", "init_scale", "lr", "steps", "log_every", "seeds", "pool", "test"):
            checks.positive(name, getattr(self, name))
        for name in ("eig_max", "eig_min", "proxy_checkpoints", "upsample", "ode_dt", "final_window", "threads"):
            checks.positive(name, getattr(self, name))
        checks.non_negative("rho_per_head", self.rho_per_head)
        checks.non_negative("rho_global", self.rho_global)
        checks.non_negative("seed", self.seed)
        _fraction("record_fraction", self.record_fraction)
        checks.at_most("final_window", self.final_window, 1.0)
        for f in self.hard_features:
            checks.one_of("hard_features", f, HARD_FEATURES)
        for f in self.search_features:
            checks.one_of("search_features", f, HARD_FEATURES)
        for name in ("sweep_rho_per_head", "sweep_rho_global"):
            for r in getattr(self, name):
                checks.non_negative(name, r)
        for u in self.search_upsample:
            checks.positive("search_upsample", u)
        for f in self.search_record_fraction:
            _fraction("search_record_fraction", f)
        checks.one_of("device", self.device.split(":")[0], ("cpu", "cuda"))


HARD_FEATURES = ("loss", "final", "log", "ratio")


def _fraction(name: str, value) -> None:
    """0 < value <= 1."""
    checks.positive(name, value)
    checks.at_most(name, value, 1.0)
