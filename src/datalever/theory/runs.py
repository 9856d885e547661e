"""The runs: the arms and the grid of runs (init x arm x seed), each seed's pools (uniform, and
reweighted by a proxy's hard cluster or a control set), training every run at once, and what each
run measures (learning times and their entropy)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from datalever.progress import bar as progress_bar
from datalever.theory.config import TheoryConfig
from datalever.theory.model import (
    Features,
    Stats,
    aligned_init,
    covariance,
    drive,
    kappa,
    pool_stats,
    random_init,
    rows_index,
    sample_sequences,
    spectrum,
    train,
    upsampled_stats,
)

DTYPE = torch.float64
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz

# ----------------------------------------------------------------------------- arms and the grid of runs

# the optimizers, as `train` takes them (mode)
MODES = {"gd": 0, "sam_head": 1, "sam_global": 2}
OPTIMIZER_ARMS = ("gd", "sam_head", "sam_global")
CONTROL_ARMS = ("easy", "random")


@dataclass(frozen=True)
class ArmSpec:
    """What a run trains with: an optimizer and its radius, on the uniform pool or on a reweighted one (a
    selection of the pool counted `upsample` times, picked from a proxy run of `record_fraction` x steps)."""

    optimizer: str = "gd"
    rho: float = 0.0
    selector: str | None = None  # None: the uniform pool; a hard feature ('loss', 'final', ...), 'easy' or 'random'
    upsample: float = 1.0
    record_fraction: float = 0.0

    @property
    def mode(self) -> int:
        return MODES[self.optimizer]

    @property
    def pool_key(self) -> tuple | None:
        """Runs with the same key (and seed) train on the same pool; None: the uniform pool."""
        return None if self.selector is None else (self.selector, self.upsample, self.record_fraction)


def sam_spec(optimizer: str, rho: float) -> ArmSpec:
    """SAM at radius 0 is GD exactly (tested), so it is GD's spec and shares GD's runs."""
    return ArmSpec() if rho == 0 else ArmSpec(optimizer, float(rho))


def pool_spec(selector: str, upsample: float, record_fraction: float) -> ArmSpec:
    return ArmSpec("gd", 0.0, selector, float(upsample), float(record_fraction))


def arms_of(cfg: TheoryConfig) -> list[str]:
    """The main arms (the table's rows): the optimizers, one reshaped arm per hard feature, the controls."""
    return [*OPTIMIZER_ARMS, *(f"reshaped:{f}" for f in cfg.hard_features), *(CONTROL_ARMS if cfg.controls else ())]


def main_specs(cfg: TheoryConfig) -> dict[str, ArmSpec]:
    specs = {
        "gd": ArmSpec(),
        "sam_head": sam_spec("sam_head", cfg.rho_per_head),
        "sam_global": sam_spec("sam_global", cfg.rho_global),
    }
    for f in cfg.hard_features:
        specs[f"reshaped:{f}"] = pool_spec(f, cfg.upsample, cfg.record_fraction)
    for c in CONTROL_ARMS if cfg.controls else ():
        specs[c] = pool_spec(c, cfg.upsample, cfg.record_fraction)
    return specs


def sweep_arm_name(optimizer: str, rho: float) -> str:
    return f"{optimizer}@{rho:g}"


def search_arm_name(spec: ArmSpec) -> str:
    return f"search:{spec.selector}:x{spec.upsample:g}:f{spec.record_fraction:.3g}"


def extra_specs(cfg: TheoryConfig) -> dict[str, ArmSpec]:
    """The sweep's SAM arms and the search's reshaped pools (random init only), by name."""
    specs = {}
    if cfg.sweep:
        for opt, radii in (("sam_head", cfg.sweep_rho_per_head), ("sam_global", cfg.sweep_rho_global)):
            for rho in radii:
                specs[sweep_arm_name(opt, rho)] = sam_spec(opt, rho)
    if cfg.search:
        for f in cfg.search_features:
            for frac in cfg.search_record_fraction:
                for up in cfg.search_upsample:
                    spec = pool_spec(f, up, frac)
                    specs[search_arm_name(spec)] = spec
    return specs


class RunSpec(NamedTuple):
    init: str  # "random" or "aligned"
    arm: str
    s: int  # seed index: the seed is cfg.seed + s


@dataclass
class Problem:
    """What every run shares (spectrum, eigenbasis, finite-N factors, features) and the grid of runs."""

    cfg: TheoryConfig
    device: torch.device
    lam: np.ndarray  # eigenvalues of Sigma, descending
    lam_t: torch.Tensor  # the same, on the device
    U: torch.Tensor  # eigenvectors (columns), on the device
    kap: np.ndarray  # finite-N factors; the optimum of direction i is 1/kappa_i
    feat: Features
    inits: list[str]
    arms: list[str]  # the main arms (the table's rows), trained from every init
    specs: dict[str, ArmSpec]  # every arm that has runs (main arms first), by name
    alias: dict[str, str]  # sweep or search name -> the arm whose runs it shares (the same spec)
    runs: list[RunSpec]

    @property
    def m_star(self) -> np.ndarray:
        return 1.0 / self.kap

    @property
    def pool_arms(self) -> list[str]:
        return [a for a, spec in self.specs.items() if spec.selector is not None]

    def inits_of(self, arm: str) -> list[str]:
        """The main arms run from every init; the sweep and the search from the random init only."""
        return self.inits if arm in self.arms else ["random"]

    def arm_of(self, name: str) -> str:
        """The arm whose runs a sweep or search name stands for."""
        return self.alias.get(name, name)

    def run_index(self, init: str, arm: str, s: int) -> int:
        return self.runs.index(RunSpec(init, self.arm_of(arm), s))


def make_problem(cfg: TheoryConfig) -> Problem:
    device = torch.device(cfg.device)
    lam = spectrum(cfg)
    _, lam_t, U = covariance(lam, cfg.rotate)
    inits = ["random"] + (["aligned"] if cfg.aligned else [])
    arms = arms_of(cfg)
    specs, alias = _dedupe(main_specs(cfg), extra_specs(cfg))
    problem = Problem(
        cfg=cfg,
        device=device,
        lam=lam,
        lam_t=lam_t.to(device),
        U=U.to(device),
        kap=kappa(lam, cfg.context),
        feat=Features(cfg.d, device, DTYPE),
        inits=inits,
        arms=arms,
        specs=specs,
        alias=alias,
        runs=[],
    )
    problem.runs = _run_grid(problem)
    return problem


def _dedupe(main: dict[str, ArmSpec], extra: dict[str, ArmSpec]) -> tuple[dict[str, ArmSpec], dict[str, str]]:
    """An extra arm with the spec of an earlier arm shares its runs (the same numbers, trained once)."""
    specs, alias = dict(main), {}
    by_spec = {}
    for name, spec in main.items():
        by_spec.setdefault(spec, name)
    for name, spec in extra.items():
        if spec in by_spec:
            alias[name] = by_spec[spec]
        else:
            specs[name] = spec
            by_spec[spec] = name
    return specs, alias


def _run_grid(problem: Problem) -> list[RunSpec]:
    # seed-major order, the uniform-pool runs (GD first, then SAM) before the reweighted ones: the runs sharing
    # the uniform pool are a contiguous slice, in the full batch and in the SAM sub-batch
    specs = problem.specs
    order = [a for a in specs if specs[a].mode == 0 and specs[a].selector is None]
    order += [a for a in specs if specs[a].mode > 0]
    order += [a for a in specs if specs[a].selector is not None]
    return [RunSpec(init, arm, s) for s in range(problem.cfg.seeds) for arm in order for init in problem.inits_of(arm)]


# ----------------------------------------------------------------------------- hard sequences and pools


def _kmeans2(X: np.ndarray, seed: int):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    # one thread: on a busy two-core machine k-means' OpenMP threads took seconds per fit instead of 0.1 s
    with threadpool_limits(1):
        return KMeans(n_clusters=2, n_init=10, random_state=seed).fit(X).labels_


def select_hard(traj: np.ndarray, features: str, seed: int) -> np.ndarray:
    """traj (P, K) per-sequence losses at K proxy checkpoints -> boolean mask of the hard cluster
    (k-means, k=2; the hard cluster is the one with the higher mean loss, or for 'ratio' the one
    whose loss fell least)."""
    if not np.all(np.isfinite(traj)):
        raise ValueError("non-finite proxy losses")
    if features == "loss":
        X, score = traj, traj.mean(1)
    elif features == "log":
        X = np.log(traj + 1e-12)
        score = X.mean(1)
    elif features == "ratio":
        X = np.diff(np.log(traj + 1e-12), axis=1)
        score = X.sum(1)
    elif features == "final":
        X, score = traj[:, -1:], traj[:, -1]
    else:
        raise ValueError(f"unknown hard_features {features!r}")
    lab = _kmeans2(X, seed)
    hard = int(np.argmax([score[lab == k].mean() for k in range(2)]))
    return lab == hard


def proxy_steps(cfg: TheoryConfig, fraction: float) -> int:
    """The proxy's run: `fraction` of the target's steps, at least one step per checkpoint."""
    return max(cfg.proxy_checkpoints, int(round(fraction * cfg.steps)))


def checkpoint_steps(cfg: TheoryConfig, fraction: float) -> list[int]:
    """The proxy steps at which each sequence's loss is recorded: evenly spaced, the last at the run's end."""
    n = proxy_steps(cfg, fraction)
    return np.linspace(0, n, cfg.proxy_checkpoints + 1).round().astype(int)[1:].tolist()


def selections(problem: Problem, trajs: dict[float, np.ndarray], seed: int) -> dict[tuple, np.ndarray]:
    """(selector, record fraction) -> boolean mask of the sequences a pool arm upsamples. The controls take as
    many sequences as the first main hard cluster (a tenth of the pool without one), so they differ only in
    which ones."""
    cfg = problem.cfg
    keys = {(spec.selector, spec.record_fraction) for spec in (problem.specs[a] for a in problem.pool_arms)}
    chosen = {k: select_hard(trajs[k[1]], k[0], seed) for k in keys if k[0] not in CONTROL_ARMS}
    if any(k[0] in CONTROL_ARMS for k in keys):
        first = (cfg.hard_features[0], cfg.record_fraction) if cfg.hard_features else None
        n_hard = int(chosen[first].sum()) if first in chosen else cfg.pool // 10
        traj = trajs[cfg.record_fraction]
        chosen[("easy", cfg.record_fraction)] = _mask(
            cfg.pool, np.argsort(traj.mean(1), kind="stable")[:n_hard]
        )  # lowest mean loss
        chosen[("random", cfg.record_fraction)] = _mask(
            cfg.pool, np.random.default_rng(seed).choice(cfg.pool, n_hard, replace=False)
        )
    return chosen


def _mask(n: int, rows) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


@dataclass
class Pools:
    groups: list  # (rows of the runs, Stats of the pool they train on)
    test_groups: list  # (rows of the runs, Stats of their seed's test set)
    hard: list[dict]  # per seed: proxy checkpoints, pool drive, and each pool arm's fraction and growth factors
    theta0: torch.Tensor  # (R, 3, H, d+1) initial parameters of every run


def build_pools(problem: Problem) -> Pools:
    cfg = problem.cfg
    members = _pool_members(problem)
    pools = Pools([], [], [], torch.zeros(len(problem.runs), 3, cfg.heads, cfg.d + 1, dtype=DTYPE))
    bar = progress_bar(total=cfg.seeds, desc="theory: pools + proxy", show=cfg.progress, mininterval=1.0)
    for s in range(cfg.seeds):
        # one generator per seed draws the pool, the proxy's init, the test set and the random init, in that
        # order, whatever the arms: reordering or skipping a draw would change every number
        gen = torch.Generator().manual_seed(1000003 * (cfg.seed + s) + 17)
        groups, info = _training_pools(problem, s, gen, members)
        pools.groups += groups
        pools.hard.append(info)
        seed_rows = rows_index([r for r, run in enumerate(problem.runs) if run.s == s])
        pools.test_groups.append((seed_rows, _test_stats(problem, gen)))
        _set_inits(problem, s, random_init(1, cfg.heads, cfg.d, cfg.init_scale, gen, DTYPE)[0], pools.theta0)
        bar.update(1)
    bar.close()
    pools.theta0 = pools.theta0.to(problem.device)
    return pools


def _pool_members(problem: Problem) -> dict[tuple, list[int]]:
    """(seed index, pool key) -> the runs training on that pool; the key None is the uniform pool."""
    members: dict[tuple, list[int]] = {}
    for r, run in enumerate(problem.runs):
        members.setdefault((run.s, problem.specs[run.arm].pool_key), []).append(r)
    return members


def _training_pools(problem: Problem, s: int, gen: torch.Generator, members) -> tuple[list, dict]:
    """Seed s's uniform pool and its reweighted pools, as groups; and the facts about the reweighting."""
    cfg, dev = problem.cfg, problem.device
    tokens, y, _ = sample_sequences(cfg.pool, cfg.context, problem.lam_t.cpu(), problem.U.cpu(), gen, DTYPE)
    F = problem.feat.of_tokens(tokens.to(dev))
    y = y.to(dev)
    uniform = pool_stats(F, y)
    groups = [(rows_index(members[(s, None)]), uniform)]
    proxy_theta = random_init(1, cfg.heads, cfg.d, cfg.init_scale, gen, DTYPE).to(dev)  # drawn with or without arms
    fractions = sorted({problem.specs[a].record_fraction for a in problem.pool_arms})
    trajs = _proxy_losses(problem, F, y, uniform, proxy_theta, fractions)
    chosen = selections(problem, trajs, cfg.seed + s)
    drives = drive(tokens, y.cpu(), problem.U.cpu())
    info = {"checkpoints": cfg.proxy_checkpoints, "pool_drive_over_lam2": (drives.mean(0) / problem.lam**2).tolist()}
    groups += _reweighted_groups(problem, s, members, F, y, uniform, chosen)
    for arm in problem.pool_arms:
        spec = problem.specs[arm]
        info[arm] = _reweighting_facts(drives, chosen[(spec.selector, spec.record_fraction)], spec.upsample)
    return groups, info


def _reweighted_groups(problem: Problem, s: int, members, F, y, uniform: Stats, chosen: dict) -> list:
    """One group per distinct reweighted pool of seed s: the uniform pool's moments mixed with those of the
    upsampled selection (computed once per selection, whatever the number of upsampling factors)."""
    cfg, dev = problem.cfg, problem.device
    parts = {}
    for key, mask in chosen.items():
        rows = torch.from_numpy(mask).to(dev)
        parts[key] = (pool_stats(F[rows], y[rows]), int(mask.sum()))
    groups, done = [], set()
    for arm in problem.pool_arms:
        spec = problem.specs[arm]
        if spec.pool_key in done:
            continue
        done.add(spec.pool_key)
        part, n_part = parts[(spec.selector, spec.record_fraction)]
        stats = upsampled_stats(uniform, part, cfg.pool, n_part, spec.upsample)
        groups.append((rows_index(members[(s, spec.pool_key)]), stats))
    return groups


def _reweighting_facts(drives: np.ndarray, mask: np.ndarray, upsample: float) -> dict:
    """The fraction of the pool upsampled and the growth factor r_i = E_w[drive_i] / E[drive_i]."""
    wn = np.where(mask, upsample, 1.0)
    return {
        "fraction": float(mask.mean()),
        "growth_factor": ((drives * wn[:, None]).sum(0) / wn.sum() / drives.mean(0)).tolist(),
    }


def _proxy_losses(problem: Problem, F, y, uniform: Stats, theta, fractions: list[float]) -> dict[float, np.ndarray]:
    """Per recording fraction, per-sequence losses (P, K) at that fraction's K checkpoints of a proxy: the same
    architecture, its own random init, GD on the uniform pool. One run to the longest fraction serves them all:
    the proxy's trajectory does not depend on where it stops."""
    cfg, feat = problem.cfg, problem.feat
    if not fractions:
        return {}
    wanted = {f: checkpoint_steps(cfg, f) for f in fractions}
    record_at = set().union(*wanted.values())
    losses = {}

    def record(step, th):
        if step in record_at:
            losses[step] = (0.5 * (F @ feat.tensor(th)[0] - y) ** 2).cpu().numpy()

    steps, lam, U = max(record_at), problem.lam_t, problem.U
    train(feat, theta, [(slice(0, 1), uniform)], [0], [0.0], cfg.lr, steps, max(1, steps), lam, U, callback=record)
    return {f: np.stack([losses[k] for k in ks], 1) for f, ks in wanted.items()}


def _test_stats(problem: Problem, gen: torch.Generator) -> Stats:
    cfg = problem.cfg
    tokens, y, _ = sample_sequences(cfg.test, cfg.context, problem.lam_t.cpu(), problem.U.cpu(), gen, DTYPE)
    return pool_stats(problem.feat.of_tokens(tokens.to(problem.device)), y.to(problem.device))


def _set_inits(problem: Problem, s: int, random_theta: torch.Tensor, theta0: torch.Tensor) -> None:
    """Seed s's runs start from its one random init or from the aligned init (the same for every seed)."""
    cfg = problem.cfg
    for r, run in enumerate(problem.runs):
        if run.s == s:
            theta0[r] = (
                random_theta if run.init == "random" else aligned_init(1, cfg.heads, problem.U.cpu(), cfg.init_scale)[0]
            )


# ----------------------------------------------------------------------------- training and measurements


@dataclass
class TrainingLog:
    t: np.ndarray  # (L,) logged times, step * lr
    m: np.ndarray  # (L, R, d) learned map per direction
    test: np.ndarray  # (L, R) test loss
    seconds: float  # wall time of the training


def train_runs(problem: Problem, pools: Pools) -> TrainingLog:
    """All runs as one batch: each arm's optimizer on its pool, logged every cfg.log_every steps."""
    cfg = problem.cfg
    mode = [problem.specs[run.arm].mode for run in problem.runs]
    rho = [problem.specs[run.arm].rho for run in problem.runs]
    start = time.time()
    desc = f"theory: {len(problem.runs)} runs"
    with progress_bar(total=cfg.steps, desc=desc, show=cfg.progress, mininterval=1.0) as pbar:
        _, logs = train(
            problem.feat,
            pools.theta0,
            pools.groups,
            mode,
            rho,
            cfg.lr,
            cfg.steps,
            cfg.log_every,
            problem.lam_t,
            problem.U,
            test_groups=pools.test_groups,
            pbar=pbar,
        )
    return TrainingLog(logs["t"].numpy(), logs["m"].numpy(), logs["test"].numpy(), time.time() - start)


def measure_runs(problem: Problem, log: TrainingLog) -> list[dict]:
    """Per run: learning times, final map, entropy (nats and fraction of ln d), how many directions were
    learned, stalled at the saddle or still rising, when the first was learned, test loss."""
    cfg = problem.cfg
    T = cfg.steps * cfg.lr
    per_run = []
    for r, run in enumerate(problem.runs):
        times, final = learning_times(log.t, log.m[:, r], problem.m_star, cfg.final_window)
        stalled = int(stalled_directions(final, problem.m_star).sum())
        learned = int(np.isfinite(times).sum())
        per_run.append(
            {
                "init": run.init,
                "arm": run.arm,
                "seed": cfg.seed + run.s,
                "learning_times": times.tolist(),
                "final_map": final.tolist(),
                "entropy": entropy(times),
                "entropy_fraction": entropy_fraction(times),
                "learned": learned,
                "stalled": stalled,
                "unsettled": cfg.d - learned - stalled,
                "first_learning_time": float(np.nanmin(times)) if learned else float("nan"),
                "final_test_loss": float(log.test[-1, r]),
                "mean_test_loss": float(_trapezoid(log.test[:, r], log.t) / T),
            }
        )
    return per_run


def learning_times(t, m, m_star=None, final_frac: float = 0.05):
    """Learning time of each direction: the first time m_i(t) reaches half of its final value
    (linear interpolation between logged points). Final value: mean of the last `final_frac` of the
    log. NaN when the direction is not learned (final < m_star/2: stalled) or not settled (the value at 80%
    of the run is below 90% of the final value). t (L,), m (L, d) -> (times (d,), final (d,))."""
    t = np.asarray(t, float)
    m = np.asarray(m, float)
    L, d = m.shape
    final = m[-max(1, int(round(final_frac * L))) :].mean(0)
    at80 = m[int(0.8 * (L - 1))]
    stalled = stalled_directions(final, m_star) if m_star is not None else final <= 0
    out = np.full(d, np.nan)
    for i in range(d):
        if stalled[i] or at80[i] < 0.9 * final[i]:
            continue
        half = 0.5 * final[i]
        k = int(np.argmax(m[:, i] >= half))
        if m[k, i] < half:
            continue
        if k == 0:
            out[i] = t[0]
        else:
            m0, m1 = m[k - 1, i], m[k, i]
            out[i] = t[k - 1] + (half - m0) / (m1 - m0) * (t[k] - t[k - 1])
    return out, final


def stalled_directions(final, m_star) -> np.ndarray:
    """A direction stalls when its learned map at the end of the run (the mean over the final window) is
    below half its optimum m*_i: the loss never dropped from that direction's saddle plateau. (At the
    optimum the plateau's drop is complete; half of m*_i is where a learning time is measured.)"""
    final = np.asarray(final, float)
    return ~(final >= 0.5 * np.asarray(m_star, float))  # NaN counts as stalled


def distribution_entropy(p) -> float:
    """Entropy (nats) of a probability vector, with 0 ln 0 = 0."""
    p = np.asarray(p, float)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def entropy(times) -> float:
    """Entropy (nats) of the normalized learning times p_i = t_i / sum_j t_j; max ln d (all equal). NaN when a
    direction was not learned."""
    times = np.asarray(times, float)
    if np.any(~np.isfinite(times)) or np.any(times <= 0):
        return float("nan")
    return distribution_entropy(times / times.sum())


def fraction_of_max(h: float, d: int) -> float:
    """An entropy as a fraction of its maximum ln d: 1 for equal learning times, 0 for one direction only."""
    return h / math.log(d)


def entropy_fraction(times) -> float:
    return fraction_of_max(entropy(times), len(times))
