"""The runs: the arms and the grid of runs (init x arm x seed), each seed's pools (uniform, and
reweighted by a proxy's hard cluster or a control set), training every run at once, and what each
run measures (learning times and their entropy)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

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
)

DTYPE = torch.float64
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz

# ----------------------------------------------------------------------------- arms and the grid of runs

# the arms: three optimizers on the uniform pool, plain GD (mode 0, as `train` takes it) on reweighted pools
MODES = {"gd": 0, "sam_head": 1, "sam_global": 2}
OPTIMIZER_ARMS = ("gd", "sam_head", "sam_global")
CONTROL_ARMS = ("easy", "random")


def is_pool_arm(arm: str) -> bool:
    """Plain GD on a reweighted pool (reshaped or a control)."""
    return arm.startswith("reshaped:") or arm in CONTROL_ARMS


def arms_of(cfg: TheoryConfig) -> list[str]:
    """The optimizer arms, one reshaped arm per hard-feature choice, then the controls."""
    return [*OPTIMIZER_ARMS, *(f"reshaped:{f}" for f in cfg.hard_features), *(CONTROL_ARMS if cfg.controls else ())]


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
    arms: list[str]
    runs: list[RunSpec]

    @property
    def m_star(self) -> np.ndarray:
        return 1.0 / self.kap

    @property
    def pool_arms(self) -> list[str]:
        return [a for a in self.arms if is_pool_arm(a)]

    def run_index(self, init: str, arm: str, s: int) -> int:
        return self.runs.index(RunSpec(init, arm, s))


def make_problem(cfg: TheoryConfig) -> Problem:
    device = torch.device(cfg.device)
    lam = spectrum(cfg)
    _, lam_t, U = covariance(lam, cfg.rotate)
    inits = ["random"] + (["aligned"] if cfg.aligned else [])
    arms = arms_of(cfg)
    return Problem(
        cfg=cfg,
        device=device,
        lam=lam,
        lam_t=lam_t.to(device),
        U=U.to(device),
        kap=kappa(lam, cfg.context),
        feat=Features(cfg.d, device, DTYPE),
        inits=inits,
        arms=arms,
        runs=_run_grid(cfg.seeds, inits, arms),
    )


def _run_grid(seeds: int, inits: list[str], arms: list[str]) -> list[RunSpec]:
    # seed-major order, the uniform-pool runs (GD first, then SAM) before the reweighted ones: every
    # group of runs sharing a pool is a contiguous slice, in the full batch and in the SAM sub-batch
    arm_sets = (("gd",), ("sam_head", "sam_global"), *((a,) for a in arms if is_pool_arm(a)))
    return [RunSpec(init, arm, s) for s in range(seeds) for arm_set in arm_sets for init in inits for arm in arm_set]


# ----------------------------------------------------------------------------- hard sequences and pools


def _kmeans2(X: np.ndarray, seed: int):
    from sklearn.cluster import KMeans

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


def upsampled_sets(cfg: TheoryConfig, traj: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Pool arm -> boolean mask of the sequences it upsamples. The controls take as many sequences as
    the first hard cluster (a tenth of the pool without one), so they differ only in which ones."""
    chosen = {f"reshaped:{f}": select_hard(traj, f, seed) for f in cfg.hard_features}
    n_hard = int(chosen[f"reshaped:{cfg.hard_features[0]}"].sum()) if cfg.hard_features else cfg.pool // 10
    if cfg.controls:
        chosen["easy"] = _mask(cfg.pool, np.argsort(traj.mean(1), kind="stable")[:n_hard])  # lowest mean loss
        chosen["random"] = _mask(cfg.pool, np.random.default_rng(seed).choice(cfg.pool, n_hard, replace=False))
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
    from tqdm.auto import tqdm

    cfg = problem.cfg
    members = _pool_members(problem)
    pools = Pools([], [], [], torch.zeros(len(problem.runs), 3, cfg.heads, cfg.d + 1, dtype=DTYPE))
    for s in tqdm(range(cfg.seeds), desc="theory: pools + proxy", disable=not cfg.progress, mininterval=1.0):
        # one generator per seed draws the pool, the proxy's init, the test set and the random init, in that
        # order: reordering the draws would change every number
        gen = torch.Generator().manual_seed(1000003 * (cfg.seed + s) + 17)
        groups, info = _training_pools(problem, s, gen, members)
        pools.groups += groups
        pools.hard.append(info)
        seed_rows = rows_index([r for r, run in enumerate(problem.runs) if run.s == s])
        pools.test_groups.append((seed_rows, _test_stats(problem, gen)))
        _set_inits(problem, s, random_init(1, cfg.heads, cfg.d, cfg.init_scale, gen, DTYPE)[0], pools.theta0)
    pools.theta0 = pools.theta0.to(problem.device)
    return pools


def _pool_members(problem: Problem) -> dict[tuple[int, str], list[int]]:
    """(seed index, pool) -> the runs training on it; the pool is "uniform" or a pool arm."""
    members: dict[tuple[int, str], list[int]] = {}
    for r, run in enumerate(problem.runs):
        members.setdefault((run.s, run.arm if is_pool_arm(run.arm) else "uniform"), []).append(r)
    return members


def _training_pools(problem: Problem, s: int, gen: torch.Generator, members) -> tuple[list, dict]:
    """Seed s's uniform pool and its reweighted pools, as groups; and the facts about the reweighting."""
    cfg, dev = problem.cfg, problem.device
    tokens, y, _ = sample_sequences(cfg.pool, cfg.context, problem.lam_t.cpu(), problem.U.cpu(), gen, DTYPE)
    F = problem.feat.of_tokens(tokens.to(dev))
    y = y.to(dev)
    uniform = pool_stats(F, y)
    groups = [(rows_index(members[(s, "uniform")]), uniform)]
    traj = _proxy_losses(problem, F, y, uniform, gen)
    chosen = upsampled_sets(cfg, traj, cfg.seed + s)
    drives = drive(tokens, y.cpu(), problem.U.cpu())
    info = {"checkpoints": int(traj.shape[1]), "pool_drive_over_lam2": (drives.mean(0) / problem.lam**2).tolist()}
    for arm in problem.pool_arms:
        weights = torch.ones(cfg.pool, dtype=DTYPE)
        weights[torch.from_numpy(chosen[arm])] = cfg.upsample
        groups.append((rows_index(members[(s, arm)]), pool_stats(F, y, weights.to(dev))))
        wn = weights.numpy()
        info[arm] = {
            "fraction": float(chosen[arm].mean()),
            "growth_factor": ((drives * wn[:, None]).sum(0) / wn.sum() / drives.mean(0)).tolist(),
        }
    return groups, info


def _proxy_losses(problem: Problem, F, y, uniform: Stats, gen: torch.Generator) -> np.ndarray:
    """Per-sequence losses (P, K) at K evenly spaced checkpoints of a proxy: the same architecture,
    its own random init, a short GD run on the uniform pool."""
    cfg, feat = problem.cfg, problem.feat
    theta = random_init(1, cfg.heads, cfg.d, cfg.init_scale, gen, DTYPE).to(problem.device)
    checkpoints = set(np.linspace(0, cfg.proxy_steps, cfg.proxy_checkpoints + 1).round().astype(int)[1:].tolist())
    traj = []

    def record(step, th):
        if step in checkpoints:
            traj.append((0.5 * (F @ feat.tensor(th)[0] - y) ** 2).cpu().numpy())

    steps, lam, U = cfg.proxy_steps, problem.lam_t, problem.U
    train(feat, theta, [(slice(0, 1), uniform)], [0], [0.0], cfg.lr, steps, max(1, steps), lam, U, callback=record)
    traj = np.stack(traj, 1)
    assert traj.shape[1] == len(checkpoints), "one proxy loss per checkpoint"
    return traj


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
    from tqdm.auto import tqdm

    cfg = problem.cfg
    mode = [MODES.get(run.arm, 0) for run in problem.runs]
    rho = [cfg.rho if run.arm.startswith("sam") else 0.0 for run in problem.runs]
    start = time.time()
    desc = f"theory: {len(problem.runs)} runs"
    with tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, mininterval=1.0) as pbar:
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
    """Per run: learning times, final map, entropy, how many directions were learned, test loss."""
    cfg = problem.cfg
    T = cfg.steps * cfg.lr
    per_run = []
    for r, run in enumerate(problem.runs):
        times, final = learning_times(log.t, log.m[:, r], problem.m_star, cfg.final_window)
        per_run.append(
            {
                "init": run.init,
                "arm": run.arm,
                "seed": cfg.seed + run.s,
                "learning_times": times.tolist(),
                "final_map": final.tolist(),
                "entropy": entropy(times),
                "learned": int(np.isfinite(times).sum()),
                "final_test_loss": float(log.test[-1, r]),
                "mean_test_loss": float(_trapezoid(log.test[:, r], log.t) / T),
            }
        )
    return per_run


def learning_times(t, m, m_star=None, final_frac: float = 0.05):
    """Learning time of each direction: the first time m_i(t) reaches half of its final value
    (linear interpolation between logged points). Final value: mean of the last `final_frac` of the
    log. NaN when the direction is not learned (final < m_star/2) or not settled (the value at 80%
    of the run is below 90% of the final value). t (L,), m (L, d) -> (times (d,), final (d,))."""
    t = np.asarray(t, float)
    m = np.asarray(m, float)
    L, d = m.shape
    final = m[-max(1, int(round(final_frac * L))) :].mean(0)
    at80 = m[int(0.8 * (L - 1))]
    out = np.full(d, np.nan)
    for i in range(d):
        if final[i] <= 0 or (m_star is not None and final[i] < 0.5 * m_star[i]) or at80[i] < 0.9 * final[i]:
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


def entropy(times) -> float:
    """Entropy (nats) of the normalized learning times p_i = t_i / sum_j t_j; max ln d (all equal)."""
    times = np.asarray(times, float)
    if np.any(~np.isfinite(times)) or np.any(times <= 0):
        return float("nan")
    p = times / times.sum()
    return float(-(p * np.log(p)).sum())
