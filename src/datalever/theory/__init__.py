"""Simplicity bias of GD, SAM and reshaped data in multi-head linear self-attention.

In-context linear regression (Zhang, Singh, Latham & Saxe, ICML 2025) learned by multi-head linear
attention with rank-one keys and queries. `run` trains, over several seeds and vectorized across all
runs, GD, SAM (global or per-head normalization), GD on reshaped pools (hard sequences upsampled) and
two control pools, from a small random init and from the aligned init of the reduced ODEs; it
measures how unevenly the eigen-directions are learned, integrates the ODEs, and writes a table and
plots. docs/theory.md derives the ODEs and defines every measurement.

Modules, each read on its own:

    config   TheoryConfig: every option, with its --help text
    model    the data (spectrum, sequences, kappa, drive), the model, its pool loss and gradient,
             and `train` (full-batch GD / SAM for many runs at once)
    runs     the arms and the grid of runs, each seed's pools (proxy, hard cluster, controls),
             training all runs, learning times and entropy
    ode      the reduced ODEs, their arms, the rho sweep, ODE against the aligned simulation
    report   TheoryResult, the per-seed summary, results.md and the plots
    __init__ `run`: build, train, measure, report
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from datalever.rundir import atomic_write_text, record_provenance, write_json
from datalever.theory.config import TheoryConfig
from datalever.theory.model import (
    Features,
    Stats,
    aligned_init,
    covariance,
    drive,
    effective_map,
    forward,
    kappa,
    loss_and_grad,
    pool_stats,
    random_init,
    sample_sequences,
    train,
)
from datalever.theory.ode import gd_blowup_time, ode_arms, ode_curves, ode_learning_times, ode_vs_simulation, rho_sweep
from datalever.theory.report import TheoryResult, markdown, runtime_line, summarize, write_plots
from datalever.theory.runs import (
    Problem,
    arms_of,
    build_pools,
    entropy,
    learning_times,
    make_problem,
    measure_runs,
    select_hard,
    train_runs,
)

__all__ = [
    "Features",
    "Stats",
    "TheoryConfig",
    "aligned_init",
    "arms_of",
    "covariance",
    "drive",
    "effective_map",
    "entropy",
    "forward",
    "gd_blowup_time",
    "kappa",
    "learning_times",
    "loss_and_grad",
    "ode_curves",
    "ode_learning_times",
    "pool_stats",
    "random_init",
    "run",
    "sample_sequences",
    "select_hard",
    "train",
]


def run(cfg: TheoryConfig) -> dict:
    """Train every arm over all seeds (vectorized), measure, integrate the ODEs, write
    out/results.json, out/results.md, out/*.png and out/theory.{config.yaml,meta.json}; return the
    results dict (config, eigenvalues, kappa, m_star, summary, ode, ode_vs_aligned_sim,
    ode_rho_sweep, hard, arms, runs, runtime_s)."""
    t_start = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        problem = make_problem(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        return _write(simulate(problem), out, t_start)
    finally:
        torch.set_num_threads(old_threads)


def simulate(problem: Problem) -> TheoryResult:
    """Everything but the writing: pools, training, measurements, the reduced ODEs."""
    cfg = problem.cfg
    pools = build_pools(problem)
    log = train_runs(problem, pools)
    per_run = measure_runs(problem, log)
    ode = ode_arms(problem)
    return TheoryResult(
        problem=problem,
        log=log,
        per_run=per_run,
        summary=summarize(problem, per_run),
        ode=ode,
        rho_sweep=rho_sweep(problem),
        ode_vs_sim=ode_vs_simulation(per_run, ode) if cfg.aligned else {},
        hard=pools.hard,
        runtime_s={"train": log.seconds},
    )


def _write(res: TheoryResult, out: Path, t_start: float) -> dict:
    """Write results.md, the plots, results.json and the provenance (the total runtime includes the
    plots); return the results.json dict."""
    cfg = res.problem.cfg
    table = markdown(res)
    if cfg.plots:
        write_plots(res, out)
    res.runtime_s["total"] = time.time() - t_start
    table += runtime_line(res)
    atomic_write_text(out / "results.md", table)
    results = res.as_json()
    write_json(out / "results.json", results)
    record_provenance(out, "theory", cfg, runtime_s=res.runtime_s)
    if cfg.progress:
        print(table)
    return results
