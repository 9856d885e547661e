"""The results of a theory run: one typed object (and its results.json form), the per-seed summary,
results.md, and the PNG plots written beside it."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from datalever.rundir import TheoryDir, atomic_write_bytes
from datalever.stats import t_interval
from datalever.theory.ode import OdeArm, gd_blowup_time
from datalever.theory.runs import OPTIMIZER_ARMS, Problem, TrainingLog, entropy, fraction_of_max, proxy_steps

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
    sweep: dict | None = None  # sweep.sweep_rows: normalization -> a row per radius; None without the sweep
    search: list[dict] | None = None  # sweep.search_rows; None without the search
    comparison: dict = field(default_factory=dict)  # sweep.comparison: GD, the best SAMs, the best reshaping
    confirm: dict | None = None  # the winners rerun on fresh seeds: {config, rows}

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
            "ode": {
                arm: {
                    "learning_times": o.learning_times,
                    "entropy": o.entropy,
                    "entropy_fraction": fraction_of_max(o.entropy, cfg.d),
                }
                for arm, o in self.ode.items()
            },
            "ode_vs_aligned_sim": self.ode_vs_sim,
            "ode_rho_sweep": self.rho_sweep,
            "sweep": self.sweep,
            "search": self.search,
            "comparison": self.comparison,
            "confirm": self.confirm,
            "hard": self.hard,
            "arms": p.arms,
            "arm_specs": {name: asdict(spec) for name, spec in p.specs.items()},
            "alias": p.alias,
            "runs": self.per_run,
            "runtime_s": self.runtime_s,
        }


def summarize(problem: Problem, per_run: list[dict]) -> dict[str, dict]:
    """Per arm (main, sweep and search) and init, mean and 95% CI over seeds; the deltas against GD and the
    ratio of first learning times are paired by seed. Entropy means are over the runs that learned every
    direction (`seeds_with_entropy`); `stalled_runs` counts the runs with a direction still at its saddle at
    the end, `unsettled_runs` those with one still rising at 80% of the run."""
    summary = {}
    d = problem.cfg.d
    for arm in problem.specs:
        for init in problem.inits_of(arm):
            gd = {p["seed"]: p for p in per_run if p["init"] == init and p["arm"] == "gd"}
            ps = [p for p in per_run if p["init"] == init and p["arm"] == arm]
            summary[f"{init}/{arm}"] = _arm_summary(ps, gd, d)
    return summary


def _arm_summary(ps: list[dict], gd: dict[int, dict], d: int) -> dict:
    lt = np.array([p["learning_times"] for p in ps])
    ent = [p["entropy"] for p in ps]
    beyond = [entropy_beyond_delay(p, gd[p["seed"]]) for p in ps]

    def paired(key, op):
        return t_interval([op(p[key], gd[p["seed"]][key]) for p in ps])

    return {
        "learning_times": [t_interval(lt[:, i]) for i in range(lt.shape[1])],
        "entropy": t_interval(ent),
        "entropy_fraction": t_interval([p["entropy_fraction"] for p in ps]),
        "delta_entropy_vs_gd": paired("entropy", lambda a, b: a - b),
        "delta_fraction_vs_gd": paired("entropy_fraction", lambda a, b: a - b),
        "final_test_loss": t_interval([p["final_test_loss"] for p in ps]),
        "delta_test_loss_vs_gd": paired("final_test_loss", lambda a, b: a - b),
        "mean_test_loss": t_interval([p["mean_test_loss"] for p in ps]),
        "first_time_ratio_vs_gd": paired("first_learning_time", lambda a, b: a / b),
        "beyond_delay_vs_gd": t_interval(beyond),
        "beyond_delay_fraction_vs_gd": t_interval([fraction_of_max(x, d) for x in beyond]),
        "learned": f"{sum(p['learned'] for p in ps)}/{len(ps) * d}",
        "runs": len(ps),
        "stalled_runs": sum(p["stalled"] > 0 for p in ps),
        "unsettled_runs": sum(p["stalled"] == 0 and p["unsettled"] > 0 for p in ps),
        "seeds_with_entropy": int(np.isfinite(ent).sum()),
    }


def entropy_beyond_delay(run: dict, gd: dict) -> float:
    """The run's entropy minus that of its seed's GD learning times all shifted by the run's extra wait before
    its first direction is learned. Adding one wait to every learning time raises the entropy without
    changing the order or the gaps between directions: that part is delay, not balance. What is left is the
    evening-out of the learning times themselves (0 for a pure delay; NaN if a direction was not learned)."""
    wait = run["first_learning_time"] - gd["first_learning_time"]
    return run["entropy"] - entropy(np.asarray(gd["learning_times"], float) + wait)


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
    if res.sweep:
        lines += ["", *_sweep_tables(res)]
    else:
        lines.append(_rho_sweep_line(res))
    if res.search:
        lines += ["", *_search_table(res)]
    if res.comparison and (res.sweep or res.search):
        lines += ["", *_comparison_table(res)]
    if res.confirm:
        lines += ["", *_confirm_table(res)]
    return "\n".join(lines) + "\n"


def runtime_line(res: TheoryResult) -> str:
    cfg = res.problem.cfg
    confirm = res.runtime_s.get("confirm_train")
    extra = f", {confirm:.0f} s training the rerun on fresh seeds" if confirm is not None else ""
    return (
        f"\nRuntime: {res.runtime_s['total']:.0f} s in total, {res.runtime_s['train']:.0f} s training "
        f"({len(res.problem.runs)} runs x {cfg.steps} steps, threads={cfg.threads}){extra}.\n"
    )


def _fmt(mean: float, half: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _ci(pair, digits: int) -> str:
    return _fmt(pair[0], pair[1], digits)


def _settings(res: TheoryResult) -> str:
    cfg = res.problem.cfg
    return (
        f"d={cfg.d}, eigenvalues {', '.join(f'{x:.3g}' for x in res.problem.lam)}; N={cfg.context}, H={cfg.heads}, "
        f"init scale v0={cfg.init_scale}, lr {cfg.lr}, {cfg.steps} steps (T={cfg.steps * cfg.lr:g}), "
        f"rho per-head {cfg.rho_per_head}, rho global {cfg.rho_global}, pool {cfg.pool}, upsample x{cfg.upsample:g} "
        f"(proxy over {cfg.record_fraction:.3g} of the run = {proxy_steps(cfg, cfg.record_fraction)} steps, "
        f"{cfg.proxy_checkpoints} checkpoints), {cfg.seeds} seeds (first {cfg.seed}); mean ± 95% CI over seeds. "
        f"Entropy in nats and as a fraction of its maximum ln d = {math.log(cfg.d):.3f}. "
        "Stalled: runs with a direction whose learned map ends below half its optimum (still at its saddle); "
        "entropy means are over the runs that learned every direction. Beyond delay: the entropy gain left after "
        "subtracting that of the same seed's GD learning times all delayed by the run's extra wait before its "
        "first direction is learned, / ln d (0: the gain is all delay)."
    )


def _table(res: TheoryResult, init: str) -> list[str]:
    d = res.problem.cfg.d
    head = (
        "| init | arm | "
        + " | ".join(f"t{i + 1}" for i in range(d))
        + " | entropy | entropy / ln d | Δentropy vs GD | Δ / ln d | beyond delay | final test loss | Δloss vs GD "
        "| learned | stalled runs |"
    )
    lines = [head, "|" + "---|" * (d + 11)]
    for arm in res.problem.arms:
        s = res.summary[f"{init}/{arm}"]
        cells = [_fmt(m, h, 1) for m, h in s["learning_times"]]
        lines.append(
            f"| {init} | {arm_label(arm)} | "
            + " | ".join(cells)
            + f" | {_ci(s['entropy'], 4)} | {_ci(s['entropy_fraction'], 4)}"
            + f" | {_ci(s['delta_entropy_vs_gd'], 4)} | {_ci(s['delta_fraction_vs_gd'], 4)}"
            + f" | {_ci(s['beyond_delay_fraction_vs_gd'], 4)}"
            + f" | {_ci(s['final_test_loss'], 4)} | {_ci(s['delta_test_loss_vs_gd'], 4)} | {s['learned']}"
            + f" | {s['stalled_runs']}/{s['runs']} |"
        )
    if init == "aligned":
        lines += _ode_rows(res)
    return lines


def _ode_rows(res: TheoryResult) -> list[str]:
    d = res.problem.cfg.d
    gd_entropy = res.ode["gd"].entropy
    rows = []
    for arm in OPTIMIZER_ARMS:
        o = res.ode[arm]
        delta = o.entropy - gd_entropy
        rows.append(
            f"| ODE | {arm_label(arm)} | "
            + " | ".join("n/a" if not np.isfinite(x) else f"{x:.1f}" for x in o.learning_times)
            + f" | {_fmt(o.entropy, math.nan, 4)} | {_fmt(fraction_of_max(o.entropy, d), math.nan, 4)}"
            + f" | {_fmt(delta, math.nan, 4)} | {_fmt(fraction_of_max(delta, d), math.nan, 4)} | | | | | |"
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
    """Each main reweighted pool's upsampled fraction and growth factors, and the uniform pools' noise."""
    lines = [
        "Reweighted pools: fraction of the pool upsampled, and the growth factor r_i = E_pool,w[y_q (s.u_i)(x_q.u_i)] "
        "/ E_pool[...] for i = 1..d (small-init learning times scale as 1/(lam_i^2 r_i)); seed means:"
    ]
    for arm in (a for a in res.problem.arms if a in res.problem.pool_arms):
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
    sw, d = res.rho_sweep, res.problem.cfg.d
    return (
        f"ODE entropy against rho, as a fraction of ln d (GD: {fraction_of_max(res.ode['gd'].entropy, d):.4f}; "
        f"aligned per-head stall at rho = sqrt(3) v0 = {sw['stall_rho_per_head']:.4g}): "
        + "; ".join(
            f"rho={r:.3g}: per-head {a:.4f}, global {b:.4f}"
            for r, a, b in zip(
                sw["sam_head"]["rho"], sw["sam_head"]["entropy_fraction"], sw["sam_global"]["entropy_fraction"]
            )
        )
        + "."
    )


def _sweep_tables(res: TheoryResult) -> list[str]:
    cfg = res.problem.cfg
    lines = [
        f"SAM against rho (random init, {cfg.seeds} seeds; rho 0 is GD). Stalled: seeds with a direction still at "
        "its saddle at the end; unsettled: seeds with one still rising at 80% of the run. First learning: the "
        "time the first direction is learned over GD's, paired by seed (> 1: a wait at the saddle). Beyond delay: "
        "the entropy minus that of the same seed's GD learning times all delayed by that wait, / ln d (0: the "
        "gain is all delay). ODE: the reduced ODE from the aligned init at v0, stalled = directions never "
        "learned (late = learned after T)."
    ]
    for arm in ("sam_head", "sam_global"):
        lines += [
            "",
            f"{arm_label(arm)}:",
            "",
            "| rho | rho / v0 | entropy | entropy / ln d | Δ / ln d vs GD | beyond delay | stalled | unsettled "
            "| first learning / GD's | final test loss | Δloss vs GD | ODE entropy / ln d | ODE beyond delay "
            "| ODE stalled (late) | ODE first / GD's |",
            "|" + "---|" * 15,
        ]
        for r in res.sweep[arm]:
            o = r["ode"] or {
                "entropy_fraction": math.nan,
                "beyond_delay_fraction": math.nan,
                "stalled": "n/a",
                "late": "n/a",
                "first_time_ratio": math.nan,
            }
            lines.append(
                f"| {r['rho']:g} | {r['rho'] / cfg.init_scale:.2g} | {_ci(r['entropy'], 4)} "
                f"| {_ci(r['entropy_fraction'], 4)} | {_ci(r['delta_fraction_vs_gd'], 4)} "
                f"| {_ci(r['beyond_delay_fraction_vs_gd'], 4)} "
                f"| {r['stalled_runs']}/{r['runs']} | {r['unsettled_runs']}/{r['runs']} "
                f"| {_ci(r['first_time_ratio_vs_gd'], 2)} | {_ci(r['final_test_loss'], 4)} "
                f"| {_ci(r['delta_test_loss_vs_gd'], 4)} | {_fmt(o['entropy_fraction'], math.nan, 4)} "
                f"| {_fmt(o['beyond_delay_fraction'], math.nan, 4)} "
                f"| {o['stalled']} ({o['late']}) | {_fmt(o['first_time_ratio'], math.nan, 2)} |"
            )
    return lines


def _search_table(res: TheoryResult) -> list[str]:
    p = res.problem
    lines = [
        f"Reshaped pools (GD, random init, {p.cfg.seeds} seeds): k-means on the proxy's loss trajectory ('loss') or "
        "last-checkpoint loss ('final'), the proxy run over a fraction of the target's run, the hard cluster "
        "counted x times.",
        "",
        "| features | proxy fraction | x | upsampled | entropy | entropy / ln d | Δ / ln d vs GD | beyond delay "
        "| stalled, unsettled | first learning / GD's | final test loss | Δloss vs GD |",
        "|" + "---|" * 12,
    ]
    for r in res.search:
        frac = np.mean([h[p.arm_of(r["arm"])]["fraction"] for h in res.hard])
        lines.append(
            f"| {r['features']} | {r['record_fraction']:.3g} | {r['upsample']:g} | {frac:.1%} "
            f"| {_ci(r['entropy'], 4)} | {_ci(r['entropy_fraction'], 4)} | {_ci(r['delta_fraction_vs_gd'], 4)} "
            f"| {_ci(r['beyond_delay_fraction_vs_gd'], 4)} | {_not_learned(r)} "
            f"| {_ci(r['first_time_ratio_vs_gd'], 2)} | {_ci(r['final_test_loss'], 4)} "
            f"| {_ci(r['delta_test_loss_vs_gd'], 4)} |"
        )
    return lines


def _not_learned(r: dict) -> str:
    return f"{r['stalled_runs']}, {r['unsettled_runs']} of {r['runs']}"


_COMPARED = {"gd": "GD", "sam_head": "SAM per-head", "sam_global": "SAM global", "reshaped": "best reshaped GD"}


def _comparison_rows(rows: dict) -> list[str]:
    lines = [
        "| arm | setting | entropy | entropy / ln d | Δentropy vs GD | Δ / ln d | beyond delay | stalled, unsettled "
        "| first learning / GD's | final test loss | Δloss vs GD |",
        "|" + "---|" * 11,
    ]
    for key, label in _COMPARED.items():
        if key not in rows:
            continue
        r = rows[key]
        lines.append(
            f"| {label} | {r.get('label', '')} | {_ci(r['entropy'], 4)} | {_ci(r['entropy_fraction'], 4)} "
            f"| {_ci(r['delta_entropy_vs_gd'], 4)} | {_ci(r['delta_fraction_vs_gd'], 4)} "
            f"| {_ci(r['beyond_delay_fraction_vs_gd'], 4)} | {_not_learned(r)} "
            f"| {_ci(r['first_time_ratio_vs_gd'], 2)} | {_ci(r['final_test_loss'], 4)} "
            f"| {_ci(r['delta_test_loss_vs_gd'], 4)} |"
        )
    return lines


def _comparison_table(res: TheoryResult) -> list[str]:
    c = res.comparison
    lines = [
        "How far the data lever gets: GD, the best SAM of each normalization among the radii where every seed "
        "learned every direction, and the best reshaped pool of the search, all chosen by mean entropy on these "
        "seeds (never by test loss; the best of many is biased upward, so see the rerun on fresh seeds below).",
        "",
        *_comparison_rows(c),
    ]
    if "reshaped_share_of_sam_gain" in c:
        share = c["reshaped_share_of_sam_gain"]
        lines += ["", f"The best reshaping reaches {share:.0%} of the best SAM's entropy gain."]
    return lines


def _confirm_table(res: TheoryResult) -> list[str]:
    cfg = res.confirm["config"]
    rows = dict(res.confirm["rows"])
    for arm in ("sam_head", "sam_global"):
        rows[arm] = {**rows[arm], "label": f"rho {rows[arm]['rho']:g}"}
    reshaped = [a for a in rows if a.startswith("reshaped:")]
    if reshaped:
        rows["reshaped"] = {
            **rows[reshaped[0]],
            "label": f"{cfg['hard_features'][0]}, x{cfg['upsample']:g}, proxy {cfg['record_fraction']:.3g} of the run",
        }
    lines = [
        f"The same choices rerun on {cfg['seeds']} fresh seeds ({cfg['seed']}..{cfg['seed'] + cfg['seeds'] - 1}), "
        "random init:",
        "",
        *_comparison_rows(rows),
    ]
    sam_gain = max(rows[a]["delta_entropy_vs_gd"][0] for a in ("sam_head", "sam_global"))
    if "reshaped" in rows and sam_gain > 0:
        share = rows["reshaped"]["delta_entropy_vs_gd"][0] / sam_gain
        lines += ["", f"On the fresh seeds the reshaping reaches {share:.0%} of the best SAM's entropy gain."]
    return lines


# ----------------------------------------------------------------------------- plots


def write_plots(res: TheoryResult, out: Path) -> None:
    """loss.png, directions.png, learning_times.png, ode.png (with the aligned init), entropy_vs_rho.png;
    stalls_vs_rho.png with the sweep, search.png with the search."""
    _save(_loss(res), TheoryDir(out).plot("loss"))
    _save(_directions(res), TheoryDir(out).plot("directions"))
    _save(_learning_times(res), TheoryDir(out).plot("learning_times"))
    if "aligned" in res.problem.inits:
        _save(_ode(res), TheoryDir(out).plot("ode"))
    _save(_entropy_vs_rho(res), TheoryDir(out).plot("entropy_vs_rho"))
    if res.sweep:
        _save(_stalls_vs_rho(res), TheoryDir(out).plot("stalls_vs_rho"))
    if res.search:
        _save(_search(res), TheoryDir(out).plot("search"))


def _pyplot():
    # imported on first use, with the file-only backend: importing datalever.theory stays light
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nats_axis(ax, d: int) -> None:
    """A right-hand axis in nats beside a left-hand one in fractions of ln d."""
    ln_d = math.log(d)
    ax.secondary_yaxis("right", functions=(lambda f: f * ln_d, lambda h: h / ln_d)).set_ylabel("nats")


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
            m, h = res.summary[f"{init}/{arm}"]["delta_fraction_vs_gd"]
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
                    fraction_of_max(res.ode[arm].entropy - res.ode["gd"].entropy, res.problem.cfg.d),
                    "k*",
                    ms=9,
                    label="reduced ODE" if k == 0 else None,
                )
    ax.set_xticks([(na - 2) / 2 + na * j for j in range(len(inits))], [f"{i} init" for i in inits])
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="Δ entropy vs GD / ln d (paired by seed)", title="simplicity bias change (> 0: lower bias)")
    _nats_axis(ax, res.problem.cfg.d)
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
    """Entropy against rho, both normalizations: the simulated sweep (mean ± CI over the seeds that learned every
    direction; an open marker where some seeds stalled) and the reduced ODE (dashed)."""
    plt, cfg, ode = _pyplot(), res.problem.cfg, res.rho_sweep
    colors = _arm_colors(res.problem.arms)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, arm in zip(axes, ("sam_head", "sam_global")):
        ax.plot(ode[arm]["rho"], ode[arm]["entropy_fraction"], "--", color=colors[arm], label="reduced ODE (aligned)")
        if res.sweep:
            _sweep_points(ax, res.sweep[arm], "entropy_fraction", colors[arm])
            gd = res.summary["random/gd"]["entropy_fraction"][0]
            ax.axhline(gd, color="C0", lw=0.8, label="GD (random init)")
        ax.axvline(ode["stall_rho_per_head"], color="k", lw=0.5, ls=":", label="√3·v0 (aligned per-head stall)")
        ax.set(xlabel="rho", ylabel="entropy / ln d", title=f"{arm_label(arm)}: entropy against rho")
        _nats_axis(ax, cfg.d)
        ax.legend(fontsize=7)
    return fig


def _sweep_points(ax, rows: list[dict], key: str, color: str) -> None:
    """Mean ± CI per radius; filled where every seed learned every direction, open where some did not."""
    for r in rows:
        m, h = r[key]
        if not np.isfinite(m):
            continue
        ok = r["seeds_with_entropy"] == r["runs"]
        ax.errorbar(
            r["rho"], m, yerr=0 if not np.isfinite(h) else h, fmt="o", color=color, mfc=color if ok else "white", ms=5
        )
    ax.plot([], [], "o", color=color, label="simulation (random init; open: some seeds stalled)")


def _stalls_vs_rho(res: TheoryResult):
    """Seeds that stalled, the wait before the first direction is learned, the entropy gain beyond that delay,
    and the final test loss, against rho."""
    plt, cfg = _pyplot(), res.problem.cfg
    colors = _arm_colors(res.problem.arms)
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for arm in ("sam_head", "sam_global"):
        rows, c = res.sweep[arm], colors[arm]
        rho = [r["rho"] for r in rows]
        axes[0].plot(rho, [r["stalled_runs"] for r in rows], "o-", color=c, label=f"{arm_label(arm)}: stalled")
        axes[0].plot(rho, [r["unsettled_runs"] for r in rows], "x:", color=c, label=f"{arm_label(arm)}: unsettled")
        _errorline(axes[1], rho, [r["first_time_ratio_vs_gd"] for r in rows], c, arm_label(arm))
        ode = res.rho_sweep[arm]
        axes[1].plot(ode["rho"], ode["first_time_ratio"], "--", color=c, lw=1)
        _errorline(axes[2], rho, [r["beyond_delay_fraction_vs_gd"] for r in rows], c, arm_label(arm))
        axes[2].plot(ode["rho"], ode["beyond_delay_fraction"], "--", color=c, lw=1)
        _errorline(axes[3], rho, [r["final_test_loss"] for r in rows], c, arm_label(arm))
    axes[0].set(xlabel="rho", ylabel=f"seeds (of {cfg.seeds})", title="seeds with a direction stalled / unsettled")
    axes[1].set(
        xlabel="rho", ylabel="first learning time / GD's", yscale="log", title="wait at the saddle (ODE dashed)"
    )
    axes[2].set(
        xlabel="rho", ylabel="Δentropy / ln d beyond delay", title="entropy gain left after the delay (ODE dashed)"
    )
    axes[2].axhline(0, color="k", lw=0.5)
    axes[3].set(xlabel="rho", ylabel="final test loss", title="final test loss (mean ± CI)")
    for ax in axes:
        ax.axvline(res.rho_sweep["stall_rho_per_head"], color="k", lw=0.5, ls=":")
        ax.legend(fontsize=7)
    return fig


def _errorline(ax, x, pairs, color: str, label: str) -> None:
    m = np.array([p[0] for p in pairs], float)
    h = np.nan_to_num(np.array([p[1] for p in pairs], float))
    ax.errorbar(x, m, yerr=h, fmt="o-", color=color, label=label, ms=4, lw=1)


def _search(res: TheoryResult):
    """Every reshaped pool of the search on the axes entropy and final test loss, beside GD and the SAM sweep
    (the SAM radii where every seed learned every direction)."""
    plt, d = _pyplot(), res.problem.cfg.d
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = _arm_colors(res.problem.arms)
    fracs = sorted({r["record_fraction"] for r in res.search})
    fcol = dict(zip(fracs, plt.cm.plasma(np.linspace(0.05, 0.85, len(fracs)))))
    used = {r["features"] for r in res.search}
    for feats, marker in (
        (f, m) for f, m in (("loss", "o"), ("final", "s"), ("log", "^"), ("ratio", "v")) if f in used
    ):
        for r in (r for r in res.search if r["features"] == feats and np.isfinite(r["entropy_fraction"][0])):
            ax.scatter(
                r["final_test_loss"][0],
                r["entropy_fraction"][0],
                s=12 * r["upsample"] + 10,
                marker=marker,
                color=fcol[r["record_fraction"]],
                edgecolor="k" if r["seeds_with_entropy"] == r["runs"] else "r",
                lw=0.6,
            )
        ax.scatter([], [], marker=marker, color="0.6", label=f"reshaped ({feats}); size: upsample")
    for f, c in fcol.items():
        ax.scatter([], [], marker="o", color=c, label=f"proxy over {f:.3g} of the run")
    if res.sweep:
        for arm in ("sam_head", "sam_global"):
            ok = [r for r in res.sweep[arm] if r["seeds_with_entropy"] == r["runs"]]
            ax.plot(
                [r["final_test_loss"][0] for r in ok],
                [r["entropy_fraction"][0] for r in ok],
                "-+",
                color=colors[arm],
                label=f"{arm_label(arm)} over rho (no stalls)",
            )
    gd = res.summary["random/gd"]
    ax.plot(gd["final_test_loss"][0], gd["entropy_fraction"][0], "*", color="C0", ms=14, label="GD")
    ax.set(
        xlabel="final test loss (seed mean)",
        ylabel="entropy / ln d (seed mean)",
        title="data lever vs SAM (red edge: some seeds stalled)",
    )
    _nats_axis(ax, d)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.15, 1.0))
    return fig
