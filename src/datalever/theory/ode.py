"""The reduced ODEs of aligned, balanced heads (docs/theory.md): their curves and learning times, and
what is computed from them for a run: the optimizer arms in the ODEs, a sweep over rho, and how the
aligned-init simulation compares with them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from datalever.theory.runs import MODES, OPTIMIZER_ARMS, Problem, entropy, fraction_of_max

# ----------------------------------------------------------------------------- the reduced ODEs


def ode_curves(lam, kap, v0: float, rho, mode: int, T: float, dt: float, record_every: int = 10):
    """Integrate the reduced dynamics of d aligned, balanced heads (v = value = key = query scale):

        dv_i/dt = G_i(v~),  G_i(v) = lam_i^2 v_i^2 (1 - kappa_i lam_i v_i^3),
        v~_i = v_i (GD), v_i - rho/sqrt(3) sign(G_i(v)) (SAM per head),
        v~_i = v_i - rho/sqrt(3) G_i(v)/|G(v)| (SAM global).

    rho may be an array (B,) for a batch of radii. Fixed-step RK4, used for the plotted curves
    (ode_learning_times gives the learning times; it also handles stiff small-init cases).
    Returns t (L,), m = lam v^3 (L, B, d)."""
    lam = np.asarray(lam, float)[None, :]
    kap = np.asarray(kap, float)[None, :]
    c = np.atleast_1d(np.asarray(rho, float))[:, None] / math.sqrt(3.0)
    v = np.full((c.shape[0], lam.shape[1]), float(v0))

    def G(v):
        return lam**2 * v**2 * (1.0 - kap * lam * v**3)

    def f(v):
        g = G(v)
        if mode == 0:
            return g
        if mode == 1:
            s = np.sign(g)
        else:
            s = g / np.maximum(np.sqrt((g**2).sum(1, keepdims=True)), 1e-300)
        return G(v - c * s)

    n = int(round(T / dt))
    ts, ms = [0.0], [lam * v**3]
    for k in range(1, n + 1):
        k1 = f(v)
        k2 = f(v + 0.5 * dt * k1)
        k3 = f(v + 0.5 * dt * k2)
        k4 = f(v + dt * k3)
        v = v + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        if k % record_every == 0 or k == n:
            ts.append(k * dt)
            ms.append(lam * v**3)
    return np.array(ts), np.stack(ms)


def gd_blowup_time(lam, v0: float) -> np.ndarray:
    """Small-init limit of GD's learning time: tau v' = lam^2 v^2 gives v(t) = v0/(1 - lam^2 v0 t),
    which diverges at t* = 1/(lam^2 v0) (tau = 1)."""
    return 1.0 / (np.asarray(lam, float) ** 2 * v0)


def ode_learning_times(lam, kap, v0: float, rho: float, mode: int, t_max: float | None = None) -> np.ndarray:
    """Learning times of the reduced ODEs: the time at which m_i = lam_i v_i^3 reaches half of its
    final value m*_i = 1/kappa_i (the GD fixed point; SAM slides along it too). NaN if never.

    GD and SAM per head are decoupled and before the half-point (G > 0) SAM per head is GD in
    u = v - rho/sqrt(3), so t_i = int_{u0}^{u_half} du / G_i(u) exactly (quadrature). SAM global
    couples the directions through |G|: integrated with an adaptive solver (LSODA) and crossing events."""
    lam = np.asarray(lam, float)
    kap = np.asarray(kap, float)
    if mode in (0, 1) or rho == 0:
        shift = rho / math.sqrt(3.0) if (mode == 1 and rho > 0) else 0.0
        return _decoupled_learning_times(lam, kap, v0, shift)
    if t_max is None:
        t_max = 100.0 * float(gd_blowup_time(lam, v0).max())
    return _global_sam_learning_times(lam, kap, v0, rho / math.sqrt(3.0), t_max)


def _decoupled_learning_times(lam, kap, v0: float, shift: float) -> np.ndarray:
    """GD in u = v - shift from u0 = v0 - shift, up to the half-point, by quadrature."""
    from scipy.integrate import quad

    u0 = v0 - shift
    out = np.full(len(lam), np.nan)
    if u0 <= 0:
        return out  # the perturbed point sits at or behind the saddle: the head stalls at v = rho/sqrt(3)
    v_half = (0.5 / (kap * lam)) ** (1.0 / 3.0)
    for i, (lam_i, kap_i, vh) in enumerate(zip(lam, kap, v_half)):
        uh = vh - shift
        beta = kap_i * lam_i
        # 1/(u^2 (1 - beta u^3)) = 1/u^2 + beta u / (1 - beta u^3)
        rest = quad(lambda u: beta * u / (1.0 - beta * u**3), u0, uh, epsabs=1e-12, epsrel=1e-10)[0]
        out[i] = ((1.0 / u0 - 1.0 / uh) + rest) / lam_i**2
    return out


def _global_sam_learning_times(lam, kap, v0: float, c: float, t_max: float) -> np.ndarray:
    """SAM global (perturbation c G/|G| per factor): an adaptive solver with one crossing event per direction."""
    from scipy.integrate import solve_ivp

    def rhs(t, v):
        g = lam**2 * v**2 * (1.0 - kap * lam * v**3)
        s = g / max(float(np.sqrt((g**2).sum())), 1e-300)
        u = v - c * s
        return lam**2 * u**2 * (1.0 - kap * lam * u**3)

    events = []
    for i in range(len(lam)):

        def ev(t, v, i=i):
            return lam[i] * v[i] ** 3 - 0.5 / kap[i]

        ev.direction = 1
        events.append(ev)

    def last(t, v):  # stops the solver once every direction has crossed
        return float(np.min(lam * v**3 - 0.5 / kap))

    last.direction = 1
    last.terminal = True
    sol = solve_ivp(
        rhs, (0.0, t_max), np.full(len(lam), float(v0)), method="LSODA", rtol=1e-9, atol=1e-14, events=events + [last]
    )
    return np.array([e[0] if len(e) else np.nan for e in sol.t_events[: len(lam)]])


# ----------------------------------------------------------------------------- the ODEs for the run's arms


@dataclass
class OdeArm:
    learning_times: list[float]
    entropy: float
    t: np.ndarray  # (L,) times of the plotted curve
    m: np.ndarray  # (L, d) learned map per direction


def ode_arms(problem: Problem) -> dict[str, OdeArm]:
    """GD, SAM per head and SAM global in the reduced ODEs, at the runs' init scale and radii."""
    cfg = problem.cfg
    T = cfg.steps * cfg.lr
    res = {}
    for arm in OPTIMIZER_ARMS:
        mode = MODES[arm]
        rho = problem.specs[arm].rho
        times = ode_learning_times(problem.lam, problem.kap, cfg.init_scale, rho, mode)
        t, m = ode_curves(problem.lam, problem.kap, cfg.init_scale, rho, mode, T, cfg.ode_dt)
        res[arm] = OdeArm(times.tolist(), entropy(times), t, m[:, 0])
    return res


def sweep_radii(problem: Problem) -> dict[str, list[float]]:
    """Normalization -> the sweep's radii (the simulated ones; without the simulated sweep, 10 radii from 0
    to 1.5 x the per-head stall radius sqrt(3) x init_scale, for the ODE alone)."""
    cfg = problem.cfg
    if cfg.sweep:
        return {"sam_head": list(cfg.sweep_rho_per_head), "sam_global": list(cfg.sweep_rho_global)}
    default = (np.linspace(0.0, 1.5, 10) * math.sqrt(3.0) * cfg.init_scale).tolist()
    return {"sam_head": default, "sam_global": default}


def rho_sweep(problem: Problem) -> dict:
    """The reduced ODEs of both SAM normalizations over the sweep's radii: learning times, entropy (nats and
    fraction of ln d), stalled directions (never reaching half their optimum, up to 100 x GD's slowest time),
    late ones (learned after the simulated run's end T), the first learning time against GD's (the wait at
    the saddle) and the entropy beyond that of GD's times delayed by the same wait (report.entropy_beyond_delay)."""
    cfg = problem.cfg
    lam, kap, v0 = problem.lam, problem.kap, cfg.init_scale
    gd_times = ode_learning_times(lam, kap, v0, 0.0, 0)
    gd_first = float(np.min(gd_times))
    T = cfg.steps * cfg.lr
    sweep = {"stall_rho_per_head": math.sqrt(3.0) * v0}
    for arm, radii in sweep_radii(problem).items():
        lts = [ode_learning_times(lam, kap, v0, float(r), MODES[arm]) for r in radii]
        ent = [entropy(x) for x in lts]
        sweep[arm] = {
            "rho": [float(r) for r in radii],
            "entropy": ent,
            "entropy_fraction": [fraction_of_max(h, cfg.d) for h in ent],
            "stalled": [int(np.isnan(x).sum()) for x in lts],
            "late": [int((x > T).sum()) for x in lts],
            "first_time_ratio": [float(np.nanmin(x)) / gd_first if np.isfinite(x).any() else math.nan for x in lts],
            "beyond_delay_fraction": [
                fraction_of_max(h - entropy(gd_times + (np.min(x) - gd_first)), cfg.d) for h, x in zip(ent, lts)
            ],
            "learning_times": [x.tolist() for x in lts],
        }
    return sweep


def ode_vs_simulation(per_run: list[dict], ode: dict[str, OdeArm]) -> dict:
    """Per optimizer arm, the relative error of the aligned runs' learning times against the ODE's."""
    cmp = {}
    for arm in OPTIMIZER_ARMS:
        sim = np.array([p["learning_times"] for p in per_run if p["init"] == "aligned" and p["arm"] == arm])
        o = np.asarray(ode[arm].learning_times)
        rel_runs = (sim - o) / o
        rel_mean = (sim.mean(0) - o) / o
        cmp[arm] = {
            "sim_mean": sim.mean(0).tolist(),
            "ode": o.tolist(),
            "rel_err_of_mean": rel_mean.tolist(),
            "max_abs_rel_err_of_mean": _max_abs(rel_mean),
            "max_abs_rel_err_per_run": _max_abs(rel_runs),
        }
    return cmp


def _max_abs(x: np.ndarray) -> float:
    """NaN when any entry is (a direction not learned in the simulation or the ODE)."""
    return float(np.max(np.abs(x))) if np.isfinite(x).all() else float("nan")
