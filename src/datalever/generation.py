"""Greedy generation for evaluation: each prompt tokenized exactly as in training, left-padded, rows of similar length
batched together, a static KV cache where the model supports one, each row stopped at EOS, at the template's end of
turn or at a stop string (its text cut before it); a row's tokens are those of decoding it alone. `generations` also
says which rows the cap cut (`max_new_tokens` reached without an end of their own). All the knobs travel in one
`GenerationOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from datalever.models import unwrap
from datalever.progress import bar as progress_bar
from datalever.progress import label as progress_label


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id: generation could not stop")
    return sorted(ids)


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(
    tokenizer, prompts: Sequence[str] | Sequence[list[int]], max_prompt_length: int | None = None
) -> list[list[int]]:
    """Token ids of each prompt, special tokens as in training; cut from the left if too long. Prompts given
    as token ids (`tokens.Formatter.prompt_ids`: the training prefix, chat template included) are only cut.

    A leading BOS survives the cut (the model always saw one there).
    """
    if not prompts:
        return []
    if all(isinstance(p, str) for p in prompts):
        encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    else:
        encoded = [list(p) for p in prompts]
    if max_prompt_length is None:
        return [list(ids) for ids in encoded]
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    bos = tokenizer.bos_token_id
    out = []
    for ids in encoded:
        ids = list(ids)
        if len(ids) > max_prompt_length:
            keep_bos = bos is not None and ids[0] == bos and max_prompt_length > 1
            ids = ([bos] if keep_bos else []) + ids[len(ids) - (max_prompt_length - keep_bos) :]
        out.append(ids)
    return out


def _left_pad(rows: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


CACHES = ("static", "dynamic")  # KV caches generation can use (`GenerationOptions.cache`)


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate (always greedy): one object from the caller (the eval stage, learning curves) through
    `evaluate_during_training`, `evaluate_examples` and `generate` down to `generate_ids`."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt (a row stops earlier at EOS)."""
    batch_size: int = 32
    """Prompts per generation batch (prompts of similar length are batched together)."""
    max_prompt_length: int | None = None
    """Cut longer prompts from the left to this many tokens; default: what the model's positions leave room for
    with `max_new_tokens` more."""
    stop: Sequence[str] = ()
    """Stop strings: a row also stops once its decoded continuation contains one (its ids then end with the token
    that completed it; `generate` cuts the text before it)."""
    cache: str = "static"
    """"static": decode with a preallocated KV cache (on a GPU HF then compiles the decoding step) where the model
    supports it, else with the dynamic cache; "dynamic": always with the latter."""
    min_new_tokens: int = 0
    """EOS is suppressed until that many tokens are out (benchmarks: a known token count)."""
    end_ids: Sequence[int] = ()
    """Tokens that end a row besides EOS (a chat template's end of turn, `Formatter.stop_ids`)."""
    synced: bool = False
    """The model's weights are sharded over the processes (FSDP), so every forward is a collective: each process
    keeps running forwards until every process's batch has finished (HF's synced_gpus); the caller gives every
    process the same number of batches (`evaluate_examples` does)."""
    progress: bool = True
    """Show a progress bar."""


def supports_static_cache(model) -> bool:
    """Whether HF can decode `model` with a preallocated static KV cache (custom-code models often cannot)."""
    base = unwrap(model)
    if hasattr(base, "_supports_default_dynamic_cache") and not base._supports_default_dynamic_cache():
        return False  # models with their own cache (Mamba-like): generate would ignore the request anyway
    # `_supports_static_cache` before transformers 4.54, `_can_compile_fullgraph` since.
    return bool(getattr(base, "_can_compile_fullgraph", False) or getattr(base, "_supports_static_cache", False))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the stop string itself removed)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def _vocab_size(model, tokenizer) -> int:
    """How many token ids the model can emit (its output rows may outnumber the tokenizer's vocabulary)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    rows = head.weight.shape[0] if head is not None and hasattr(head, "weight") else 0
    return max(rows, len(tokenizer))


def stop_triggers(tokenizer, stop: Sequence[str], size: int) -> torch.Tensor:
    """Token ids after which a continuation may newly contain a stop string, as a (size + 1) bool table.

    A stop string first appears when the token holding its last character arrives, so only after these
    tokens is the continuation decoded and searched. Conservative: a token that decodes alone to
    nothing (a SentencePiece "▁" loses its space) or, for non-ASCII stop strings, to a partial
    character also triggers. Ids past the tokenizer's vocabulary decode to nothing and never trigger;
    the extra last entry is where ids past `size` are clamped to.
    """
    last_chars = {s[-1] for s in stop}
    partial = any(not c.isascii() for c in last_chars)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    table = torch.zeros(size + 1, dtype=torch.bool)
    for i, text in enumerate(texts):
        if i in special:
            continue
        if not text or any(c in text for c in last_chars) or (partial and "\ufffd" in text):
            table[i] = True
    return table


class StopStrings(StoppingCriteria):
    """Stops a row once its decoded continuation (the text after `prompt_width` tokens) contains a stop string.

    Only rows whose newest token is a trigger (`stop_triggers`) are decoded, so a step costs one small
    device-to-host copy, not a decode of every row. Each row's verdict depends on its own tokens alone:
    batching changes nothing. (HF's `stop_strings` matches the end of the whole sequence, so a stop
    string straddling the prompt and the continuation would stop a row too early.) `lengths`: row ->
    continuation length when it stopped; HF pads a stopped row afterwards, with tokens that are no EOS.
    """

    def __init__(self, tokenizer, stop: Sequence[str], triggers: torch.Tensor, prompt_width: int):
        self.tokenizer, self.stop, self.triggers, self.prompt_width = tokenizer, list(stop), triggers, prompt_width
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].clamp(max=len(self.triggers) - 1)
        rows = self.triggers[last].nonzero().flatten().tolist()
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if rows:
            texts = self.tokenizer.batch_decode(input_ids[rows, self.prompt_width :].tolist(), skip_special_tokens=True)
            hits = [row for row, text in zip(rows, texts) if any(s in text for s in self.stop)]
            if hits:
                done[hits] = True
            for row in hits:
                self.lengths.setdefault(row, input_ids.shape[1] - self.prompt_width)
        return done


def length_sorted_batches(encoded: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `encoded` in batches of similar length, longest first.

    Similar lengths waste little on padding; longest first shows an out-of-memory at once and sizes a
    static KV cache for every later batch (HF reuses the longest length), so it is allocated once.
    """
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _prompt_room(model, max_new_tokens: int) -> int | None:
    """The longest prompt the model's positions leave room for with `max_new_tokens` more (None: no limit)."""
    positions = _max_positions(model)
    if positions is None:
        return None
    if positions - max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {positions} positions")
    return positions - max_new_tokens


def _until_eos(row: list[int], eos: Sequence[int]) -> list[int]:
    return row[: next((j for j, t in enumerate(row) if t in eos), len(row))]


@torch.no_grad()
def generate_ids(
    model, tokenizer, prompts: list[str], options: GenerationOptions = GenerationOptions()
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (EOS and what follows it removed), in order.

    Prompts are sorted by length and cut into batches of `options.batch_size`, longest first (an
    out-of-memory shows at once); each batch is left-padded with an attention mask; each row stops at EOS, at
    `options.end_ids` or at a stop string (see `GenerationOptions`).
    A row's tokens do not depend on its batch or the cache beyond floating-point rounding: identical to
    decoding it alone in float32 on a CPU (tested); in bf16 on a GPU, kernels chosen per shape can flip
    a near-tie.
    """
    max_new_tokens, stop = options.max_new_tokens, options.stop
    if max_new_tokens < 1 or options.batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if options.cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}; got {options.cache!r}")
    if any(not s for s in stop):
        raise ValueError("an empty stop string would stop every row at once")
    gen_model = unwrap(model, through_peft=False)  # a peft model generates with its adapters
    max_prompt_length = options.max_prompt_length
    if max_prompt_length is None:
        max_prompt_length = _prompt_room(gen_model, max_new_tokens)
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    if any(not ids for ids in encoded):
        raise ValueError("a prompt encodes to no tokens and the tokenizer adds no BOS: nothing to condition on")
    eos = sorted(set(_eos_ids(gen_model, tokenizer)) | set(options.end_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(gen_model.parameters()).device
    hf_options = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    if options.min_new_tokens:
        hf_options["min_new_tokens"] = min(options.min_new_tokens, max_new_tokens)
    if options.synced:
        hf_options["synced_gpus"] = True
    if options.cache == "static" and supports_static_cache(gen_model):
        hf_options["cache_implementation"] = "static"
    triggers = stop_triggers(tokenizer, stop, _vocab_size(gen_model, tokenizer)).to(device) if stop else None

    results: list[list[int]] = [[] for _ in encoded]
    was_training = gen_model.training
    gen_model.eval()
    try:
        with progress_bar(total=len(encoded), desc=progress_label("generate"), unit="ex", show=options.progress) as bar:
            for idx in length_sorted_batches(encoded, options.batch_size):
                input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad, device)
                stopping = StopStrings(tokenizer, stop, triggers, input_ids.shape[1]) if stop else None
                if stopping is not None:
                    hf_options["stopping_criteria"] = StoppingCriteriaList([stopping])
                out = gen_model.generate(input_ids=input_ids, attention_mask=attention_mask, **hf_options)
                for k, (i, row) in enumerate(zip(idx, out[:, input_ids.shape[1] :].tolist())):
                    stopped_at = stopping.lengths.get(k, len(row)) if stopping is not None else len(row)
                    results[i] = _until_eos(row[:stopped_at], eos)
                bar.update(len(idx))
    finally:
        gen_model.train(was_training)
    return results


class Generation(NamedTuple):
    """A prompt's continuation: its text (decoded without special tokens, cut before the first stop string) and
    whether it was cut by the cap: `max_new_tokens` tokens without an end (EOS, an end of turn or a stop string)."""

    text: str
    cut: bool


def reached_cap(ids: Sequence[int], text: str, options: GenerationOptions) -> bool:
    """Whether a continuation ended because it reached `options.max_new_tokens`, not at an end of its own.

    `ids` as `generate_ids` returns them (EOS and end of turn removed, so a row that ended there is shorter than
    the cap) and `text` their decoding before any stop string is cut: a row that reached the cap is cut unless the
    stop string that stopped it arrived with its last token (a stop string anywhere in it stops the row)."""
    return len(ids) >= options.max_new_tokens and not any(s in text for s in options.stop)


def generations(
    model, tokenizer, prompts: list[str] | list[list[int]], options: GenerationOptions = GenerationOptions()
) -> list[Generation]:
    """Greedy continuation of each prompt (text, or token ids) and whether the cap cut it (`Generation`)."""
    ids = generate_ids(model, tokenizer, prompts, options=options)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
    return [
        Generation(cut_at_stop(text, options.stop), reached_cap(row, text, options)) for row, text in zip(ids, texts)
    ]


def generate(
    model, tokenizer, prompts: list[str] | list[list[int]], options: GenerationOptions = GenerationOptions()
) -> list[str]:
    """Greedy continuation of each prompt (text, or token ids), decoded without special tokens (only the new
    text), cut before the first stop string."""
    return [g.text for g in generations(model, tokenizer, prompts, options)]
