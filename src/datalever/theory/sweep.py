"""The rho sweep and the data-reshaping search read from a run's summary: per radius and per reshaped pool
the entropy, stalls and test loss; the best non-stalling SAM of each normalization and the best reshaping
(chosen on entropy alone, never on the test loss); and the config that reruns those winners on fresh seeds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from datalever.theory.config import TheoryConfig
from datalever.theory.runs import Problem, sweep_arm_name

NORMALIZATIONS = ("sam_head", "sam_global")

# what a row of the sweep, the search and the comparison carries, from the arm's summary
_ROW_KEYS = (
    "entropy",
    "entropy_fraction",
    "delta_entropy_vs_gd",
    "delta_fraction_vs_gd",
    "final_test_loss",
    "delta_test_loss_vs_gd",
    "first_time_ratio_vs_gd",
    "beyond_delay_fraction_vs_gd",
    "runs",
    "stalled_runs",
    "unsettled_runs",
    "seeds_with_entropy",
)


def _row(problem: Problem, summary: dict, name: str) -> dict:
    s = summary[f"random/{problem.arm_of(name)}"]
    return {k: s[k] for k in _ROW_KEYS}


def clean(row: dict) -> bool:
    """Every seed learned every direction within the run: no stall, nothing still rising."""
    return row["seeds_with_entropy"] == row["runs"]


def sweep_rows(problem: Problem, summary: dict, ode_sweep: dict) -> dict[str, list[dict]]:
    """Normalization -> one row per radius: the simulation (random init) beside the reduced ODE (if computed)."""
    cfg = problem.cfg
    radii = {"sam_head": cfg.sweep_rho_per_head, "sam_global": cfg.sweep_rho_global}
    out = {}
    for arm in NORMALIZATIONS:
        rows = []
        for rho in radii[arm]:
            row = {"rho": float(rho), **_row(problem, summary, sweep_arm_name(arm, rho))}
            row["ode"] = _ode_point(ode_sweep.get(arm), float(rho))
            rows.append(row)
        out[arm] = rows
    return out


def _ode_point(ode: dict | None, rho: float) -> dict | None:
    """The reduced ODE at this radius (None without the ODE)."""
    if ode is None:
        return None
    k = ode["rho"].index(rho)
    keys = ("entropy", "entropy_fraction", "stalled", "late", "first_time_ratio", "beyond_delay_fraction")
    return {key: ode[key][k] for key in keys}


def search_rows(problem: Problem, summary: dict) -> list[dict]:
    """One row per reshaped pool of the search grid (features, upsampling factor, proxy recording fraction)."""
    rows = []
    for name in [*problem.specs, *problem.alias]:
        if name.startswith("search:"):
            spec = problem.specs[problem.arm_of(name)]
            rows.append(
                {
                    "features": spec.selector,
                    "upsample": spec.upsample,
                    "record_fraction": spec.record_fraction,
                    "arm": name,
                    **_row(problem, summary, name),
                }
            )
    return sorted(rows, key=lambda r: (r["features"], r["record_fraction"], r["upsample"]))


def best(rows: list[dict]) -> dict | None:
    """The row with the highest mean entropy gain over GD among those where every seed learned every
    direction; None if there is none. The test loss plays no part."""
    ok = [r for r in rows if clean(r) and np.isfinite(r["delta_entropy_vs_gd"][0])]
    return max(ok, key=lambda r: r["delta_entropy_vs_gd"][0]) if ok else None


def best_sam(sweep: dict[str, list[dict]], arm: str) -> dict | None:
    return best([r for r in sweep[arm] if r["rho"] > 0])


def comparison(problem: Problem, summary: dict, sweep: dict | None, search: list[dict] | None) -> dict:
    """GD, the best non-stalling SAM of each normalization and the best reshaping, on the same axes; and how
    much of the best SAM's entropy gain the reshaping reaches."""
    out = {"gd": {"label": "", **_row(problem, summary, "gd")}}
    if sweep:
        for arm in NORMALIZATIONS:
            r = best_sam(sweep, arm)
            if r is not None:
                out[arm] = {"label": f"rho {r['rho']:g}", **r}
    if search:
        r = best(search)
        if r is not None:
            out["reshaped"] = {"label": _pool_label(r), **r}
    sam_gain = max((out[a]["delta_entropy_vs_gd"][0] for a in NORMALIZATIONS if a in out), default=math.nan)
    if "reshaped" in out and sam_gain > 0:
        out["reshaped_share_of_sam_gain"] = out["reshaped"]["delta_entropy_vs_gd"][0] / sam_gain
    return out


def _pool_label(row: dict) -> str:
    return f"{row['features']}, x{row['upsample']:g}, proxy {row['record_fraction']:.3g} of the run"


def confirm_config(cfg: TheoryConfig, best_rows: dict) -> TheoryConfig:
    """GD, the chosen SAM radii and the chosen reshaped pool on as many fresh seeds (after the ones that chose
    them), random init only; a normalization without a clean radius runs at 0 (GD), and without a chosen pool
    there is no reshaped arm."""
    pool = best_rows.get("reshaped")
    return dataclasses.replace(
        cfg,
        seed=cfg.seed + cfg.seeds,
        rho_per_head=best_rows["sam_head"]["rho"] if "sam_head" in best_rows else 0.0,
        rho_global=best_rows["sam_global"]["rho"] if "sam_global" in best_rows else 0.0,
        hard_features=[pool["features"]] if pool else [],
        upsample=pool["upsample"] if pool else cfg.upsample,
        record_fraction=pool["record_fraction"] if pool else cfg.record_fraction,
        controls=False,
        aligned=False,
        sweep=False,
        search=False,
        confirm=False,
        plots=False,
    )


def confirm_rows(problem: Problem, summary: dict) -> dict:
    """The fresh seeds' rows: GD, SAM per head, SAM global, the reshaped pool (if any)."""
    out = {arm: _row(problem, summary, arm) for arm in problem.arms}
    cfg = problem.cfg
    out["sam_head"]["rho"] = cfg.rho_per_head
    out["sam_global"]["rho"] = cfg.rho_global
    return out
