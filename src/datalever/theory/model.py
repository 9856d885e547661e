"""The in-context regression data, the multi-head linear-attention model, and its GD/SAM trainer.

Data: x ~ N(0, Sigma) with Sigma = U diag(lam) U^T, y_n = w.x_n with w ~ N(0, I) per sequence; a
sequence is N labelled tokens [x_n; y_n] and a query [x_q; 0].

Model: multi-head linear attention with rank-one keys and queries (`forward` is the literal model).
Speed: the prediction is linear in the per-sequence features Z_ij (x_q)_k, with Z = X X^T / N,
and in the CP tensor A_ijk = sum_h v_hi k_hj q_hk. Full-batch GD on a fixed pool therefore needs
only the pool's second-moment matrix of those features (computed once), after which one gradient
costs O(features^2) per run whatever the pool size. This is the same loss, exactly (checked in
tests against the literal token-level model); it is not an approximation.

Trainer: `train` runs full-batch GD and SAM for many runs at once, each on its own pool's second moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from datalever.theory.config import TheoryConfig

# ----------------------------------------------------------------------------- data


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


def kappa(lam, N: int) -> np.ndarray:
    """Finite-N factor: along eigenvector i the population loss is lam_i (kappa_i m_i^2 - 2 m_i + 1) / 2."""
    lam = np.asarray(lam, float)
    return 1.0 + (1.0 + lam.sum() / lam) / N


def drive(tokens, target, U) -> np.ndarray:
    """Per sequence and eigenvector, y_q (s.u_i)(x_q.u_i) with s = (1/N) sum_n x_n y_n. Its pool mean
    is the linear (signal) term that drives direction i's growth from a small init (population
    value lam_i^2). A reweighted pool multiplies it by the growth factor r_i = E_w[drive_i]/E[drive_i],
    so that small-init learning times scale as 1/(lam_i^2 r_i) (docs/theory.md)."""
    d = U.shape[0]
    N = tokens.shape[1] - 1
    s = torch.einsum("nti,nt->ni", tokens[:, :-1, :d], tokens[:, :-1, d]) / N
    return (target[:, None] * (s @ U) * (tokens[:, -1, :d] @ U)).cpu().numpy()


# ----------------------------------------------------------------------------- model


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


@dataclass
class Mixture:
    """Pool moments as a weighted sum of other pools' moments (a reweighted pool: its seed's whole pool plus
    the upsampled part). Training reads each part's matrix once per step for all the pools that mix it."""

    parts: list[tuple[float, Stats]]

    def dense(self) -> Stats:
        return Stats(
            sum(w * st.M for w, st in self.parts),
            sum(w * st.b for w, st in self.parts),
            float(sum(w * st.c for w, st in self.parts)),
        )


def upsampled_stats(whole: Stats, part: Stats, n: int, n_part: int, factor: float) -> Mixture:
    """The moments of a pool of n sequences whose n_part sequences in `part` count `factor` times, from the
    moments of the whole pool and of the part: pool_stats with those weights (tested), without another pass
    over the pool for each factor."""
    a, b = float(n), (factor - 1.0) * n_part
    return Mixture([(a / (a + b), whole), (b / (a + b), part)])


@dataclass
class _Plan:
    """Groups of runs as the distinct moment matrices they read: per matrix the runs and their weights, and
    per run the summed linear and constant terms."""

    matrices: list[tuple[torch.Tensor, slice | torch.Tensor, torch.Tensor]]  # (M, rows, weights (n, 1))
    b: torch.Tensor  # (R, features)
    c: torch.Tensor  # (R,)


def make_plan(groups, R: int, like: torch.Tensor) -> _Plan:
    """groups: list of (run indices or slice, Stats or Mixture), every run in exactly one group; like: a tensor
    (any rows, features) with the dtype and device of the model's tensors."""
    by_matrix: dict[int, tuple[Stats, list, list]] = {}
    for idx, st in groups:
        rows = _rows(idx, R)
        for w, base in st.parts if isinstance(st, Mixture) else [(1.0, st)]:
            entry = by_matrix.setdefault(id(base), (base, [], []))
            entry[1].extend(rows)
            entry[2].extend([w] * len(rows))
    b = torch.zeros(R, like.shape[-1], dtype=like.dtype, device=like.device)
    c = torch.zeros(R, dtype=like.dtype, device=like.device)
    matrices = []
    for base, rows, ws in by_matrix.values():
        w = torch.tensor(ws, dtype=like.dtype, device=like.device)[:, None]
        r = torch.tensor(rows, dtype=torch.long, device=like.device)
        b.index_add_(0, r, w * base.b[None, :])
        c.index_add_(0, r, w[:, 0] * base.c)
        matrices.append((base.M, rows_index(rows), w))
    return _Plan(matrices, b, c)


def _group_loss(t, plan: _Plan, want_grad: bool, want_loss: bool = True):
    Mt = torch.zeros_like(t)
    for M, idx, w in plan.matrices:
        prod = w * (t[idx] @ M)
        if isinstance(idx, slice):
            Mt[idx] += prod
        else:
            Mt.index_add_(0, idx, prod)
    loss = 0.5 * ((t * Mt).sum(-1) - 2 * (t * plan.b).sum(-1) + plan.c) if want_loss else None
    return loss, (Mt - plan.b) if want_grad else None


def _as_plan(groups, t) -> _Plan:
    return groups if isinstance(groups, _Plan) else make_plan(groups, t.shape[0], t)


def loss_and_grad(feat: Features, theta, groups, want_loss: bool = True):
    """Pool loss (R,) and its gradient (R, 3, H, d+1); groups: list of (run indices or slice, Stats or Mixture),
    or their plan."""
    t = feat.tensor(theta)
    loss, gt = _group_loss(t, _as_plan(groups, t), True, want_loss)
    return loss, feat.grad_theta(theta, gt)


def loss_only(feat: Features, theta, groups):
    t = feat.tensor(theta)
    return _group_loss(t, _as_plan(groups, t), False)[0]


def effective_map(theta, lam, U):
    """m (R, d): lam_i u_i^T Gamma u_i, Gamma = sum_h (v_y k_x + k_y v_x) q_x^T the map from the
    in-context statistic s = (1/N) sum_n x_n y_n to the prediction. Both pathways (y carried by the
    value or by the key) count. m_i = 1 is the ideal; the finite-N optimum is 1/kappa_i < 1."""
    d = lam.numel()
    V, K, Q = theta[:, 0], theta[:, 1], theta[:, 2, :, :d]
    G = torch.einsum("rh,rhi,rhk->rik", V[..., d], K[..., :d], Q)
    G = G + torch.einsum("rh,rhi,rhk->rik", K[..., d], V[..., :d], Q)
    return torch.einsum("ia,rik,ka->ra", U, G, U) * lam


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


# ----------------------------------------------------------------------------- trainer


def rows_index(rows):
    """A slice when the rows are contiguous (a view, no gather), else a LongTensor."""
    rows = [int(r) for r in rows]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long)


def _rows(idx, R):
    return list(range(R))[idx] if isinstance(idx, slice) else [int(r) for r in idx]


@dataclass
class _SamRuns:
    """The SAM runs of a batch as a sub-batch: their rows, normalization, radius and pool groups."""

    idx: slice | torch.Tensor  # the SAM runs' rows in the batch
    per_head: torch.Tensor  # (S, 1, 1, 1), True: perturbation normalized per head, False: globally
    rho: torch.Tensor  # (S, 1, 1, 1)
    groups: list | _Plan  # the batch's groups, with rows renumbered within the sub-batch (then their plan)


def _sam_runs(mode, rho, groups, theta) -> _SamRuns | None:
    mode = torch.as_tensor(mode, device=theta.device)
    rho = torch.as_tensor(rho, dtype=theta.dtype, device=theta.device)
    sam = torch.nonzero(mode > 0).flatten()
    if not len(sam):
        return None
    pos = {int(r): i for i, r in enumerate(sam.tolist())}
    sam_groups = []
    for idx, st in groups:
        sub = [pos[r] for r in _rows(idx, theta.shape[0]) if r in pos]
        if sub:
            sam_groups.append((rows_index(sub), st))
    return _SamRuns(
        rows_index(sam.tolist()), (mode[sam] == 1)[:, None, None, None], rho[sam][:, None, None, None], sam_groups
    )


def _sam_gradient(feat: Features, theta, g, sam: _SamRuns):
    """The SAM runs' gradient at the perturbed point theta + rho g/|g|."""
    gs = g[sam.idx]
    n_head = gs.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
    n_glob = gs.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().expand_as(n_head)
    norm = torch.where(sam.per_head, n_head, n_glob)
    eps = sam.rho * gs / torch.clamp(norm, min=1e-300)
    return loss_and_grad(feat, theta[sam.idx] + eps, sam.groups, want_loss=False)[1]


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
    sam = _sam_runs(mode, rho, groups, theta)
    like = feat.tensor(theta[:1])
    # each moment matrix read once per step (plans built once, not per step)
    if sam is not None:
        sam.groups = make_plan(sam.groups, len(_rows(sam.idx, theta.shape[0])), like)
    groups = make_plan(groups, theta.shape[0], like)
    if test_groups is not None:
        test_groups = make_plan(test_groups, theta.shape[0], like)
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
        if sam is not None:
            g[sam.idx] = _sam_gradient(feat, theta, g, sam)
        theta -= lr * g
    out = {"t": torch.tensor(logs["t"], dtype=torch.float64)}
    for k in ("m", "train", "test"):
        if logs[k]:
            out[k] = torch.stack(logs[k]).cpu()
    return theta, out
