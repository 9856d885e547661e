"""Simplicity bias of GD, SAM and reshaped data in multi-head linear self-attention.

In-context linear regression (Zhang, Singh, Latham & Saxe, ICML 2025) learned by multi-head linear
attention with rank-one keys and queries. `run` trains, over several seeds and vectorized across all
runs, GD, SAM (global or per-head normalization), GD on reshaped pools (hard sequences upsampled) and
two control pools, from a small random init and from the aligned init of the reduced ODEs; SAM over a
sweep of radii and GD over a grid of reshaped pools, from the random init; it measures how unevenly
the eigen-directions are learned and which runs stall, integrates the ODEs, reruns the winners on
fresh seeds, and writes tables and plots. docs/theory.md derives the ODEs and defines every
measurement.

Modules, each read on its own:

    config   TheoryConfig: every option, with its --help text
    model    the data (spectrum, sequences, kappa, drive), the model, its pool loss and gradient,
             and `train` (full-batch GD / SAM for many runs at once)
    runs     the arms (optimizer, radius, pool) and the grid of runs, each seed's pools (proxy, hard
             cluster, controls, upsampled), training all runs, learning times, entropy and stalls
    ode      the reduced ODEs, their arms, the rho sweep, ODE against the aligned simulation
    sweep    the rho sweep and the reshaping search as tables, the winners, their rerun on fresh seeds
    report   TheoryResult, the per-seed summary, results.md and the plots
    __init__ `run`: build, train, measure, report
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from datalever import provenance
from datalever.rundir import TheoryDir, atomic_write_text, write_json
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
    upsampled_stats,
)
from datalever.theory.ode import gd_blowup_time, ode_arms, ode_curves, ode_learning_times, ode_vs_simulation, rho_sweep
from datalever.theory.report import TheoryResult, markdown, runtime_line, summarize, write_plots
from datalever.theory.runs import (
    ArmSpec,
    Problem,
    arms_of,
    build_pools,
    distribution_entropy,
    entropy,
    entropy_fraction,
    fraction_of_max,
    learning_times,
    make_problem,
    measure_runs,
    select_hard,
    stalled_directions,
    train_runs,
)
from datalever.theory.sweep import comparison, confirm_config, confirm_rows, search_rows, sweep_rows

__all__ = [
    "ArmSpec",
    "Features",
    "Stats",
    "TheoryConfig",
    "aligned_init",
    "arms_of",
    "covariance",
    "drive",
    "distribution_entropy",
    "effective_map",
    "entropy",
    "entropy_fraction",
    "fraction_of_max",
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
    "simulate",
    "stalled_directions",
    "train",
    "upsampled_stats",
]


def run(cfg: TheoryConfig) -> dict:
    """Train every arm over all seeds (vectorized), measure, integrate the ODEs, write
    out/results.json, out/results.md, out/*.png and out/theory.{config.yaml,meta.json}; return the
    results dict (config, eigenvalues, kappa, m_star, summary, ode, ode_vs_aligned_sim,
    ode_rho_sweep, sweep, search, comparison, confirm, hard, arms, runs, runtime_s)."""
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


def simulate(problem: Problem, with_ode: bool = True) -> TheoryResult:
    """Everything but the writing: pools, training, measurements, the reduced ODEs, the sweep and the search
    tables, and the winners rerun on fresh seeds."""
    cfg = problem.cfg
    pools = build_pools(problem)
    log = train_runs(problem, pools)
    per_run = measure_runs(problem, log)
    summary = summarize(problem, per_run)
    ode = ode_arms(problem) if with_ode else {}
    ode_sweep = rho_sweep(problem) if with_ode else {}
    sweep = sweep_rows(problem, summary, ode_sweep) if cfg.sweep else None
    search = search_rows(problem, summary) if cfg.search else None
    res = TheoryResult(
        problem=problem,
        log=log,
        per_run=per_run,
        summary=summary,
        ode=ode,
        rho_sweep=ode_sweep,
        ode_vs_sim=ode_vs_simulation(per_run, ode) if cfg.aligned and with_ode else {},
        hard=pools.hard,
        runtime_s={"train": log.seconds},
        sweep=sweep,
        search=search,
        comparison=comparison(problem, summary, sweep, search),
    )
    if cfg.confirm and (cfg.sweep or cfg.search):
        fresh = simulate(make_problem(confirm_config(cfg, res.comparison)), with_ode=False)
        res.confirm = {"config": asdict(fresh.problem.cfg), "rows": confirm_rows(fresh.problem, fresh.summary)}
        res.runtime_s["confirm_train"] = fresh.runtime_s["train"]
    return res


def _write(res: TheoryResult, out: Path, t_start: float) -> dict:
    """Write results.md, the plots, results.json and the provenance (the total runtime includes the
    plots); return the results.json dict."""
    cfg = res.problem.cfg
    table = markdown(res)
    if cfg.plots:
        write_plots(res, out)
    res.runtime_s["total"] = time.time() - t_start
    table += runtime_line(res)
    atomic_write_text(TheoryDir(out).results_md, table)
    results = res.as_json()
    write_json(TheoryDir(out).results_json, results)
    provenance.record(out, "theory", cfg, runtime_s=res.runtime_s)
    if cfg.progress:
        print(table)
    return results
