"""The results of a theory run: one typed object (and its results.json form), the per-seed summary,
results.md, and the PNG plots written beside it."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datalever.rundir import atomic_write_bytes
from datalever.stats import t_interval
from datalever.theory.ode import OdeArm, gd_blowup_time
from datalever.theory.runs import OPTIMIZER_ARMS, Problem, TrainingLog

# ----------------------------------------------------------------------------- the result and its summary


@dataclass
class TheoryResult:
    problem: Problem
    log: TrainingLog
    per_run: list[dict]  # measure_runs
    summary: dict[str, dict]  # "init/arm" -> mean and 95% CI over seeds (summarize)
    ode: dict[str, OdeArm]  # optimizer arm -> the reduced ODE's prediction
    rho_sweep: dict  # ode.rho_sweep
    ode_vs_sim: dict  # ode.ode_vs_simulation; empty without the aligned init
    hard: list[dict]  # Pools.hard
    runtime_s: dict[str, float]

    def as_json(self) -> dict:
        p, cfg = self.problem, self.problem.cfg
        return {
            "config": asdict(cfg),
            "eigenvalues": p.lam.tolist(),
            "kappa": p.kap.tolist(),
            "m_star": p.m_star.tolist(),
            "gd_blowup_time": gd_blowup_time(p.lam, cfg.init_scale).tolist(),
            "max_entropy": math.log(cfg.d),
            "summary": self.summary,
            "ode": {arm: {"learning_times": o.learning_times, "entropy": o.entropy} for arm, o in self.ode.items()},
            "ode_vs_aligned_sim": self.ode_vs_sim,
            "ode_rho_sweep": self.rho_sweep,
            "hard": self.hard,
            "arms": p.arms,
            "runs": self.per_run,
            "runtime_s": self.runtime_s,
        }


def summarize(problem: Problem, per_run: list[dict]) -> dict[str, dict]:
    """Per init and arm, mean and 95% CI over seeds; the deltas against GD are paired by seed."""
    summary = {}
    for init in problem.inits:
        gd = {p["seed"]: p for p in per_run if p["init"] == init and p["arm"] == "gd"}
        for arm in problem.arms:
            ps = [p for p in per_run if p["init"] == init and p["arm"] == arm]
            lt = np.array([p["learning_times"] for p in ps])
            ent = [p["entropy"] for p in ps]
            summary[f"{init}/{arm}"] = {
                "learning_times": [t_interval(lt[:, i]) for i in range(lt.shape[1])],
                "entropy": t_interval(ent),
                "delta_entropy_vs_gd": t_interval([p["entropy"] - gd[p["seed"]]["entropy"] for p in ps]),
                "final_test_loss": t_interval([p["final_test_loss"] for p in ps]),
                "delta_test_loss_vs_gd": t_interval(
                    [p["final_test_loss"] - gd[p["seed"]]["final_test_loss"] for p in ps]
                ),
                "mean_test_loss": t_interval([p["mean_test_loss"] for p in ps]),
                "learned": f"{sum(p['learned'] for p in ps)}/{len(ps) * lt.shape[1]}",
                "seeds_with_entropy": int(np.isfinite(ent).sum()),
            }
    return summary


# ----------------------------------------------------------------------------- results.md


_LABELS = {
    "gd": "GD",
    "sam_head": "SAM per-head",
    "sam_global": "SAM global",
    "easy": "control: easy x up",
    "random": "control: random x up",
}


def arm_label(arm: str) -> str:
    """The arm's name in the table and the plots."""
    if arm.startswith("reshaped:"):
        return f"reshaped GD ({arm.split(':', 1)[1]})"
    return _LABELS[arm]


def markdown(res: TheoryResult) -> str:
    lines = [_settings(res), ""]
    for init in res.problem.inits:
        lines += _table(res, init)
        lines.append("")
    if res.ode_vs_sim:
        lines.append(_ode_vs_sim_line(res))
    lines += _pool_lines(res)
    lines.append(_rho_sweep_line(res))
    return "\n".join(lines) + "\n"


def runtime_line(res: TheoryResult) -> str:
    cfg = res.problem.cfg
    return (
        f"\nRuntime: {res.runtime_s['total']:.0f} s in total, {res.runtime_s['train']:.0f} s training "
        f"({len(res.problem.runs)} runs x {cfg.steps} steps, threads={cfg.threads}).\n"
    )


def _fmt(mean: float, half: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _settings(res: TheoryResult) -> str:
    cfg = res.problem.cfg
    return (
        f"d={cfg.d}, eigenvalues {', '.join(f'{x:.3g}' for x in res.problem.lam)}; N={cfg.context}, H={cfg.heads}, "
        f"init scale {cfg.init_scale}, lr {cfg.lr}, {cfg.steps} steps (T={cfg.steps * cfg.lr:g}), rho {cfg.rho}, "
        f"pool {cfg.pool}, upsample x{cfg.upsample} "
        f"(proxy {cfg.proxy_steps} steps, {cfg.proxy_checkpoints} checkpoints), "
        f"{cfg.seeds} seeds; mean ± 95% CI over seeds. Max entropy ln d = {math.log(cfg.d):.3f}."
    )


def _table(res: TheoryResult, init: str) -> list[str]:
    d = res.problem.cfg.d
    head = (
        "| init | arm | "
        + " | ".join(f"t{i + 1}" for i in range(d))
        + " | entropy | Δentropy vs GD | final test loss | Δloss vs GD | learned |"
    )
    lines = [head, "|" + "---|" * (d + 7)]
    for arm in res.problem.arms:
        s = res.summary[f"{init}/{arm}"]
        cells = [_fmt(m, h, 1) for m, h in s["learning_times"]]
        lines.append(
            f"| {init} | {arm_label(arm)} | "
            + " | ".join(cells)
            + f" | {_fmt(*s['entropy'], 4)} | {_fmt(*s['delta_entropy_vs_gd'], 4)}"
            + f" | {_fmt(*s['final_test_loss'], 4)} | {_fmt(*s['delta_test_loss_vs_gd'], 4)} | {s['learned']} |"
        )
    if init == "aligned":
        lines += _ode_rows(res)
    return lines


def _ode_rows(res: TheoryResult) -> list[str]:
    gd_entropy = res.ode["gd"].entropy
    rows = []
    for arm in OPTIMIZER_ARMS:
        o = res.ode[arm]
        rows.append(
            f"| ODE | {arm_label(arm)} | "
            + " | ".join("n/a" if not np.isfinite(x) else f"{x:.1f}" for x in o.learning_times)
            + f" | {_fmt(o.entropy, math.nan, 4)} | {_fmt(o.entropy - gd_entropy, math.nan, 4)} | | | |"
        )
    return rows


def _ode_vs_sim_line(res: TheoryResult) -> str:
    return (
        "ODE vs aligned-init simulation, max over directions of |relative error| of the learning time "
        "(seed mean; worst single run): "
        + ", ".join(
            f"{arm_label(a)} {v['max_abs_rel_err_of_mean']:.1%} ({v['max_abs_rel_err_per_run']:.1%})"
            for a, v in res.ode_vs_sim.items()
        )
        + "."
    )


def _pool_lines(res: TheoryResult) -> list[str]:
    """Each reweighted pool's upsampled fraction and growth factors, and the uniform pools' noise."""
    lines = [
        "Reweighted pools: fraction of the pool upsampled, and the growth factor r_i = E_pool,w[y_q (s.u_i)(x_q.u_i)] "
        "/ E_pool[...] for i = 1..d (small-init learning times scale as 1/(lam_i^2 r_i)); seed means:"
    ]
    for arm in res.problem.pool_arms:
        frac = np.mean([h[arm]["fraction"] for h in res.hard])
        growth = np.array([h[arm]["growth_factor"] for h in res.hard]).mean(0)
        lines.append(f"- {arm_label(arm)}: {frac:.1%}; " + ", ".join(f"{x:.2f}" for x in growth))
    pd = np.array([h["pool_drive_over_lam2"] for h in res.hard])
    lines.append(
        "Pool noise: the uniform pools' drive E_pool[y_q (s.u_i)(x_q.u_i)] / lam_i^2 (1 in the population) ranges "
        f"{pd.min():.3f}..{pd.max():.3f} over seeds and directions."
    )
    return lines


def _rho_sweep_line(res: TheoryResult) -> str:
    sw = res.rho_sweep
    return (
        f"ODE entropy against rho (GD: {res.ode['gd'].entropy:.4f}; per-head stall at rho = sqrt(3) v0 = "
        f"{sw['stall_rho']:.4g}): "
        + "; ".join(
            f"rho={r:.3g}: per-head {a:.4f}, global {b:.4f}"
            for r, a, b in zip(sw["sam_head"]["rho"], sw["sam_head"]["entropy"], sw["sam_global"]["entropy"])
        )
        + "."
    )


# ----------------------------------------------------------------------------- plots


def write_plots(res: TheoryResult, out: Path) -> None:
    """loss.png, directions.png, learning_times.png, ode.png (with the aligned init), entropy_vs_rho.png."""
    _save(_loss(res), out / "loss.png")
    _save(_directions(res), out / "directions.png")
    _save(_learning_times(res), out / "learning_times.png")
    if "aligned" in res.problem.inits:
        _save(_ode(res), out / "ode.png")
    _save(_entropy_vs_rho(res), out / "entropy_vs_rho.png")


def _pyplot():
    # imported on first use, with the file-only backend: importing datalever.theory stays light
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _arm_colors(arms: list[str]) -> dict[str, str]:
    colors = {"gd": "C0", "sam_head": "C1", "sam_global": "C2", "easy": "C4", "random": "C7"}
    for k, arm in enumerate(a for a in arms if a.startswith("reshaped:")):
        colors[arm] = ("C3", "C5", "C6", "C8", "C9")[k % 5]
    return colors


def _direction_colors(d: int):
    return _pyplot().cm.viridis(np.linspace(0, 0.95, d))


def _loss(res: TheoryResult):
    """Test loss against time for every arm (seed 0), one panel per init."""
    plt, p = _pyplot(), res.problem
    colors = _arm_colors(p.arms)
    fig, axes = plt.subplots(1, len(p.inits), figsize=(6 * len(p.inits), 4), squeeze=False)
    for ax, init in zip(axes[0], p.inits):
        for arm in p.arms:
            r = p.run_index(init, arm, 0)
            ax.plot(res.log.t, res.log.test[:, r], color=colors[arm], label=arm_label(arm), lw=1.2)
        for tt in res.per_run[p.run_index(init, "gd", 0)]["learning_times"]:
            if np.isfinite(tt):
                ax.axvline(tt, color="C0", lw=0.5, ls=":")
        ax.set(
            xlabel="time t = step x lr (log)",
            ylabel="test loss (half MSE)",
            xscale="log",
            title=f"{init} init, seed {p.cfg.seed} (dotted: GD learning times)",
        )
        ax.legend(fontsize=7)
    return fig


def _directions(res: TheoryResult):
    """Each direction's learned map against time, one panel per arm (random init, seed 0)."""
    plt, p = _pyplot(), res.problem
    arms, lam = p.arms, p.lam
    dcol = _direction_colors(p.cfg.d)
    ncol = min(4, len(arms))
    nrow = math.ceil(len(arms) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.2 * nrow), sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(arms) :]:
        ax.axis("off")
    for ax, arm in zip(axes, arms):
        r = p.run_index("random", arm, 0)
        for i in range(p.cfg.d):
            ax.plot(res.log.t, res.log.m[:, r, i], color=dcol[i], label=f"λ={lam[i]:.2f}")
        ax.set_title(arm_label(arm), fontsize=9)
        ax.set(xlabel="time (log)", xscale="log")
    for r in range(nrow):
        axes[r * ncol].set_ylabel("m_i = λ_i u_iᵀΓu_i")
    fig.suptitle("learned map per direction (random init, seed 0)", fontsize=10)
    axes[len(arms) - 1].legend(fontsize=6)
    return fig


def _learning_times(res: TheoryResult):
    """Left: learning time per direction and arm (random init). Right: Δentropy vs GD per arm and init."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    _learning_times_panel(res, axes[0])
    _delta_entropy_panel(res, axes[1])
    return fig


def _learning_times_panel(res: TheoryResult, ax) -> None:
    arms = res.problem.arms
    colors = _arm_colors(arms)
    x = np.arange(res.problem.cfg.d)
    for k, arm in enumerate(arms):
        s = res.summary[f"random/{arm}"]
        mu = np.array([m for m, _ in s["learning_times"]])
        ci = np.nan_to_num(np.array([h for _, h in s["learning_times"]]))
        ax.errorbar(
            x + 0.08 * (k - len(arms) / 2), mu, yerr=ci, fmt="o-", color=colors[arm], label=arm_label(arm), ms=3, lw=1
        )
    ax.set(
        xlabel="eigenvector i (decreasing eigenvalue)",
        ylabel="learning time",
        yscale="log",
        title="learning times (random init, mean ± 95% CI)",
    )
    ax.legend(fontsize=7)


def _delta_entropy_panel(res: TheoryResult, ax) -> None:
    inits, arms = res.problem.inits, res.problem.arms
    colors = _arm_colors(arms)
    na = len(arms)
    for j, init in enumerate(inits):
        for k, arm in enumerate(arms[1:]):
            m, h = res.summary[f"{init}/{arm}"]["delta_entropy_vs_gd"]
            ax.bar(
                j * na + k,
                m,
                yerr=0 if not np.isfinite(h) else h,
                color=colors[arm],
                label=arm_label(arm) if j == 0 else None,
            )
        if init == "aligned":
            for k, arm in enumerate(("sam_head", "sam_global")):
                ax.plot(
                    j * na + k,
                    res.ode[arm].entropy - res.ode["gd"].entropy,
                    "k*",
                    ms=9,
                    label="reduced ODE" if k == 0 else None,
                )
    ax.set_xticks([(na - 2) / 2 + na * j for j in range(len(inits))], [f"{i} init" for i in inits])
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="Δ entropy vs GD (paired by seed)", title="simplicity bias change (> 0: lower bias)")
    ax.legend(fontsize=7)


def _ode(res: TheoryResult):
    """The aligned-init simulation (seed 0) against the reduced ODE, per optimizer arm."""
    plt, p = _pyplot(), res.problem
    dcol = _direction_colors(p.cfg.d)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, arm in zip(axes, OPTIMIZER_ARMS):
        r = p.run_index("aligned", arm, 0)
        for i in range(p.cfg.d):
            ax.plot(res.log.t, res.log.m[:, r, i], color=dcol[i])
            ax.plot(res.ode[arm].t, res.ode[arm].m[:, i], color=dcol[i], ls="--", lw=1)
        ax.set(title=f"{arm_label(arm)} (aligned init)", xlabel="time", xscale="log")
    fig.suptitle("learned map m_i per direction: simulation (solid, seed 0) and reduced ODE (dashed)", fontsize=10)
    axes[0].set_ylabel("m_i")
    return fig


def _entropy_vs_rho(res: TheoryResult):
    plt, cfg, sweep = _pyplot(), res.problem.cfg, res.rho_sweep
    colors = _arm_colors(res.problem.arms)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for arm in ("sam_head", "sam_global"):
        ax.plot(sweep[arm]["rho"], sweep[arm]["entropy"], "o-", color=colors[arm], label=arm_label(arm))
    ax.axvline(sweep["stall_rho"], color="k", lw=0.5, ls=":", label="√3·v0 (per-head stall)")
    ax.axvline(cfg.rho, color="C7", lw=0.5, ls="--", label=f"rho of the runs ({cfg.rho:g})")
    ax.set(xlabel="rho", ylabel="entropy (ODE)", title="reduced ODE: entropy against rho")
    ax.legend(fontsize=8)
    return fig
