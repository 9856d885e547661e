"""Evaluate a causal LM on math word problems: greedy generation, answer extraction, accuracy.

The pipeline, one function each:

- `generate`: batched greedy decoding of each example's prompt (tokenized exactly as in training),
  prompts left-padded, rows of similar length batched together, a static KV cache where the model
  supports one, each row stopped at EOS or at a stop string (its text cut before it); a row's
  tokens are those of decoding it alone. `generations` also says which rows the cap cut (`max_new_tokens`
  reached without an end of their own).
- `grade_example`: the answer in a generation (`answers.find_answer`) and in the reference response,
  and whether they agree (`answers.grade`); an example that cannot be graded is counted, never fatal.
- `evaluate_examples` / `compute_metrics`: accuracy overall, per source and per difficulty
  attribute found in each example's meta, plus one record per prediction; counts of what a reader of the
  accuracy needs besides (generations cut by the cap, answers written as programs, unmarked and ungradable ones).

Model output is only ever parsed (answers.py), never executed: a program answer is counted, not run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from datalever import checks, provenance, rundir
from datalever.answers import ERROR, GRADED, MARKERS, TIMEOUT, find_answer, grade, is_program
from datalever.examples import DIFFICULTY_KEYS, NO_SOURCE, DataFormat, local_data, read_data
from datalever.models import DTYPES, unwrap
from datalever.progress import bar as progress_bar
from datalever.progress import label as progress_label
from datalever.provenance import Classified
from datalever.tokens import Formatter, check_chat_template

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- generation


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


# ----------------------------------------------------------------------------- metrics


def _group(correct: list[bool]) -> dict[str, Any]:
    n = len(correct)
    k = sum(correct)
    return {"accuracy": k / n if n else None, "n": n, "n_correct": k}


def _value_key(v: Any) -> tuple:
    # Numbers in numeric order (steps 2 < 10), then everything else as text.
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v)):
        return (0, v, "")
    return (1, 0, str(v))


def _marked(record: dict) -> bool:
    # Records written before `answer_from` existed: found again from the generation.
    if "answer_from" in record:
        return record["answer_from"] in MARKERS
    return find_answer(record.get("generation") or "").marked


def _program(record: dict) -> bool:
    # Records written before `program` existed: decided again from the generation (the rule reads only the text).
    if "program" in record:
        return bool(record["program"])
    return is_program(record.get("generation"))


def compute_metrics(records: Sequence[dict], difficulty_keys: Sequence[str] = DIFFICULTY_KEYS) -> dict:
    """Accuracy overall, per source and per value of each difficulty key present in `meta`.

    metrics = {accuracy, n, n_correct, n_no_answer, n_no_marker, n_no_gold, n_ungradable, n_grading_timeout,
               n_cut, n_program,
               per_source: {source: {accuracy, n, n_correct}},
               per_difficulty: {key: {str(value): {accuracy, n, n_correct}}}}
    n_no_answer: generations with no answer at all; n_no_marker: generations that do not state their
    answer explicitly (no ####, "the answer is" or \\boxed; the answer, if any, is the whole text or its
    last value), a superset of n_no_answer. n_cut: generations cut by the cap (`max_new_tokens` tokens without
    EOS, end of turn or stop string: an answer may be missing because the model ran out of room, not because it
    had none); None for records written before the cut was recorded. n_program: answers written as programs
    (`answers.is_program`: program of thought, which MathInstruct teaches), counted and never run, graded on what
    `find_answer` finds in their text. n_ungradable: examples whose grading failed or timed out
    (n_grading_timeout of them timed out). An example without a gold answer, or that could not be
    graded, counts as wrong (and in n_no_gold / n_ungradable): a problem to see, not to hide. Keys
    absent from every example are left out of per_difficulty.
    """
    overall = _group([bool(r["correct"]) for r in records])
    by_source: dict[str, list[bool]] = {}
    for r in records:
        src = r.get("source")
        by_source.setdefault(NO_SOURCE if src is None else str(src), []).append(bool(r["correct"]))
    per_difficulty: dict[str, dict[str, dict]] = {}
    for key in difficulty_keys:
        values: dict[Any, list[bool]] = {}
        labels: dict[Any, Any] = {}
        for r in records:
            meta = r.get("meta") or {}
            if key in meta and meta[key] is not None:
                v = meta[key]
                h = json.dumps(v, sort_keys=True, default=str)  # hashable and type-aware
                labels[h] = v
                values.setdefault(h, []).append(bool(r["correct"]))
        if values:
            ordered = sorted(values, key=lambda h: _value_key(labels[h]))
            per_difficulty[key] = {str(labels[h]): _group(values[h]) for h in ordered}
    return {
        **overall,
        "n_no_answer": sum(r["extracted"] is None for r in records),
        "n_no_marker": sum(not _marked(r) for r in records),
        "n_no_gold": sum(r["gold"] is None for r in records),
        "n_ungradable": sum(r.get("grading", GRADED) != GRADED for r in records),
        "n_grading_timeout": sum(r.get("grading") == TIMEOUT for r in records),
        "n_cut": sum(bool(r["cut"]) for r in records) if all("cut" in r for r in records) else None,
        "n_program": sum(_program(r) for r in records),
        "per_source": {s: _group(c) for s, c in sorted(by_source.items())},
        "per_difficulty": per_difficulty,
    }


def grade_example(generation: str, response: str) -> dict:
    """The record fields of one example's grading: extracted, answer_from, gold, correct, grading.

    answer_from: where the generation's answer was found (`answers.find_answer`'s source);
    grading: "graded", "timeout" or "error". Any failure here (an answer no parser can take) makes
    this one example ungradable (counted wrong), never the evaluation fail.
    """
    out = {"extracted": None, "answer_from": None, "gold": None, "correct": False, "grading": ERROR}
    try:
        found = find_answer(generation)
        out.update(extracted=found.answer, answer_from=found.source)
        out["gold"] = find_answer(response).answer
        verdict = grade(out["extracted"], out["gold"])
        out.update(correct=verdict.correct, grading=verdict.status)
    except Exception as e:  # noqa: BLE001 - one example's text must not abort the whole evaluation
        log.warning("an example could not be graded (%s: %s); counted as wrong", type(e).__name__, e)
    return out


def _prompt(formatter: Formatter | None, tokenizer, ex) -> str | list[int]:
    """The prompt as text when plain (generate tokenizes it as training did), else as the training prefix's ids."""
    if formatter is None and ex.messages is None:
        return ex.prompt
    return (formatter or Formatter(tokenizer)).prompt_ids(ex)


def _shown_prompt(formatter: Formatter | None, tokenizer, ex, prompt: str | list[int]) -> str:
    """The prompt a record shows: as written in the data, except where a chat template or conversation turns
    rendered it (the turns the model read, special tokens included)."""
    rendered = ex.messages is not None or (formatter is not None and formatter.template is not None)
    return tokenizer.decode(prompt, clean_up_tokenization_spaces=False) if rendered else ex.prompt


def evaluate_examples(
    model,
    tokenizer,
    examples: Sequence,
    options: GenerationOptions = GenerationOptions(),
    *,
    difficulty_keys: Sequence[str] = DIFFICULTY_KEYS,
    accelerator=None,
    formatter: Formatter | None = None,
) -> tuple[dict, list[dict]]:
    """Generate, extract and score every example; return (metrics, one record per example, in order).

    With an `accelerator` (an `Accelerator` or accelerate's `PartialState`) of several processes,
    each process generates for its shard (examples[rank::world]) and the records are gathered,
    so every process returns the full result. Records: id, source, meta, prompt (the text the model was given,
    chat template included), generation, extracted, answer_from, gold, correct, grading (see `grade_example`),
    cut (the cap ended the generation: `reached_cap`) and program (`answers.is_program`).
    `formatter` renders the prompts as training did (default: plain text, the prompts as written); generation also
    stops at its end of turn. With `options.synced` (the model is sharded over the processes: FSDP) every shard is
    filled up to the same length with copies of the first example, so that every process runs as many batches; their
    records are dropped.
    """
    examples = list(examples)
    world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    rank = accelerator.process_index if world > 1 else 0
    positions = list(range(rank, len(examples), world))
    if options.synced and examples:
        positions += [-1] * (-(-len(examples) // world) - len(positions))  # -1: a filler, not reported
    shard = [examples[max(i, 0)] for i in positions]
    prompts = [_prompt(formatter, tokenizer, ex) for ex in shard]
    options = dataclasses.replace(
        options,
        progress=options.progress and (accelerator is None or accelerator.is_local_main_process),
        end_ids=(*options.end_ids, *(formatter.stop_ids() if formatter else ())),
    )
    outputs = generations(model, tokenizer, prompts, options=options)
    records = []
    for pos, ex, prompt, (text, cut) in zip(positions, shard, prompts, outputs):
        if pos < 0:
            continue
        records.append(
            {
                "_pos": pos,
                "id": ex.id,
                "source": ex.source,
                "meta": dict(ex.meta or {}),
                "prompt": _shown_prompt(formatter, tokenizer, ex, prompt),
                "generation": text,
                **grade_example(text, ex.response),
                "cut": cut,
                "program": is_program(text),
            }
        )
    if world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    records.sort(key=lambda r: r["_pos"])
    for r in records:
        del r["_pos"]
    n_gold_missing = sum(r["gold"] is None for r in records)
    if n_gold_missing:
        log.warning(
            "%d of %d examples have no extractable gold answer (counted as wrong)", n_gold_missing, len(records)
        )
    n_ungradable = sum(r["grading"] != GRADED for r in records)
    if n_ungradable:
        log.warning("%d of %d examples could not be graded (counted as wrong)", n_ungradable, len(records))
    return compute_metrics(records, difficulty_keys), records


def evaluate_during_training(
    model,
    accelerator,
    tokenizer,
    examples: Sequence,
    options: GenerationOptions = GenerationOptions(),
    *,
    formatter: Formatter | None = None,
) -> tuple[dict, list[dict]]:
    """`evaluate_examples` on the model being trained: `model` as train prepared it (the loss wrapper, maybe under
    DDP or FSDP2), called on every process. Under FSDP2 every process holds a shard of each weight: the root's own
    weights (embeddings, head) are gathered for the whole evaluation, the blocks' at each forward as in training,
    and the processes generate in lockstep (`GenerationOptions.synced`)."""
    from torch.distributed.fsdp import FSDPModule

    generator = accelerator.unwrap_model(model).model  # the HF (or peft) model under the loss wrapper
    several = accelerator.num_processes > 1
    sharded = several and isinstance(model, FSDPModule)
    if sharded:
        model.unshard()  # the root's weights, whatever state the last step left them in; the blocks gather their own
    try:
        return evaluate_examples(
            generator,
            tokenizer,
            examples,
            dataclasses.replace(options, synced=sharded),
            accelerator=accelerator if several else None,
            formatter=formatter,
        )
    finally:
        if sharded:
            model.reshard()


# ----------------------------------------------------------------------------- the stage


@dataclass
class EvalConfig(DataFormat):
    """Evaluate a causal LM on math problems: greedy decoding, answer extraction, accuracy."""

    model: str = "runs/train/model"
    """HF checkpoint directory or hub id holding the model and its tokenizer; `preset:NAME` or
    `embedded:demo-base` as in train."""
    data: str | None = None
    """Evaluation examples: a file, a datasets directory or a hub dataset (`openai/gsm8k:main`); the gold answer
    is extracted from each response; required."""
    split: str | None = None
    """Split of `data` when it holds several (a DatasetDict, a hub dataset); default: test."""
    chat_template: str = "auto"
    """How prompts are rendered, as in training: auto (the tokenizer's chat template where it has one, else plain
    text) | none | FILE (a Jinja chat template). With a template, generation also stops at its end of turn."""
    out: str = "runs/eval"
    """Output directory: predictions.jsonl (one row per example) and metrics.json."""
    seed: int = 0
    """Initialization seed of a `preset:NAME` model."""
    max_new_tokens: int = 256
    """Most tokens generated per example (generation stops earlier at EOS)."""
    batch_size: int = 32
    """Prompts per generation batch (prompts of similar length are batched together)."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    difficulty_keys: list[str] = field(default_factory=lambda: list(DIFFICULTY_KEYS))
    """Meta keys to break accuracy down by (e.g. level, steps), where examples have them."""
    max_prompt_length: int | None = None
    """Cut longer prompts from the left to this many tokens; default: what the model's positions allow."""
    dtype: str | None = None
    """Weights dtype: float32, bfloat16, float16, auto (the checkpoint's); default: bfloat16 on a GPU that supports
    it (training's bf16 autocast computes in it too), elsewhere the loader's default (the checkpoint's dtype: float32
    for presets and the embedded model)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings besides EOS: a generation ends once its text contains one and is cut before it, e.g.
    ["Question:"] for base models that go on to write the next problem; default: none (EOS only)."""
    cache: str = "static"
    """KV cache for decoding: static (preallocated; on a GPU the decoding step is compiled) where the model supports
    it, else dynamic; dynamic: grown step by step. Both give the same generations (up to floating-point rounding
    on a GPU)."""
    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint (only for checkpoints you trust)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace an evaluation made in the same place with other settings (without it such a rerun is refused)."""

    def generation(self) -> GenerationOptions:
        """The generation options these settings give."""
        return GenerationOptions(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            max_prompt_length=self.max_prompt_length,
            stop=self.stop,
            cache=self.cache,
            progress=self.progress,
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Refused here, before any data or model is loaded: `--limit -1` once evaluated 49 of 50.
        checks.positive("max_new_tokens", self.max_new_tokens)
        checks.positive("batch_size", self.batch_size)
        checks.positive("limit", self.limit, optional=True)
        checks.positive("max_prompt_length", self.max_prompt_length, optional=True)
        checks.one_of("dtype", self.dtype, (*DTYPES, None))
        checks.one_of("cache", self.cache, CACHES)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise checks.ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.data is None:
            raise checks.ConfigError("data is required: the examples to evaluate on (--data FILE or a hub dataset)")
        local_data("data", self.data)
        check_chat_template(self.chat_template)


EVAL_SETTINGS = Classified(
    # Every one decides the predictions or the metrics (the batch size and the cache too: other kernels, other
    # padding, other rounding in a greedy decode); the paths as given.
    decide=(
        "schema",
        "fields",
        "template",
        "model",
        "data",
        "split",
        "chat_template",
        "out",
        "seed",
        "max_new_tokens",
        "batch_size",
        "limit",
        "difficulty_keys",
        "max_prompt_length",
        "dtype",
        "stop",
        "cache",
        "trust_remote_code",
    ),
    ignored=("progress", "overwrite", "on_conflict"),
)


def eval_dtype(dtype: str | None, device: torch.device) -> str | None:
    """The dtype to load in: `dtype` if given, else bfloat16 on a GPU that supports it, else None (the loader's
    default, so CPU results are those of before this default existed)."""
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return None


def _records_jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(rundir.to_jsonable(r), ensure_ascii=False) + "\n" for r in records)


def run(cfg: EvalConfig) -> dict:
    """Load the model and the data, evaluate, write out/predictions.jsonl and out/metrics.json."""
    import os

    from datalever.models import load_model, load_tokenizer, resolve_model

    provenance.refuse_other_settings(cfg.out, "evaluate", cfg, ignore=EVAL_SETTINGS.ignored)
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched with torchrun/accelerate: the process state already set up (e.g. by training in
        # this process, CPU or GPU) is reused as it is; PartialState() does not reconfigure it.
        from accelerate import PartialState

        accelerator = PartialState()
        device = accelerator.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    examples = read_data(cfg.data, cfg.data_format(), split=cfg.split, default_split="test")
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    model_path = resolve_model(cfg.model, seed=cfg.seed)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    dtype = eval_dtype(cfg.dtype, torch.device(device))
    model = load_model(model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(device)
    metrics, records = evaluate_examples(
        model,
        tokenizer,
        examples,
        cfg.generation(),
        difficulty_keys=cfg.difficulty_keys,
        accelerator=accelerator,
        formatter=Formatter(tokenizer, cfg.chat_template),
    )
    if accelerator is None or accelerator.is_main_process:
        out = rundir.EvalDir(cfg.out)
        provenance.record(
            out.root, "evaluate", cfg, data_fingerprint=provenance.fingerprint(examples), n_examples=len(examples)
        )
        rundir.atomic_write_text(out.predictions, _records_jsonl(records))
        rundir.write_json(out.metrics, metrics)  # last: its presence marks a finished evaluation
    if accelerator is not None:
        accelerator.wait_for_everyone()
    log.info(
        "accuracy %.4f on %d examples (%d without an answer, %d without an answer marker, %d ungradable, "
        "%d cut at max_new_tokens=%d, %d written as programs)",
        metrics["accuracy"] or 0.0,
        metrics["n"],
        metrics["n_no_answer"],
        metrics["n_no_marker"],
        metrics["n_ungradable"],
        metrics["n_cut"],
        cfg.max_new_tokens,
        metrics["n_program"],
    )
    return metrics
