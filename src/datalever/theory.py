"""Simplicity bias of GD, SAM and reshaped data in multi-head linear self-attention.

In-context linear regression (Zhang, Singh, Latham & Saxe, ICML 2025): a sequence holds N tokens
[x_n; y_n] with y_n = w.x_n, w ~ N(0, I), x ~ N(0, Sigma), and a query token [x_q; 0]. The model is
multi-head linear self-attention with a rank-one key k_h and query q_h per head,

    out = X + sum_h (1/N) W_v,h X X^T k_h^T q_h X,

and the prediction is the y-entry of the query column of `out`. Only the y-row v_h of W_v,h reaches
that entry, so a head is three vectors (v_h, k_h, q_h) in R^{d+1}. The training loss is half the
mean squared error of the prediction. docs/theory.md derives the reduced ODEs and defines the
measurements; `run` trains, over several seeds and vectorized across all runs: GD, SAM (perturbation
normalized by the global gradient norm, or per head), GD on reshaped pools (hard sequences picked by
k-means on a short proxy run's per-sequence losses, then upsampled) and two control pools (easy or
random sequences upsampled alike), from a small random init and from the aligned init of the ODE
ansatz; it integrates the reduced ODEs and writes a table and plots.

Speed: the prediction is linear in the per-sequence features Z_ij (x_q)_k, with Z = X X^T / N,
and in the CP tensor A_ijk = sum_h v_hi k_hj q_hk. Full-batch GD on a fixed pool therefore needs
only the pool's second-moment matrix of those features (computed once), after which one gradient
costs O(features^2) per run whatever the pool size. This is the same loss, exactly (checked in
tests against the literal token-level model); it is not an approximation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz

MODES = {"gd": 0, "sam_head": 1, "sam_global": 2}
OPTIMIZER_ARMS = ("gd", "sam_head", "sam_global")
CONTROL_ARMS = ("easy", "random")
_LABELS = {
    "gd": "GD",
    "sam_head": "SAM per-head",
    "sam_global": "SAM global",
    "easy": "control: easy x up",
    "random": "control: random x up",
}


def arm_label(arm: str) -> str:
    if arm.startswith("reshaped:"):
        return f"reshaped GD ({arm.split(':', 1)[1]})"
    return _LABELS[arm]


def is_pool_arm(arm: str) -> bool:
    """Plain GD on a reweighted pool (reshaped or a control)."""
    return arm.startswith("reshaped:") or arm in CONTROL_ARMS


def arms_of(cfg: "TheoryConfig") -> list[str]:
    return [*OPTIMIZER_ARMS, *(f"reshaped:{f}" for f in cfg.hard_features), *(CONTROL_ARMS if cfg.controls else ())]


@dataclass
class TheoryConfig:
    """Simplicity bias of GD, SAM (global / per-head) and hard-example upsampling in multi-head linear
    attention trained on in-context linear regression; see docs/theory.md."""

    out: str = "runs/theory"
    """Output directory for the table (results.md), the numbers (results.json) and the plots."""
    d: int = 8
    """Input dimension (number of eigenvectors of Sigma)."""
    eigenvalues: Optional[list[float]] = None
    """Eigenvalues of Sigma (distinct, any order; sorted descending). None: `d` values spaced geometrically from `eig_max` to `eig_min`."""
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
    """SAM radius (both normalizations). Keep it well below the stall radius sqrt(3) x init_scale, where an aligned head stalls at the saddle; per-head SAM from a random init stalls small heads earlier (docs/theory.md)."""
    seeds: int = 5
    """Number of seeds (each: its own pool, test set, proxy and random init, shared by all arms)."""
    seed: int = 0
    """First seed; seeds are seed, seed+1, ..."""
    pool: int = 16384
    """Training pool size (sequences) per seed; GD is full-batch on it."""
    test: int = 16384
    """Fresh test sequences per seed."""
    proxy_steps: int = 600
    """Steps of the proxy GD run (own random init) whose per-sequence losses pick the hard sequences (600 x lr 0.1: t=60, about the top half of the directions learned)."""
    proxy_checkpoints: int = 8
    """Number of evenly spaced checkpoints in the proxy run at which each sequence's loss is recorded."""
    hard_features: list[str] = field(default_factory=lambda: ["loss", "final"])
    """One reshaped arm per entry, each k-means (k=2) on: 'loss' (raw loss trajectory, the practical method), 'final' (last checkpoint's loss only, the paper's ablation), 'log' (log loss trajectory), 'ratio' (log of loss[t+1]/loss[t])."""
    upsample: float = 3.0
    """Each hard sequence counts this many times in the reshaped pool (3.0 = the paper's m=2)."""
    controls: bool = True
    """Also train GD on two control pools: as many easy (lowest mean proxy loss) or random sequences as the first hard cluster, upsampled alike."""
    aligned: bool = True
    """Also train every arm from the aligned init (the ODE ansatz) and compare with the reduced ODEs."""
    ode_dt: float = 0.05
    """RK4 step of the plotted reduced-ODE curves (the ODE learning times use quadrature / an adaptive solver)."""
    final_window: float = 0.05
    """Fraction of the logged trajectory, at its end, averaged to give each direction's final value."""
    rho_sweep: Optional[list[float]] = None
    """Radii for the ODE-only curve of entropy against rho (per-head and global). None: 10 values from 0 to 0.9 x the per-head stall radius sqrt(3) x init_scale."""
    device: str = "cpu"
    """Torch device for the simulation ('cpu' or 'cuda')."""
    threads: int = 1
    """torch.set_num_threads for the run (the CI machine has two cores)."""
    plots: bool = True
    """Write the PNG plots."""
    progress: bool = True
    """Show progress bars."""


# ----------------------------------------------------------------------------- data and model


def spectrum(cfg: TheoryConfig) -> np.ndarray:
    """Eigenvalues of Sigma, descending."""
    if cfg.eigenvalues is not None:
        lam = np.sort(np.asarray(cfg.eigenvalues, float))[::-1]
        if len(lam) != cfg.d:
            raise ValueError(f"{len(lam)} eigenvalues given for d={cfg.d}")
    else:
        lam = np.geomspace(cfg.eig_max, cfg.eig_min, cfg.d)
    if np.any(lam <= 0) or len(np.unique(lam)) != len(lam):
        raise ValueError("eigenvalues must be positive and distinct")
    return lam.copy()


def covariance(lam, rotate: bool = True, basis_seed: int = 12345, dtype=torch.float64):
    """Return (Sigma, lam, U): Sigma = U diag(lam) U^T with U's columns the eigenvectors."""
    lam = torch.as_tensor(np.asarray(lam, float), dtype=dtype)
    d = lam.numel()
    if rotate:
        g = torch.Generator().manual_seed(basis_seed)
        U, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
        U = U * torch.sign(torch.diagonal(r))
    else:
        U = torch.eye(d, dtype=dtype)
    return U @ torch.diag(lam) @ U.T, lam, U


def sample_sequences(n: int, N: int, lam, U, gen: torch.Generator, dtype=torch.float64):
    """n sequences of N labelled tokens plus a query: tokens (n, N+1, d+1) with the query's y zeroed,
    the query's target (n,), and the task vectors w (n, d)."""
    d = lam.numel()
    x = (torch.randn(n, N + 1, d, generator=gen, dtype=dtype) * lam.sqrt()) @ U.T
    w = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.einsum("nti,ni->nt", x, w)
    tokens = torch.cat([x, y[..., None]], dim=-1)
    target = y[:, -1].clone()
    tokens[:, -1, -1] = 0.0
    return tokens, target, w


def forward(V, K, Q, tokens):
    """The literal model on token matrices: the query's y-output of X + sum_h (1/N) W_v,h X X^T k_h^T q_h X.

    V, K, Q: (H, d+1), V[h] the y-row of W_v,h. tokens: (n, N+1, d+1), the query last. X X^T sums
    over all N+1 tokens (the query's y is 0, so it only enters the x-x block)."""
    N = tokens.shape[1] - 1
    Z = tokens.transpose(1, 2) @ tokens / N
    s = torch.einsum("hi,nij,hj->nh", V, Z, K)  # value . (X X^T / N) key
    r = tokens[:, -1, :] @ Q.T  # query . x_query
    return (s * r).sum(-1)  # the residual X adds the query's y, which is 0


class Features:
    """The model as a linear function of per-sequence features, for fast full-batch training.

    prediction = sum_{i<=j,k} Z_ij x_qk t_(ij)k with t the symmetrized CP tensor of the heads."""

    def __init__(self, d: int, device="cpu", dtype=torch.float64):
        self.d, self.D = d, d + 1
        iu = torch.triu_indices(self.D, self.D)
        self.iu0, self.iu1 = iu[0].to(device), iu[1].to(device)
        self.npair = iu.shape[1]
        pair_of = torch.empty(self.D, self.D, dtype=torch.long)
        pair_of[iu[0], iu[1]] = torch.arange(self.npair)
        pair_of[iu[1], iu[0]] = torch.arange(self.npair)
        self.pair_of = pair_of.to(device)
        self.coef = torch.where(iu[0] == iu[1], 0.5, 1.0).to(device=device, dtype=dtype)

    @property
    def size(self) -> int:
        return self.npair * self.d

    def of_tokens(self, tokens):
        N = tokens.shape[1] - 1
        Z = tokens.transpose(1, 2) @ tokens / N
        zs = Z[:, self.iu0, self.iu1]
        xq = tokens[:, -1, : self.d]
        return (zs[:, :, None] * xq[:, None, :]).reshape(tokens.shape[0], -1)

    def tensor(self, theta):
        """theta (R, 3, H, d+1) -> t (R, features)."""
        R, _, H, D = theta.shape
        V, K, Q = theta[:, 0], theta[:, 1], theta[:, 2, :, : self.d]
        VK = (V[:, :, :, None] * K[:, :, None, :]).reshape(R, H, D * D)
        A = (VK.transpose(1, 2) @ Q).reshape(R, D, D, self.d)  # A_ijk = sum_h v_hi k_hj q_hk
        S = (A + A.transpose(1, 2))[:, self.iu0, self.iu1, :] * self.coef[None, :, None]
        return S.reshape(R, -1)

    def grad_theta(self, theta, gt):
        """Chain rule from d(loss)/dt (R, features) to d(loss)/dtheta (R, 3, H, d+1)."""
        R, _, H, D = theta.shape
        d = self.d
        V, K, Q = theta[:, 0], theta[:, 1], theta[:, 2, :, :d]
        G = gt.reshape(R, self.npair, d)[:, self.pair_of, :]  # dL/dA_ijk, symmetric in i, j
        Gi = G.reshape(R, D, D * d)  # rows i, columns (j, k); by symmetry also rows j, columns (i, k)
        g = torch.zeros_like(theta)
        g[:, 0] = (K[:, :, :, None] * Q[:, :, None, :]).reshape(R, H, D * d) @ Gi.transpose(1, 2)
        g[:, 1] = (V[:, :, :, None] * Q[:, :, None, :]).reshape(R, H, D * d) @ Gi.transpose(1, 2)
        VK = (V[:, :, :, None] * K[:, :, None, :]).reshape(R, H, D * D)
        g[:, 2, :, :d] = VK @ G.reshape(R, D * D, d)
        return g


@dataclass
class Stats:
    """Weighted second moments of a pool: loss(t) = (t.M t - 2 b.t + c) / 2 = mean_p w_p (F_p.t - y_p)^2 / 2."""

    M: torch.Tensor
    b: torch.Tensor
    c: float


def pool_stats(F, y, weights=None) -> Stats:
    """Weights are normalized to mean 1: integer weights equal duplicating sequences in the pool."""
    n = F.shape[0]
    wts = torch.ones(n, dtype=F.dtype, device=F.device) if weights is None else weights.to(F)
    wts = wts / wts.mean()
    Fw = F * wts[:, None]
    return Stats(Fw.T @ F / n, Fw.T @ y / n, float((wts * y * y).mean()))


def _index(rows):
    """A slice when the rows are contiguous (a view, no gather), else a LongTensor."""
    rows = [int(r) for r in rows]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long)


def _rows(idx, R):
    return list(range(R))[idx] if isinstance(idx, slice) else [int(r) for r in idx]


def _group_loss(t, groups, want_grad: bool, want_loss: bool = True):
    loss = torch.empty(t.shape[0], dtype=t.dtype, device=t.device) if want_loss else None
    gt = torch.empty_like(t) if want_grad else None
    for idx, st in groups:
        tt = t[idx]
        Mt = tt @ st.M
        if want_loss:
            loss[idx] = 0.5 * ((tt * Mt).sum(-1) - 2 * tt @ st.b + st.c)
        if want_grad:
            gt[idx] = Mt - st.b
    return loss, gt


def loss_and_grad(feat: Features, theta, groups, want_loss: bool = True):
    """Pool loss (R,) and its gradient (R, 3, H, d+1); groups: list of (run indices or slice, Stats)."""
    t = feat.tensor(theta)
    loss, gt = _group_loss(t, groups, True, want_loss)
    return loss, feat.grad_theta(theta, gt)


def loss_only(feat: Features, theta, groups):
    return _group_loss(feat.tensor(theta), groups, False)[0]


def effective_map(theta, lam, U):
    """m (R, d): lam_i u_i^T Gamma u_i, Gamma = sum_h (v_y k_x + k_y v_x) q_x^T the map from the
    in-context statistic s = (1/N) sum_n x_n y_n to the prediction. Both pathways (y carried by the
    value or by the key) count. m_i = 1 is the ideal; the finite-N optimum is 1/kappa_i < 1."""
    d = lam.numel()
    V, K, Q = theta[:, 0], theta[:, 1], theta[:, 2, :, :d]
    G = torch.einsum("rh,rhi,rhk->rik", V[..., d], K[..., :d], Q)
    G = G + torch.einsum("rh,rhi,rhk->rik", K[..., d], V[..., :d], Q)
    return torch.einsum("ia,rik,ka->ra", U, G, U) * lam


def kappa(lam, N: int) -> np.ndarray:
    """Finite-N factor: along eigenvector i the population loss is lam_i (kappa_i m_i^2 - 2 m_i + 1) / 2."""
    lam = np.asarray(lam, float)
    return 1.0 + (1.0 + lam.sum() / lam) / N


def random_init(R: int, H: int, d: int, scale: float, gen: torch.Generator, dtype=torch.float64):
    return torch.randn(R, 3, H, d + 1, generator=gen, dtype=dtype) * scale


def aligned_init(R: int, H: int, U, v0: float, dtype=torch.float64):
    """Head i < d: v = v0 e_y, k = q = v0 [u_i; 0]; the other heads are 0 (and stay 0)."""
    d = U.shape[0]
    if H < d:
        raise ValueError("aligned init needs heads >= d")
    theta = torch.zeros(R, 3, H, d + 1, dtype=dtype)
    theta[:, 0, :d, d] = v0
    theta[:, 1, :d, :d] = v0 * U.T.to(dtype)
    theta[:, 2, :d, :d] = v0 * U.T.to(dtype)
    return theta


def train(
    feat: Features,
    theta,
    groups,
    mode,
    rho,
    lr: float,
    steps: int,
    log_every: int,
    lam,
    U,
    test_groups=None,
    callback=None,
    pbar=None,
):
    """Full-batch GD or SAM for R runs at once.

    mode (R,): 0 GD, 1 SAM with the perturbation normalized per head, 2 SAM normalized by the global
    gradient norm (all heads of that run). SAM step: e = rho g/|g|; theta -= lr grad L(theta + e).
    callback(step, theta) is called at every step before the update (theta is then updated in
    place: copy what you keep). Returns the final theta and logs {t, m (L, R, d), train (L, R),
    test (L, R)} with t = step * lr."""
    theta = theta.clone()
    mode = torch.as_tensor(mode, device=theta.device)
    rho = torch.as_tensor(rho, dtype=theta.dtype, device=theta.device)
    sam = torch.nonzero(mode > 0).flatten()
    per_head = (mode[sam] == 1)[:, None, None, None]
    rho_sam = rho[sam][:, None, None, None]
    R = theta.shape[0]
    pos = {int(r): i for i, r in enumerate(sam.tolist())}
    sam_groups = []
    for idx, st in groups:
        sub = [pos[r] for r in _rows(idx, R) if r in pos]
        if sub:
            sam_groups.append((_index(sub), st))
    sam_idx = _index(sam.tolist()) if len(sam) else None
    logs = {"t": [], "m": [], "train": [], "test": []}
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:
            logs["t"].append(step * lr)
            logs["m"].append(effective_map(theta, lam, U))
            logs["train"].append(loss_only(feat, theta, groups))
            if test_groups is not None:
                logs["test"].append(loss_only(feat, theta, test_groups))
            if pbar is not None and step:
                pbar.update(log_every if step % log_every == 0 else step % log_every)
        if callback is not None:
            callback(step, theta)
        if step == steps:
            break
        _, g = loss_and_grad(feat, theta, groups, want_loss=False)
        if len(sam):
            gs = g[sam_idx]
            n_head = gs.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
            n_glob = gs.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().expand_as(n_head)
            norm = torch.where(per_head, n_head, n_glob)
            eps = rho_sam * gs / torch.clamp(norm, min=1e-300)
            _, g2 = loss_and_grad(feat, theta[sam_idx] + eps, sam_groups, want_loss=False)
            g[sam_idx] = g2
        theta -= lr * g
    out = {"t": torch.tensor(logs["t"], dtype=torch.float64)}
    for k in ("m", "train", "test"):
        if logs[k]:
            out[k] = torch.stack(logs[k]).cpu()
    return theta, out


# ----------------------------------------------------------------------------- measurements


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
    couples the directions through |G|: integrated with an adaptive RK45 and crossing events."""
    from scipy.integrate import quad, solve_ivp

    lam = np.asarray(lam, float)
    kap = np.asarray(kap, float)
    c = rho / math.sqrt(3.0)
    v_half = (0.5 / (kap * lam)) ** (1.0 / 3.0)
    if mode in (0, 1) or rho == 0:
        shift = c if (mode == 1 and rho > 0) else 0.0
        u0 = v0 - shift
        out = np.full(len(lam), np.nan)
        if u0 <= 0:
            return out  # the perturbed point sits at or behind the saddle: the head stalls at v = rho/sqrt(3)
        for i, (l, k, vh) in enumerate(zip(lam, kap, v_half)):
            uh = vh - shift
            beta = k * l
            # 1/(u^2 (1 - beta u^3)) = 1/u^2 + beta u / (1 - beta u^3)
            rest = quad(lambda u: beta * u / (1.0 - beta * u**3), u0, uh, epsabs=1e-12, epsrel=1e-10)[0]
            out[i] = ((1.0 / u0 - 1.0 / uh) + rest) / l**2
        return out

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

    def last(t, v):
        return float(np.min(lam * v**3 - 0.5 / kap))

    last.direction = 1
    last.terminal = True
    if t_max is None:
        t_max = 100.0 * float(gd_blowup_time(lam, v0).max())
    sol = solve_ivp(
        rhs, (0.0, t_max), np.full(len(lam), float(v0)), method="LSODA", rtol=1e-9, atol=1e-14, events=events + [last]
    )
    return np.array([e[0] if len(e) else np.nan for e in sol.t_events[: len(lam)]])


# ----------------------------------------------------------------------------- hard examples


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


def _drive(tokens, target, U) -> np.ndarray:
    """Per sequence and eigenvector, y_q (s.u_i)(x_q.u_i) with s = (1/N) sum_n x_n y_n. Its pool mean
    is the linear (signal) term that drives direction i's growth from a small init (population
    value lam_i^2). A reweighted pool multiplies it by the growth factor r_i = E_w[drive_i]/E[drive_i],
    so that small-init learning times scale as 1/(lam_i^2 r_i) (docs/theory.md)."""
    d = U.shape[0]
    N = tokens.shape[1] - 1
    s = torch.einsum("nti,nt->ni", tokens[:, :-1, :d], tokens[:, :-1, d]) / N
    return (target[:, None] * (s @ U) * (tokens[:, -1, :d] @ U)).cpu().numpy()


# ----------------------------------------------------------------------------- the experiment


def _ci95(x) -> tuple[float, float]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float("nan")
    from scipy.stats import t as student_t

    return float(x.mean()), float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def _fmt(mean: float, half: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def run(cfg: TheoryConfig) -> dict:
    """Train every arm over all seeds (vectorized), measure, integrate the ODEs, write
    out/results.json, out/results.md, out/*.png and out/theory.{config.yaml,meta.json}; return the
    results dict (config, eigenvalues, kappa, m_star, summary, ode, ode_vs_aligned_sim,
    ode_rho_sweep, hard, arms, runs, runtime_s)."""
    t_start = time.time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, t_start)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: TheoryConfig, t_start: float) -> dict:
    from tqdm.auto import tqdm

    from datalever.rundir import atomic_write_text, record_provenance, write_json

    dev = torch.device(cfg.device)
    dt = torch.float64
    lam_np = spectrum(cfg)
    d, N, H = cfg.d, cfg.context, cfg.heads
    _, lam, U = covariance(lam_np, cfg.rotate)
    lam, U = lam.to(dev), U.to(dev)
    kap = kappa(lam_np, N)
    m_star = 1.0 / kap
    feat = Features(d, dev, dt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    inits = ["random"] + (["aligned"] if cfg.aligned else [])
    arms = arms_of(cfg)
    pool_arms = [a for a in arms if is_pool_arm(a)]
    # seed-major order, the uniform-pool runs (GD first, then SAM) before the reweighted ones: every
    # group of runs sharing a pool is a contiguous slice, in the full batch and in the SAM sub-batch
    runs = [
        (init, arm, s)
        for s in range(cfg.seeds)
        for arm_set in (("gd",), ("sam_head", "sam_global"), *((a,) for a in pool_arms))
        for init in inits
        for arm in arm_set
    ]
    R = len(runs)
    groups_idx: dict[tuple[int, str], list[int]] = {}
    for r, (init, arm, s) in enumerate(runs):
        groups_idx.setdefault((s, arm if is_pool_arm(arm) else "uniform"), []).append(r)

    # ---- data, proxy runs and hard-example selection, one seed at a time
    groups, test_groups, hard_info = [], [], []
    theta0 = torch.zeros(R, 3, H, d + 1, dtype=dt)
    bar = tqdm(range(cfg.seeds), desc="theory: pools + proxy", disable=not cfg.progress, mininterval=1.0)
    for s in bar:
        seed = cfg.seed + s
        gen = torch.Generator().manual_seed(1000003 * seed + 17)
        tokens, y, _ = sample_sequences(cfg.pool, N, lam.cpu(), U.cpu(), gen, dt)
        F = feat.of_tokens(tokens.to(dev))
        y = y.to(dev)
        uniform = pool_stats(F, y)
        groups.append((_index(groups_idx[(s, "uniform")]), uniform))
        # proxy: same architecture, its own random init, short GD on the uniform pool
        proxy_theta = random_init(1, H, d, cfg.init_scale, gen, dt).to(dev)
        ck = set(np.linspace(0, cfg.proxy_steps, cfg.proxy_checkpoints + 1).round().astype(int)[1:].tolist())
        traj = []

        def record(step, th, F=F, y=y, traj=traj, ck=ck):
            if step in ck:
                traj.append((0.5 * (F @ feat.tensor(th)[0] - y) ** 2).cpu().numpy())

        train(
            feat,
            proxy_theta,
            [(slice(0, 1), uniform)],
            [0],
            [0.0],
            cfg.lr,
            cfg.proxy_steps,
            max(1, cfg.proxy_steps),
            lam,
            U,
            callback=record,
        )
        traj = np.stack(traj, 1)
        assert traj.shape[1] == len(ck), "one proxy loss per checkpoint"
        chosen = {f"reshaped:{f}": select_hard(traj, f, seed) for f in cfg.hard_features}
        n_hard = int(chosen[f"reshaped:{cfg.hard_features[0]}"].sum()) if cfg.hard_features else cfg.pool // 10
        if "easy" in pool_arms:  # the n_hard sequences with the lowest mean proxy loss
            easy = np.zeros(cfg.pool, bool)
            easy[np.argsort(traj.mean(1), kind="stable")[:n_hard]] = True
            chosen["easy"] = easy
        if "random" in pool_arms:
            rnd = np.zeros(cfg.pool, bool)
            rnd[np.random.default_rng(seed).choice(cfg.pool, n_hard, replace=False)] = True
            chosen["random"] = rnd
        drive = _drive(tokens, y.cpu(), U.cpu())
        info = {"checkpoints": int(traj.shape[1]), "pool_drive_over_lam2": (drive.mean(0) / lam_np**2).tolist()}
        for arm in pool_arms:
            mask = chosen[arm]
            weights = torch.ones(cfg.pool, dtype=dt)
            weights[torch.from_numpy(mask)] = cfg.upsample
            groups.append((_index(groups_idx[(s, arm)]), pool_stats(F, y, weights.to(dev))))
            wn = weights.numpy()
            info[arm] = {
                "fraction": float(mask.mean()),
                "growth_factor": ((drive * wn[:, None]).sum(0) / wn.sum() / drive.mean(0)).tolist(),
            }
        hard_info.append(info)
        del F, tokens
        tt, yt, _ = sample_sequences(cfg.test, N, lam.cpu(), U.cpu(), gen, dt)
        Ft = feat.of_tokens(tt.to(dev))
        test_groups.append((_index([r for r, x in enumerate(runs) if x[2] == s]), pool_stats(Ft, yt.to(dev))))
        del Ft, tt
        init_r = random_init(1, H, d, cfg.init_scale, gen, dt)[0]
        for r, (init, arm, s2) in enumerate(runs):
            if s2 == s:
                theta0[r] = init_r if init == "random" else aligned_init(1, H, U.cpu(), cfg.init_scale, dt)[0]
    theta0 = theta0.to(dev)
    mode = [MODES.get(arm, 0) for _, arm, _ in runs]
    rho = [cfg.rho if arm.startswith("sam") else 0.0 for _, arm, _ in runs]

    # ---- all runs at once
    t_train = time.time()
    with tqdm(total=cfg.steps, desc=f"theory: {R} runs", disable=not cfg.progress, mininterval=1.0) as pbar:
        _, logs = train(
            feat,
            theta0,
            groups,
            mode,
            rho,
            cfg.lr,
            cfg.steps,
            cfg.log_every,
            lam,
            U,
            test_groups=test_groups,
            pbar=pbar,
        )
    t_train = time.time() - t_train
    T = cfg.steps * cfg.lr
    t_log = logs["t"].numpy()
    m_log = logs["m"].numpy()
    test_log = logs["test"].numpy()

    # ---- measure
    per_run = []
    for r, (init, arm, s) in enumerate(runs):
        times, final = learning_times(t_log, m_log[:, r], m_star, cfg.final_window)
        per_run.append(
            {
                "init": init,
                "arm": arm,
                "seed": cfg.seed + s,
                "learning_times": times.tolist(),
                "final_map": final.tolist(),
                "entropy": entropy(times),
                "learned": int(np.isfinite(times).sum()),
                "final_test_loss": float(test_log[-1, r]),
                "mean_test_loss": float(_trapezoid(test_log[:, r], t_log) / T),
            }
        )

    # ---- reduced ODEs (aligned, balanced heads, population loss)
    ode_res = {}
    for arm, md in (("gd", 0), ("sam_head", 1), ("sam_global", 2)):
        r_arm = cfg.rho if md else 0.0
        times = ode_learning_times(lam_np, kap, cfg.init_scale, r_arm, md)
        to, mo = ode_curves(lam_np, kap, cfg.init_scale, r_arm, md, T, cfg.ode_dt)
        ode_res[arm] = {"learning_times": times.tolist(), "entropy": entropy(times), "t": to, "m": mo[:, 0]}
    stall = math.sqrt(3.0) * cfg.init_scale
    sweep = (np.linspace(0.0, 0.9, 10) * stall) if cfg.rho_sweep is None else np.asarray(cfg.rho_sweep, float)
    sweep_res = {"stall_rho": stall}
    for name, md in (("sam_head", 1), ("sam_global", 2)):
        lts = [ode_learning_times(lam_np, kap, cfg.init_scale, float(r), md) for r in sweep]
        sweep_res[name] = {
            "rho": sweep.tolist(),
            "entropy": [entropy(x) for x in lts],
            "learning_times": [x.tolist() for x in lts],
        }

    summary = _summarize(cfg, runs, per_run, inits, arms)
    ode_cmp = {}
    if cfg.aligned:
        for arm in ("gd", "sam_head", "sam_global"):
            sim = np.array([p["learning_times"] for p in per_run if p["init"] == "aligned" and p["arm"] == arm])
            o = np.asarray(ode_res[arm]["learning_times"])
            rel_runs = (sim - o) / o
            rel_mean = (sim.mean(0) - o) / o
            ode_cmp[arm] = {
                "sim_mean": sim.mean(0).tolist(),
                "ode": o.tolist(),
                "rel_err_of_mean": rel_mean.tolist(),
                "max_abs_rel_err_of_mean": float(np.max(np.abs(rel_mean)))
                if np.isfinite(rel_mean).all()
                else float("nan"),
                "max_abs_rel_err_per_run": float(np.max(np.abs(rel_runs)))
                if np.isfinite(rel_runs).all()
                else float("nan"),
            }

    results = {
        "config": asdict(cfg),
        "eigenvalues": lam_np.tolist(),
        "kappa": kap.tolist(),
        "m_star": m_star.tolist(),
        "gd_blowup_time": gd_blowup_time(lam_np, cfg.init_scale).tolist(),
        "max_entropy": math.log(d),
        "summary": summary,
        "ode": {k: {kk: vv for kk, vv in v.items() if kk in ("learning_times", "entropy")} for k, v in ode_res.items()},
        "ode_vs_aligned_sim": ode_cmp,
        "ode_rho_sweep": sweep_res,
        "hard": hard_info,
        "arms": arms,
        "runs": per_run,
        "runtime_s": {"train": t_train},
    }
    table = _markdown(cfg, results, inits, arms)
    if cfg.plots:
        _plots(cfg, out, runs, per_run, t_log, m_log, test_log, ode_res, sweep_res, summary, inits, arms, lam_np)
    results["runtime_s"]["total"] = time.time() - t_start
    table += f"\nRuntime: {results['runtime_s']['total']:.0f} s in total, {t_train:.0f} s training ({R} runs x {cfg.steps} steps, threads={cfg.threads}).\n"
    atomic_write_text(out / "results.md", table)
    write_json(out / "results.json", results)
    record_provenance(out, "theory", cfg, runtime_s=results["runtime_s"])
    if cfg.progress:
        print(table)
    return results


def _summarize(cfg, runs, per_run, inits, arms) -> dict:
    summary = {}
    for init in inits:
        gd_ent = {p["seed"]: p["entropy"] for p in per_run if p["init"] == init and p["arm"] == "gd"}
        gd_loss = {p["seed"]: p["final_test_loss"] for p in per_run if p["init"] == init and p["arm"] == "gd"}
        for arm in arms:
            ps = [p for p in per_run if p["init"] == init and p["arm"] == arm]
            lt = np.array([p["learning_times"] for p in ps])
            ent = [p["entropy"] for p in ps]
            summary[f"{init}/{arm}"] = {
                "learning_times": [_ci95(lt[:, i]) for i in range(lt.shape[1])],
                "entropy": _ci95(ent),
                "delta_entropy_vs_gd": _ci95([p["entropy"] - gd_ent[p["seed"]] for p in ps]),
                "final_test_loss": _ci95([p["final_test_loss"] for p in ps]),
                "delta_test_loss_vs_gd": _ci95([p["final_test_loss"] - gd_loss[p["seed"]] for p in ps]),
                "mean_test_loss": _ci95([p["mean_test_loss"] for p in ps]),
                "learned": f"{sum(p['learned'] for p in ps)}/{len(ps) * lt.shape[1]}",
                "seeds_with_entropy": int(np.isfinite(ent).sum()),
            }
    return summary


def _markdown(cfg, res, inits, arms) -> str:
    d = cfg.d
    lines = [
        f"d={d}, eigenvalues {', '.join(f'{x:.3g}' for x in res['eigenvalues'])}; N={cfg.context}, H={cfg.heads}, "
        f"init scale {cfg.init_scale}, lr {cfg.lr}, {cfg.steps} steps (T={cfg.steps * cfg.lr:g}), rho {cfg.rho}, "
        f"pool {cfg.pool}, upsample x{cfg.upsample} (proxy {cfg.proxy_steps} steps, {cfg.proxy_checkpoints} checkpoints), "
        f"{cfg.seeds} seeds; mean ± 95% CI over seeds. Max entropy ln d = {math.log(d):.3f}.",
        "",
    ]
    head = (
        "| init | arm | "
        + " | ".join(f"t{i + 1}" for i in range(d))
        + " | entropy | Δentropy vs GD | final test loss | Δloss vs GD | learned |"
    )
    sep = "|" + "---|" * (d + 7)
    for init in inits:
        lines += [head, sep]
        for arm in arms:
            s = res["summary"][f"{init}/{arm}"]
            cells = [_fmt(m, h, 1) for m, h in s["learning_times"]]
            lines.append(
                f"| {init} | {arm_label(arm)} | "
                + " | ".join(cells)
                + f" | {_fmt(*s['entropy'], 4)} | {_fmt(*s['delta_entropy_vs_gd'], 4)}"
                + f" | {_fmt(*s['final_test_loss'], 4)} | {_fmt(*s['delta_test_loss_vs_gd'], 4)} | {s['learned']} |"
            )
        if init == "aligned":
            for arm in ("gd", "sam_head", "sam_global"):
                o = res["ode"][arm]
                lines.append(
                    f"| ODE | {arm_label(arm)} | "
                    + " | ".join("n/a" if not np.isfinite(x) else f"{x:.1f}" for x in o["learning_times"])
                    + f" | {_fmt(o['entropy'], float('nan'), 4)} | {_fmt(o['entropy'] - res['ode']['gd']['entropy'], float('nan'), 4)} | | | |"
                )
        lines.append("")
    if res["ode_vs_aligned_sim"]:
        lines.append(
            "ODE vs aligned-init simulation, max over directions of |relative error| of the learning time "
            "(seed mean; worst single run): "
            + ", ".join(
                f"{arm_label(a)} {v['max_abs_rel_err_of_mean']:.1%} ({v['max_abs_rel_err_per_run']:.1%})"
                for a, v in res["ode_vs_aligned_sim"].items()
            )
            + "."
        )
    lines.append(
        "Reweighted pools: fraction of the pool upsampled, and the growth factor r_i = E_pool,w[y_q (s.u_i)(x_q.u_i)] "
        "/ E_pool[...] for i = 1..d (small-init learning times scale as 1/(lam_i^2 r_i)); seed means:"
    )
    for arm in (a for a in arms if is_pool_arm(a)):
        frac = np.mean([h[arm]["fraction"] for h in res["hard"]])
        hr = np.array([h[arm]["growth_factor"] for h in res["hard"]]).mean(0)
        lines.append(f"- {arm_label(arm)}: {frac:.1%}; " + ", ".join(f"{x:.2f}" for x in hr))
    pd = np.array([h["pool_drive_over_lam2"] for h in res["hard"]])
    lines.append(
        "Pool noise: the uniform pools' drive E_pool[y_q (s.u_i)(x_q.u_i)] / lam_i^2 (1 in the population) ranges "
        f"{pd.min():.3f}..{pd.max():.3f} over seeds and directions."
    )
    sw = res["ode_rho_sweep"]
    lines.append(
        f"ODE entropy against rho (GD: {res['ode']['gd']['entropy']:.4f}; per-head stall at rho = sqrt(3) v0 = "
        f"{sw['stall_rho']:.4g}): "
        + "; ".join(
            f"rho={r:.3g}: per-head {a:.4f}, global {b:.4f}"
            for r, a, b in zip(sw["sam_head"]["rho"], sw["sam_head"]["entropy"], sw["sam_global"]["entropy"])
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def _plots(cfg, out, runs, per_run, t_log, m_log, test_log, ode_res, sweep_res, summary, inits, arms, lam):
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    from datalever.rundir import atomic_write_bytes

    def save(fig, name):
        for ax in fig.axes:
            ax.xaxis.set_minor_formatter(NullFormatter())
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())

    colors = {"gd": "C0", "sam_head": "C1", "sam_global": "C2", "easy": "C4", "random": "C7"}
    for k, arm in enumerate(a for a in arms if a.startswith("reshaped:")):
        colors[arm] = ("C3", "C5", "C6", "C8", "C9")[k % 5]
    dcol = plt.cm.viridis(np.linspace(0, 0.95, cfg.d))
    idx = {(i, a, s): r for r, (i, a, s) in enumerate(runs)}

    # loss against time (seed 0), both inits
    fig, axes = plt.subplots(1, len(inits), figsize=(6 * len(inits), 4), squeeze=False)
    for ax, init in zip(axes[0], inits):
        for arm in arms:
            ax.plot(t_log, test_log[:, idx[(init, arm, 0)]], color=colors[arm], label=arm_label(arm), lw=1.2)
        for tt in per_run[idx[(init, "gd", 0)]]["learning_times"]:
            if np.isfinite(tt):
                ax.axvline(tt, color="C0", lw=0.5, ls=":")
        ax.set(
            xlabel="time t = step x lr (log)",
            ylabel="test loss (half MSE)",
            xscale="log",
            title=f"{init} init, seed {cfg.seed} (dotted: GD learning times)",
        )
        ax.legend(fontsize=7)
    save(fig, "loss.png")

    # each direction's learning curve (random init, seed 0)
    ncol = min(4, len(arms))
    nrow = math.ceil(len(arms) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.2 * nrow), sharey=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(arms) :]:
        ax.axis("off")
    for ax, arm in zip(axes, arms):
        r = idx[("random", arm, 0)]
        for i in range(cfg.d):
            ax.plot(t_log, m_log[:, r, i], color=dcol[i], label=f"λ={lam[i]:.2f}")
        ax.set_title(arm_label(arm), fontsize=9)
        ax.set(xlabel="time (log)", xscale="log")
    for r in range(nrow):
        axes[r * ncol].set_ylabel("m_i = λ_i u_iᵀΓu_i")
    fig.suptitle("learned map per direction (random init, seed 0)", fontsize=10)
    axes[len(arms) - 1].legend(fontsize=6)
    save(fig, "directions.png")

    # learning times per optimizer and entropy change
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(cfg.d)
    for k, arm in enumerate(arms):
        s = summary[f"random/{arm}"]
        mu = np.array([m for m, _ in s["learning_times"]])
        ci = np.nan_to_num(np.array([h for _, h in s["learning_times"]]))
        axes[0].errorbar(
            x + 0.08 * (k - len(arms) / 2), mu, yerr=ci, fmt="o-", color=colors[arm], label=arm_label(arm), ms=3, lw=1
        )
    axes[0].set(
        xlabel="eigenvector i (decreasing eigenvalue)",
        ylabel="learning time",
        yscale="log",
        title="learning times (random init, mean ± 95% CI)",
    )
    axes[0].legend(fontsize=7)
    na = len(arms)
    for j, init in enumerate(inits):
        for k, arm in enumerate(arms[1:]):
            m, h = summary[f"{init}/{arm}"]["delta_entropy_vs_gd"]
            axes[1].bar(
                j * na + k,
                m,
                yerr=0 if not np.isfinite(h) else h,
                color=colors[arm],
                label=arm_label(arm) if j == 0 else None,
            )
        if init == "aligned":
            for k, arm in enumerate(("sam_head", "sam_global")):
                axes[1].plot(
                    j * na + k,
                    ode_res[arm]["entropy"] - ode_res["gd"]["entropy"],
                    "k*",
                    ms=9,
                    label="reduced ODE" if k == 0 else None,
                )
    axes[1].set_xticks([(na - 2) / 2 + na * j for j in range(len(inits))], [f"{i} init" for i in inits])
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(ylabel="Δ entropy vs GD (paired by seed)", title="simplicity bias change (> 0: lower bias)")
    axes[1].legend(fontsize=7)
    save(fig, "learning_times.png")

    # ODE vs aligned-init simulation
    if "aligned" in inits:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
        for ax, arm in zip(axes, ("gd", "sam_head", "sam_global")):
            r = idx[("aligned", arm, 0)]
            for i in range(cfg.d):
                ax.plot(t_log, m_log[:, r, i], color=dcol[i])
                ax.plot(ode_res[arm]["t"], ode_res[arm]["m"][:, i], color=dcol[i], ls="--", lw=1)
            ax.set(title=f"{arm_label(arm)} (aligned init)", xlabel="time", xscale="log")
        fig.suptitle("learned map m_i per direction: simulation (solid, seed 0) and reduced ODE (dashed)", fontsize=10)
        axes[0].set_ylabel("m_i")
        save(fig, "ode.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, col in (("sam_head", colors["sam_head"]), ("sam_global", colors["sam_global"])):
        ax.plot(sweep_res[name]["rho"], sweep_res[name]["entropy"], "o-", color=col, label=arm_label(name))
    ax.axvline(sweep_res["stall_rho"], color="k", lw=0.5, ls=":", label="√3·v0 (per-head stall)")
    ax.axvline(cfg.rho, color="C7", lw=0.5, ls="--", label=f"rho of the runs ({cfg.rho:g})")
    ax.set(xlabel="rho", ylabel="entropy (ODE)", title="reduced ODE: entropy against rho")
    ax.legend(fontsize=8)
    save(fig, "entropy_vs_rho.png")
