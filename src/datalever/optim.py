"""Optimizers for fine-tuning causal LMs: AdamW, Muon (+AdamW), SAM; the LR schedule; one optimizer step.

* ``adamw``: AdamW on every trainable parameter (weight decay on matrices only, not on norms/biases); torch's
  fused kernels where every parameter trains on CUDA (``OptimConfig.fused``).
* ``muon``: ``torch.optim.Muon`` on the 2-D hidden weight matrices (attention/MLP projections, LoRA A/B);
  AdamW on embeddings, the output head (2-D or tied, found via ``get_input/output_embeddings``),
  every ``nn.Embedding``, norms and biases. Muon uses ``adjust_lr_fn="match_rms_adamw"`` by default,
  so one learning rate serves both halves.
* ``sam``: sharpness-aware minimization around a base optimizer (adamw | muon | sgd): gradient g at w,
  perturb w by rho*g/||g|| (norm over all trainable parameters), gradient g' there, restore w exactly,
  base step with g'.

Every optimizer sees trainable parameters only. All of them expose ``param_groups`` (each group holds
its base lr as ``"initial_lr"``; ``set_lr`` scales it), ``step``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` (Muon momentum buffers, AdamW moments), and ``is_sam``.

``optimizer_step`` does one full update over a list of micro-batches: the loss is the token-weighted
mean over all micro-batches (accumulation equals one big batch), backward without DDP gradient sync on all
but the last micro-batch (and on all of SAM's first pass), clip, step, zero grads. It returns the step's
``StepStats`` (losses, passes, gradient norm): counting what a run spent is the caller's business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from datalever.models import unwrap
from datalever.provenance import Classified

__all__ = [
    "OptimConfig",
    "MultiOptimizer",
    "SAM",
    "StepStats",
    "build_optimizer",
    "global_grad_norm",
    "is_dtensor",
    "muon_param_split",
    "lr_factor",
    "set_lr",
    "optimizer_step",
]

NAMES = ("adamw", "muon", "sam")
SAM_BASES = ("adamw", "muon", "sgd")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw | muon (Muon on hidden matrices, AdamW on the rest) | sam (two passes per step)."""
    lr: float = 2e-5
    """Peak learning rate (after warmup) of the AdamW groups, and of Muon unless muon_lr is set."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices (AdamW and Muon), never to norms or biases."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    muon_lr: float | None = None
    """Peak learning rate of the Muon group; None = same as lr (muon_adjust_lr matches AdamW's update RMS)."""
    muon_momentum: float = 0.95
    """Muon momentum."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_adjust_lr: str | None = "match_rms_adamw"
    """Muon per-matrix lr adjustment: match_rms_adamw (lr * 0.2 * sqrt(max(A, B))) | original (Keller Jordan's)
    | None."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations in Muon."""
    sam_rho: float = 0.05
    """SAM perturbation radius rho (0 = base optimizer at twice the cost)."""
    sam_base: str = "adamw"
    """Base optimizer under SAM: adamw | muon | sgd (plain SGD, for closed-form checks)."""
    fused: bool = True
    """Fused AdamW (torch's one-kernel implementation, its fastest) where every AdamW parameter trains on a CUDA
    device in a floating dtype; elsewhere (a CPU) torch's default AdamW, whatever this says."""

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"OptimConfig.name must be one of {NAMES}, got {self.name!r}")
        if self.sam_base not in SAM_BASES:
            raise ValueError(f"OptimConfig.sam_base must be one of {SAM_BASES}, got {self.sam_base!r}")
        if self.muon_adjust_lr not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"OptimConfig.muon_adjust_lr: unknown {self.muon_adjust_lr!r}")
        if self.sam_rho < 0:
            raise ValueError("OptimConfig.sam_rho must be >= 0")
        if self.fused not in (True, False):
            raise ValueError(f"OptimConfig.fused must be true or false, got {self.fused!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


# Every OptimConfig field decides the numbers, but only where it is in effect (`settings_in_effect`).
OPTIM_SETTINGS = Classified(decide=tuple(f.name for f in dataclasses.fields(OptimConfig)), ignored=())


def settings_in_effect(optim: dict) -> dict:
    """OptimConfig's values (as a dict) without the muon_* ones unless Muon is built (alone or under SAM) and without
    the sam_* ones unless SAM is (`build_optimizer`); `fused` as it is in effect (CUDA and an AdamW built). What a run's
    resume identity records: a setting of an optimizer that is not built changes no number."""
    base = optim["sam_base"] if optim["name"] == "sam" else optim["name"]
    unused = []
    if base != "muon":
        unused.append("muon_")
    if optim["name"] != "sam":
        unused.append("sam_")
    kept = {k: v for k, v in optim.items() if not k.startswith(tuple(unused))}
    # Fused AdamW is other kernels only where it runs (`fused_adamw`); elsewhere it computes as before it existed.
    fused = kept.pop("fused", False) and base in ("adamw", "muon") and torch.cuda.is_available()
    return {**kept, "fused": True} if fused else kept


# --------------------------------------------------------------------------- parameter split


def _embedding_module(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    if fn is None:
        return None
    try:
        mod = fn()
    except (AttributeError, NotImplementedError):
        return None
    return mod if isinstance(mod, nn.Module) else None


def _embedding_and_head_param_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of the input embedding, the output head and every nn.Embedding."""
    inner = unwrap(model, through_peft=False)  # a peft model forwards the embedding getters
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = _embedding_module(inner, getter)
        if mod is not None:
            ids.update(id(p) for p in mod.parameters())
    for mod in inner.modules():
        if isinstance(mod, nn.Embedding):
            ids.update(id(p) for p in mod.parameters())
    return ids


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    # named_parameters() deduplicates tied weights; order is the model's own, hence deterministic.
    return [p for _, p in model.named_parameters() if p.requires_grad]


def muon_param_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters into (muon_params, adamw_params).

    Muon: 2-D matrices that are not part of the input embedding, the output head (tied or not), or any
    nn.Embedding: the attention/MLP projections of the blocks, and LoRA's lora_A/lora_B.
    AdamW: everything else (embeddings, head, norms, biases, any non-2-D tensor).
    """
    excluded = _embedding_and_head_param_ids(model)
    muon, adamw = [], []
    for p in _trainable(model):
        (muon if p.ndim == 2 and id(p) not in excluded else adamw).append(p)
    return muon, adamw


# --------------------------------------------------------------------------- optimizers


def _decay_groups(params: list[nn.Parameter], cfg: OptimConfig, label: str) -> list[dict]:
    """Weight decay on matrices only; norms and biases (ndim < 2) get none."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "group": label})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group": f"{label}_no_decay"})
    return groups


class MultiOptimizer:
    """Several torch optimizers over disjoint parameters, stepped together (e.g. Muon + AdamW).

    ``param_groups`` lists the groups of all of them (the very dicts, so setting ``lr`` works).
    """

    is_sam = False

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("MultiOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Any:
        if closure is not None:
            raise NotImplementedError("closures are not supported; use optimizer_step")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())

    def state_dict(self, get_state: Callable | None = None) -> dict:
        """Each torch optimizer's state, taken by ``get_state(opt)`` (default ``opt.state_dict()``;
        under FSDP the caller passes a function that gathers the sharded state)."""
        get_state = get_state or (lambda opt: opt.state_dict())
        return {
            "kind": "multi",
            "optimizers": {k: get_state(opt) for k, opt in self.optimizers.items()},
        }

    def load_state_dict(self, state_dict: dict, set_state: Callable | None = None) -> None:
        """Inverse of ``state_dict``; ``set_state(opt, saved)`` loads one torch optimizer (default
        ``opt.load_state_dict``)."""
        if state_dict.get("kind") != "multi":
            raise ValueError(f"not a MultiOptimizer state dict (kind={state_dict.get('kind')!r})")
        saved = state_dict["optimizers"]
        if list(saved) != list(self.optimizers):
            raise ValueError(f"optimizer mismatch: saved {list(saved)}, have {list(self.optimizers)}")
        set_state = set_state or (lambda opt, sd: opt.load_state_dict(sd))
        for k, opt in self.optimizers.items():
            set_state(opt, saved[k])

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{k}: {type(o).__name__}({sum(len(g['params']) for g in o.param_groups)} tensors)"
            for k, o in self.optimizers.items()
        )
        return f"MultiOptimizer({inner})"


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor (an FSDP2 shard), told apart without importing torch.distributed.tensor."""
    return type(t).__name__ == "DTensor"


def global_grad_norm(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all the gradients together, as one scalar tensor.

    Under FSDP each gradient is a DTensor holding one shard: the per-tensor norms are reduced over the
    shards (``full_tensor``), so every process gets the norm of the whole gradient, not of its shard.
    """
    grads = [p.grad.detach() for p in params]
    if any(is_dtensor(g) for g in grads):
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return total.full_tensor() if is_dtensor(total) else total
    dev = grads[0].device
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=acc).to(dev) for g in grads]))


class SAM:
    """Sharpness-aware minimization around a base optimizer.

    Use: gradients g at w -> ``perturb()`` (w += rho * g / ||g||, norm over all parameters of the base
    optimizer, which are the trainable ones) -> zero grads -> gradients g' at the perturbed point ->
    ``restore()`` (w copied back exactly) -> ``step()`` (base step with g'). ``optimizer_step`` does this.
    Under DDP the first pass runs without gradient sync, so each rank perturbs with its local gradient;
    under FSDP it syncs (a rank holds only a shard), so the perturbation uses the whole batch's gradient.
    """

    is_sam = True

    def __init__(self, base: MultiOptimizer, rho: float = 0.05):
        if rho < 0:
            raise ValueError("rho must be >= 0")
        self.base = base
        self.rho = float(rho)
        self._backup: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def params(self) -> list[nn.Parameter]:
        return self.base.params()

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.base.torch_optimizers()

    @torch.no_grad()
    def perturb(self) -> float:
        """w += rho * g / ||g|| using the current .grad; returns ||g||."""
        if self._backup is not None:
            raise RuntimeError("SAM.perturb called twice without restore")
        ps = [p for p in self.params() if p.grad is not None]
        if not ps:
            self._backup = []
            return 0.0
        norm = global_grad_norm(ps)
        self._backup = [(p, p.detach().clone()) for p in ps]
        if self.rho > 0:
            scale = self.rho / norm.clamp_min(1e-12)
            for p in ps:
                p.add_(p.grad * scale.to(device=p.device, dtype=p.dtype))
        return float(norm)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the unperturbed weights back (exact, not a subtraction)."""
        if self._backup is None:
            raise RuntimeError("SAM.restore called without perturb")
        for p, w in self._backup:
            p.copy_(w)
        self._backup = None

    def step(self, closure: Callable | None = None) -> Any:
        if self._backup is not None:
            raise RuntimeError("SAM.step called while perturbed; call restore() first")
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self, get_state: Callable | None = None) -> dict:
        return {"kind": "sam", "rho": self.rho, "base": self.base.state_dict(get_state)}

    def load_state_dict(self, state_dict: dict, set_state: Callable | None = None) -> None:
        if state_dict.get("kind") != "sam":
            raise ValueError(f"not a SAM state dict (kind={state_dict.get('kind')!r})")
        self.base.load_state_dict(state_dict["base"], set_state)
        self.rho = float(state_dict["rho"])

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, base={self.base!r})"


def fused_adamw(params: Sequence[nn.Parameter], cfg: OptimConfig, device: torch.device | str | None = None) -> bool:
    """Whether AdamW over `params` runs fused: asked for (cfg.fused), and every parameter floating-point and training
    on CUDA (`device`, where they will train, or else where they are). Never on a CPU: torch's default AdamW there
    keeps CPU numbers as they were."""
    if not cfg.fused or not params:
        return False
    device_types = {torch.device(device).type} if device is not None else {p.device.type for p in params}
    return device_types == {"cuda"} and all(p.is_floating_point() for p in params)


def _adamw(params: list[nn.Parameter], cfg: OptimConfig, device) -> torch.optim.AdamW:
    # fused=None, not False, off CUDA: torch then picks its default kernels, exactly as before this option existed.
    fused = True if fused_adamw(params, cfg, device) else None
    return torch.optim.AdamW(_decay_groups(params, cfg, "adamw"), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _build_base(model: nn.Module, cfg: OptimConfig, name: str, device=None) -> MultiOptimizer:
    if name == "adamw":
        params = _trainable(model)
        if not params:
            raise ValueError("model has no trainable parameters")
        return MultiOptimizer({"adamw": _adamw(params, cfg, device)})
    if name == "sgd":
        params = _trainable(model)
        if not params:
            raise ValueError("model has no trainable parameters")
        return MultiOptimizer({"sgd": torch.optim.SGD(_decay_groups(params, cfg, "sgd"), lr=cfg.lr)})
    if name == "muon":
        muon_params, adamw_params = muon_param_split(model)
        if not muon_params and not adamw_params:
            raise ValueError("model has no trainable parameters")
        opts: dict[str, torch.optim.Optimizer] = {}
        if muon_params:
            opts["muon"] = torch.optim.Muon(
                [{"params": muon_params, "group": "muon"}],
                lr=cfg.lr if cfg.muon_lr is None else cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        if adamw_params:
            opts["adamw"] = _adamw(adamw_params, cfg, device)
        return MultiOptimizer(opts)
    raise ValueError(f"unknown optimizer {name!r}")


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device | str | None = None
) -> MultiOptimizer | SAM:
    """The optimizer named by ``cfg.name`` over the trainable parameters of ``model``; ``device``: where the
    parameters will train, if not where they are now (it decides fused AdamW, ``fused_adamw``).

    Build it on the model after ``accelerator.prepare(model)`` (DDP wrappers are unwrapped for the split)
    or before; the parameter objects are the same. Under FSDP2 build it before and pass
    ``opt.torch_optimizers()`` to ``accelerator.prepare`` with the model, which re-points them at the
    sharded parameters (``launch.prepare`` does this).
    """
    if cfg.name == "sam":
        return SAM(_build_base(model, cfg, cfg.sam_base, device), rho=cfg.sam_rho)
    return _build_base(model, cfg, cfg.name, device)


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Cosine schedule with linear warmup, as a factor of the peak lr, for the update with index ``step``.

    step < warmup: step / warmup (0 at step 0); then min_ratio + (1 - min_ratio) * (1 + cos(pi * t)) / 2
    with t = (step - warmup) / (total - warmup), reaching min_ratio at step == total_steps (and beyond).
    Same values as transformers' get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_ratio).
    """
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError("min_ratio must be in [0, 1]")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(opt: Any, factor: float) -> None:
    """Set every param group's lr to its base lr ("initial_lr", stored on first use) times ``factor``."""
    for g in opt.param_groups:
        if "initial_lr" not in g:
            g["initial_lr"] = g["lr"]
        g["lr"] = g["initial_lr"] * factor


# --------------------------------------------------------------------------- one optimizer step


@dataclass
class StepStats:
    loss: float
    """Token-weighted mean loss over the micro-batches at the current weights (SAM: the first pass)."""
    forwards: int
    """Forward passes (micro-batches) run in this step; SAM runs twice as many."""
    backwards: int
    """Backward passes run in this step."""
    grad_norm: float
    """Norm of the gradient used for the step, before clipping (SAM: at the perturbed point)."""
    sam_loss: float | None = None
    """SAM only: mean loss at the perturbed weights."""


def _is_fsdp(model: nn.Module, accelerator: Any) -> bool:
    if accelerator is not None and getattr(accelerator, "is_fsdp2", False):
        return True
    return any(type(m).__name__.startswith("FSDP") for m in model.modules())


def _no_sync(model: nn.Module, accelerator: Any):
    # Under FSDP every backward syncs (reduce-scatters): with sync off, FSDP2 accumulates the gradients
    # unsharded, outside the parameters' .grad, where _grad_pass's in-place rescaling cannot reach them;
    # and SAM's first pass needs the whole gradient, which no process holds locally (so under FSDP SAM
    # perturbs with the global gradient, exactly as one process does with the whole batch).
    if _is_fsdp(model, accelerator):
        return contextlib.nullcontext()
    if accelerator is not None:
        return accelerator.no_sync(model)
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _grad_pass(
    model: nn.Module, micro_batches: Sequence, loss_fn: Callable, accelerator: Any, sync: bool, n_tokens: int
) -> float:
    """Forward+backward over all micro-batches, leaving d(sum of token losses / n_tokens)/dw in .grad; returns
    the mean token loss.

    `n_tokens` is this rank's token count, known before the first forward, so every micro-batch's loss is
    normalized before its backward: under FSDP every backward reduce-scatters and .grad mixes all ranks,
    so nothing accumulated there could be rescaled afterwards. The loss function's counts (ints, or tensors
    on the device) are read back once, after the last backward is queued: no host sync per micro-batch.
    Under DDP the last backward is the one that syncs: each rank contributes its gradient normalized by
    its own token count, and all ranks end with the same averaged gradient.
    """
    total_loss = None
    total_n = 0
    last = len(micro_batches) - 1
    for i, mb in enumerate(micro_batches):
        ctx = contextlib.nullcontext() if (sync and i == last) else _no_sync(model, accelerator)
        with ctx:
            loss_sum, n = loss_fn(model, mb)
            total_n = total_n + n
            total_loss = loss_sum.detach().double() if total_loss is None else total_loss + loss_sum.detach().double()
            loss = loss_sum / max(n_tokens, 1)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
    total_n = int(total_n)
    if total_n != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} but the loss function counted {total_n} tokens")
    return float(total_loss) / total_n if total_n > 0 else float("nan")


def _set_grads_none(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def optimizer_step(
    model: nn.Module,
    opt: MultiOptimizer | SAM,
    micro_batches: list,
    loss_fn: Callable,
    *,
    n_tokens: int,
    accelerator: Any = None,
    max_grad_norm: float | None = 1.0,
) -> StepStats:
    """One update from ``micro_batches``; ``loss_fn(model, mb) -> (sum of token losses, n_tokens)`` (n_tokens an int
    or a 0-dim tensor, left on the device: it is read once per pass).

    The loss is normalized by ``n_tokens``, the token count of all micro-batches together (this rank's; it
    must equal what ``loss_fn`` counts), so accumulation equals one big batch. All but the last backward run
    under no_sync (DDP); SAM's whole first pass does. The gradient is clipped to ``max_grad_norm`` (None: no
    clipping, the norm is still reported), the optimizer steps, and the gradients are set to None.
    """
    if not micro_batches:
        raise ValueError("optimizer_step needs at least one micro-batch")
    if accelerator is not None:
        if getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                "optimizer_step accumulates itself: create the Accelerator with gradient_accumulation_steps=1"
            )
        if getattr(accelerator, "scaler", None) is not None:
            raise ValueError("fp16 loss scaling (GradScaler) is not supported; use bf16 or fp32")
    params = [p for p in model.parameters() if p.requires_grad]
    k = len(micro_batches)
    _set_grads_none(params)

    sam_loss = None
    if opt.is_sam:
        loss = _grad_pass(model, micro_batches, loss_fn, accelerator, sync=False, n_tokens=n_tokens)
        opt.perturb()
        _set_grads_none(params)
        try:
            sam_loss = _grad_pass(model, micro_batches, loss_fn, accelerator, sync=True, n_tokens=n_tokens)
        finally:
            opt.restore()
        forwards = backwards = 2 * k
    else:
        loss = _grad_pass(model, micro_batches, loss_fn, accelerator, sync=True, n_tokens=n_tokens)
        forwards = backwards = k

    clip = float("inf") if max_grad_norm is None else float(max_grad_norm)
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    _set_grads_none(params)
    return StepStats(
        loss=loss,
        forwards=forwards,
        backwards=backwards,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        sam_loss=sam_loss,
    )
