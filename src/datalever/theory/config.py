"""The options of `datalever theory`: one dataclass, whose field docstrings are the CLI's --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    rho: float = 0.02
    """SAM radius (both normalizations). Keep it well below the stall radius sqrt(3) x init_scale, where an
    aligned head stalls at the saddle; per-head SAM from a random init stalls small heads earlier
    (docs/theory.md)."""
    seeds: int = 5
    """Number of seeds (each: its own pool, test set, proxy and random init, shared by all arms)."""
    seed: int = 0
    """First seed; seeds are seed, seed+1, ..."""
    pool: int = 16384
    """Training pool size (sequences) per seed; GD is full-batch on it."""
    test: int = 16384
    """Fresh test sequences per seed."""
    proxy_steps: int = 600
    """Steps of the proxy GD run (own random init) whose per-sequence losses pick the hard sequences
    (600 x lr 0.1: t=60, about the top half of the directions learned)."""
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
    rho_sweep: Optional[list[float]] = None
    """Radii for the ODE-only curve of entropy against rho (per-head and global). None: 10 values from 0 to
    0.9 x the per-head stall radius sqrt(3) x init_scale."""
    device: str = "cpu"
    """Torch device for the simulation ('cpu' or 'cuda')."""
    threads: int = 1
    """torch.set_num_threads for the run (the CI machine has two cores)."""
    plots: bool = True
    """Write the PNG plots."""
    progress: bool = True
    """Show progress bars."""
