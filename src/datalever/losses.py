"""The per-example loss engine: mean NLL of each example's response given its prompt.

Why not `model(labels=...)`: that materializes full-vocabulary logits for every position, prompt
included, and averages over the whole batch. Here the transformer body runs once per batch, and
the output projection is applied only at the positions whose next token is a response token; the
per-token losses are then summed per example. The same module computes the training loss, so what
is recorded for the proxy and what the target model minimizes are one definition.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datalever import checks
from datalever.examples import DataFormat, Example, local_data, read_data
from datalever.models import unwrap
from datalever.progress import bar as progress_bar
from datalever.progress import label as progress_label
from datalever.tokens import (
    IGNORE,
    Encoded,
    Formatter,
    Truncation,
    check_chat_template,
    pack,
    token_budget_batches,
    unpack,
)

log = logging.getLogger(__name__)

# Configs whose logits are post-processed after the output projection (scaling, soft-capping):
# for these the engine takes the model's own logits instead of projecting hidden states itself.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

FLAG_TRUNCATED = "truncated"  # the maximum length cut the whole response away


def _needs_full_logits(hf_model: nn.Module) -> bool:
    cfg = getattr(hf_model, "config", None)
    return any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING)


class ResponseLoss(nn.Module):
    """Wraps a causal LM; forward returns per-example (sum of response-token NLL, response-token count).

    Wrap this module (not the bare model) with Accelerate/DDP when training, so gradient
    synchronization sees the forward pass. `chunk` bounds the rows projected to the vocabulary at
    once, so memory stays flat for large vocabularies; when scoring (no autograd) `vocab_slice`
    bounds the vocabulary columns computed at once as well.
    """

    def __init__(self, model: nn.Module, chunk: int = 8192, padding_mask: bool = False, vocab_slice: int = 2048):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.vocab_slice = vocab_slice
        # Rows are right-padded: under causal attention a real token never sees the padding after
        # it, so the padding mask changes nothing at the positions that carry loss. Leaving it out
        # lets attention take its fast causal path. Set padding_mask=True for a model whose
        # attention is not causal over the whole sequence.
        self.padding_mask = padding_mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        positions: torch.Tensor | None = None,
    ):
        """Per-example sums of the response-token NLL, and the counts of those tokens.

        `positions`: the loss positions as flat indices into the n x (width - 1) predictions
        (`tokens.loss_positions`, found on the host); given, they are selected without a device-to-host
        synchronisation (a boolean mask's nonzero waits for the device). The same positions in the same order as
        the mask's: the same numbers."""
        keep = labels[:, 1:] != IGNORE  # position t predicts token t+1
        if positions is None:
            positions = keep.reshape(-1).nonzero(as_tuple=True)[0]  # synchronises: scoring builds no positions
        width = labels.shape[1]
        rows = torch.div(positions, width - 1, rounding_mode="floor")
        # Indices into the whole n x width grid (contiguous: selecting from it copies only the kept rows).
        at = positions + rows
        flat_targets = labels.reshape(-1).index_select(0, at + 1)
        hf = unwrap(self.model)
        if not self.padding_mask:
            attention_mask = None
        # use_cache=False: nothing is decoded after this forward, yet an HF model defaults to
        # use_cache=True (config.use_cache) and builds a KV cache every call (per layer a copy of K
        # and V, kept alive to the end of the forward): ~5-15% of a demo-preset forward on the CPU.
        if _needs_full_logits(hf):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_nll = _token_nll(logits.reshape(-1, logits.shape[-1]).index_select(0, at), flat_targets)
        else:
            body = getattr(hf, hf.base_model_prefix)
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)
            token_nll = self._project_and_score(hf.get_output_embeddings(), kept, flat_targets)
        n = input_ids.shape[0]
        sums = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_nll)
        counts = keep.sum(dim=1)
        return sums, counts

    def _project_and_score(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunks = zip(hidden.split(self.chunk), targets.split(self.chunk))
        # Sliced on the CPU only: there it keeps the logits in cache; on a GPU it would only add kernel launches.
        if not torch.is_grad_enabled() and type(head) is nn.Linear and hidden.device.type == "cpu":
            parts = [_sliced_token_nll(h, head.weight, head.bias, t, self.vocab_slice) for h, t in chunks]
        else:  # training (autograd needs the whole logits anyway), or a head of another kind (LoRA, ...)
            parts = [_token_nll(head(h), t) for h, t in chunks]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` (n x vocab) at its target, in float32.

    Without autograd (scoring) it works in place in the logits buffer, which belongs to the caller
    alone: F.cross_entropy would allocate a second n x vocab buffer for the log-softmax, which for a
    50k vocabulary is the same size as the logits and costs memory traffic and page faults. Same
    arithmetic as log_softmax: logsumexp(x) = max + log(sum(exp(x - max))).
    """
    if logits.requires_grad:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    logits = logits.float()  # no copy when already float32
    top = logits.amax(dim=1, keepdim=True)
    target_logit = logits.gather(1, targets[:, None])
    log_sum_exp = logits.sub_(top).exp_().sum(dim=1, keepdim=True).log_().add_(top)
    return (log_sum_exp - target_logit)[:, 0]


def _sliced_token_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, width: int
) -> torch.Tensor:
    """Like `_token_nll(F.linear(hidden, weight, bias), targets)`, a slice of `width` vocabulary rows at a time.

    A running max and a running sum of exp(logit - max) give the logsumexp over the whole
    vocabulary (the online softmax), so the n x vocab logits never exist at once. Why: for a 50k
    vocabulary a 2048-token CPU batch has ~170 MB of logits, fresh memory from the OS each batch
    (a page fault per 4 KiB on first touch), written once and read back for the softmax; an
    n x 2048 slice (~10 MB) is reused from batch to batch and stays in cache. On pythia-70m (2
    threads, 256 examples) this took the output layer and loss from ~3.1 s to ~2.0 s, and the
    whole engine from ~7.6 s to ~6.3 s. Without autograd only: the slices are overwritten in place.
    """
    n = hidden.shape[0]
    run_max = torch.full((n, 1), -math.inf, dtype=torch.float32, device=hidden.device)
    run_sum = torch.zeros((n, 1), dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros((n, 1), dtype=torch.float32, device=hidden.device)
    t = targets[:, None]
    for start in range(0, weight.shape[0], width):
        logits = F.linear(
            hidden, weight[start : start + width], None if bias is None else bias[start : start + width]
        ).float()
        # The target's logit, taken from the same matmul output as the logsumexp (consistent rounding).
        inside = (t >= start) & (t < start + logits.shape[1])
        picked = logits.gather(1, (t - start).clamp(0, logits.shape[1] - 1))
        target_logit = torch.where(inside, picked, target_logit)
        new_max = torch.maximum(run_max, logits.amax(dim=1, keepdim=True))
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max).exp_().sum(dim=1, keepdim=True)
        run_max = new_max
    return (run_max + run_sum.log() - target_logit)[:, 0]


@dataclass
class ExampleLoss:
    id: str
    loss: float  # mean NLL over response tokens; NaN only together with a flag
    n_tokens: int  # response tokens that carry loss
    flag: str = ""  # "" or FLAG_TRUNCATED


def encode_all(tokenizer, examples: Sequence[Example], max_length: int, chat_template: str = "none") -> list[Encoded]:
    formatter = Formatter(tokenizer, chat_template)
    return [formatter.encode(ex, max_length) for ex in examples]


def default_token_budget(device: torch.device) -> int:
    """Padded tokens per scoring batch. On a CPU, bigger batches buy no speed, while the wider length
    range they span costs padding; an accelerator wants big batches to be busy."""
    return 2048 if device.type == "cpu" else 32768


def _stage(rows: list[Encoded], pad_id: int, device: torch.device) -> tuple[list[Encoded], dict[str, torch.Tensor]]:
    """Pad a batch on the host and start its copy to `device`: one buffer, one copy; on the CPU the `to` is a no-op.

    Asynchronous on CUDA only, from pinned memory, which CUDA's host allocator keeps from reuse until the
    copy is done; a non-blocking copy from pageable memory (MPS, ...) could read the buffer after it is freed.
    """
    cuda = device.type == "cuda"
    packed = pack(rows, pad_id, pin_memory=cuda)
    return rows, unpack(packed.to(device, non_blocking=cuda))


def _send_to_host(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start the copy of a batch's per-example sums and counts to the host: one transfer for both.

    The float32 sums travel as their int32 bit patterns, side by side with the counts, so both are
    exact (a float32 count would round above 2**24) on every device (MPS has no float64). On CUDA the
    copy goes to pinned memory without waiting for the forward; the returned event marks its end.
    """
    packed = torch.stack((sums.view(torch.int32), counts.to(torch.int32)))
    if packed.device.type != "cuda":
        return packed.cpu(), None
    host = packed.to("cpu", non_blocking=True)  # pinned destination: the copy is queued, not waited for
    done = torch.cuda.Event()
    done.record()
    return host, done


def _example_losses(rows: list[Encoded], on_the_way) -> list[tuple[str, float, int]]:
    """(id, mean response NLL, response tokens) per row, once the batch's results have reached the host."""
    host, done = on_the_way
    if done is not None:
        done.synchronize()
    sums, counts = host.numpy()
    # float32 -> Python float is exact, so s / c is the same double as the float32 sum over the int count.
    return [(e.id, s / c, c) for e, s, c in zip(rows, sums.view(np.float32).tolist(), counts.tolist())]


# No autograd: without this the forward records the graph and keeps every layer's activations for
# a backward that never comes (the parameters require grad), ~25% of the demo preset's scoring time.
# no_grad rather than inference_mode (the same speed here): scoring also runs in the middle of
# training (profile.py), and a buffer a model updates in its forward (e.g. a dynamic RoPE's
# inv_freq) would become an inference tensor that the next training step cannot use.
@torch.no_grad()
def score_encoded(
    model: nn.Module,
    encoded: Sequence[Encoded],
    *,
    pad_id: int,
    token_budget: int | None = None,
    accelerator=None,
    progress: bool = False,
    desc: str = "scoring",
) -> dict[str, ExampleLoss]:
    """Per-example response losses for already-encoded examples, keyed by id.

    Under `torch.distributed` (an Accelerate `accelerator` with several processes) each rank scores
    every world_size-th batch and the results are gathered by id on every rank; this works for a
    model sharded by FSDP as well (profile's proxy under an FSDP launch).
    """
    scorer = model if isinstance(model, ResponseLoss) else ResponseLoss(model)
    was_training = scorer.training
    scorer.eval()
    device = next(scorer.parameters()).device
    results = {e.id: ExampleLoss(e.id, math.nan, 0, FLAG_TRUNCATED) for e in encoded if e.fully_truncated}
    scorable = [e for e in encoded if not e.fully_truncated]
    batches = token_budget_batches([len(e.input_ids) for e in scorable], token_budget or default_token_budget(device))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = batches[rank::world]
    # Every rank runs the same number of forward passes: a sharded (FSDP) model gathers its weights
    # collectively in each one, so a rank with one batch fewer re-runs a batch and drops the result.
    rounds = math.ceil(len(batches) / world)
    local: list[tuple[str, float, int]] = []

    def rows_of(i: int) -> list[Encoded]:
        return [scorable[j] for j in (mine[i] if i < len(mine) else batches[0])]

    # One batch ahead, in this thread: batch i+1 is padded and sent while the device runs batch i
    # (its kernels are queued), and only then do we wait for batch i's results. A background thread
    # would buy no more overlap: the padding holds the GIL, which the thread launching the kernels needs.
    staged = _stage(rows_of(0), pad_id, device) if rounds else None
    with progress_bar(total=rounds, desc=progress_label(desc), show=progress and rank == 0, leave=False) as bar:
        for i in range(rounds):
            rows, tensors = staged
            on_the_way = _send_to_host(*scorer(**tensors))
            if i + 1 < rounds:
                staged = _stage(rows_of(i + 1), pad_id, device)
            if i < len(mine):
                local.extend(_example_losses(rows, on_the_way))
            bar.update(1)
    if world > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    for id_, loss, count in local:
        results[id_] = ExampleLoss(id_, loss, count)
    scorer.train(was_training)
    return results


def score_examples(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int = 512,
    token_budget: int | None = None,
    accelerator=None,
    progress: bool = False,
) -> dict[str, ExampleLoss]:
    """Mean response NLL of every example given its prompt, plus token counts and truncation flags."""
    encoded = encode_all(tokenizer, examples, max_length)
    return score_encoded(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        token_budget=token_budget,
        accelerator=accelerator,
        progress=progress,
    )


@dataclass
class ScoreConfig(DataFormat):
    """Score every example's mean response loss under a model (the per-example loss engine)."""

    model: str = "preset:demo"
    """HF checkpoint directory or hub id, or `preset:NAME`."""
    data: str | None = None
    """Examples to score: a file, a datasets directory or a hub dataset (`openai/gsm8k:main`); required."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset)."""
    chat_template: str = "auto"
    """How examples are rendered: auto (the tokenizer's chat template where it has one, else plain text) | none |
    FILE (a Jinja chat template); with a template the loss covers the assistant turns only."""
    out: str = "runs/score/losses.parquet"
    """Output Parquet table: id, loss, n_tokens (response tokens scored), n_cut (response tokens max_length cut),
    flag."""
    max_length: int = 512
    """Maximum tokens per example; an example whose response is cut away entirely is flagged."""
    token_budget: int | None = None
    """Padded tokens per batch (length-bucketed); default 2048 on a CPU, 32768 on an accelerator."""
    dtype: str | None = None
    """float32 | bfloat16 | float16 | auto (default: the checkpoint's)."""
    seed: int = 0
    """Seed of a preset's initialization."""
    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint (only for checkpoints you trust)."""

    def __post_init__(self) -> None:
        from datalever.models import DTYPES

        super().__post_init__()
        if self.data is None:
            raise checks.ConfigError("data is required: the examples to score (--data FILE or a hub dataset)")
        local_data("data", self.data)
        check_chat_template(self.chat_template)
        checks.positive("max_length", self.max_length)
        checks.positive("token_budget", self.token_budget, optional=True)
        if self.dtype is not None:
            checks.one_of("dtype", self.dtype, DTYPES)


def run(cfg: ScoreConfig) -> str:
    import pyarrow as pa
    from accelerate import Accelerator

    from datalever import rundir
    from datalever.models import load_model, load_tokenizer, resolve_model

    accelerator = Accelerator()
    path = resolve_model(cfg.model, seed=cfg.seed)
    model = load_model(path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code).to(accelerator.device)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    examples = read_data(cfg.data, cfg.data_format(), split=cfg.split)
    encoded = encode_all(tokenizer, examples, cfg.max_length, cfg.chat_template)
    truncation = Truncation.of(encoded, cfg.max_length)
    if accelerator.is_main_process and truncation.warning():
        log.warning("score: %s", truncation.warning())
    scores = score_encoded(
        model,
        encoded,
        pad_id=tokenizer.pad_token_id,
        token_budget=cfg.token_budget,
        accelerator=accelerator,
        progress=True,
    )
    if accelerator.is_main_process:
        rows = [scores[ex.id] for ex in examples]
        table = {
            "id": [r.id for r in rows],
            "loss": [r.loss for r in rows],
            "n_tokens": [r.n_tokens for r in rows],
            "n_cut": [e.n_cut for e in encoded],
            "flag": [r.flag for r in rows],
        }
        rundir.write_parquet(cfg.out, pa.table(table))
    flagged = sum(1 for s in scores.values() if s.flag)
    return f"{cfg.out}: {len(examples)} examples scored, {flagged} flagged (response cut away by max_length)"
