"""Evaluate a causal LM on math word problems: greedy generation, answer extraction, accuracy.

The pipeline, one function each:

- `generate`: batched greedy decoding of each example's prompt (tokenized exactly as in training),
  prompts left-padded, rows of similar length batched together, each row stopped at EOS.
- `grade_example`: the answer in a generation (`answers.find_answer`) and in the reference response,
  and whether they agree (`answers.grade`); an example that cannot be graded is counted, never fatal.
- `evaluate_examples` / `compute_metrics`: accuracy overall, per source and per difficulty
  attribute found in each example's meta, plus one record per prediction.

Model output is only ever parsed (answers.py), never executed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from datalever import checks, rundir
from datalever.answers import ERROR, GRADED, MARKERS, TIMEOUT, find_answer, grade
from datalever.examples import DIFFICULTY_KEYS, FILE_READERS, NO_SOURCE
from datalever.models import DTYPES, unwrap

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


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, special tokens as in training; cut from the left if too long.

    A leading BOS survives the cut (the model always saw one there).
    """
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
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


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (EOS and what follows it removed), in order.

    Prompts are sorted by length and cut into batches of `batch_size`, longest first (an
    out-of-memory shows at once); each batch is left-padded with an attention mask. Without
    `max_prompt_length`, prompts are cut to what the model's positions allow with
    `max_new_tokens` more.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    gen_model = unwrap(model, through_peft=False)  # a peft model generates with its adapters
    if max_prompt_length is None:
        positions = _max_positions(gen_model)
        if positions is not None:
            max_prompt_length = positions - max_new_tokens
            if max_prompt_length < 1:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {positions} positions"
                )
    encoded = encode_prompts(tokenizer, prompts, max_prompt_length)
    if any(not ids for ids in encoded):
        raise ValueError("a prompt encodes to no tokens and the tokenizer adds no BOS: nothing to condition on")
    eos = _eos_ids(gen_model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(gen_model.parameters()).device

    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    results: list[list[int]] = [[] for _ in encoded]
    was_training = gen_model.training
    gen_model.eval()
    try:
        with tqdm(total=len(order), desc="generate", unit="ex", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad, device)
                out = gen_model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                new = out[:, input_ids.shape[1] :].tolist()
                for i, row in zip(idx, new):
                    stop = next((j for j, t in enumerate(row) if t in eos), len(row))
                    results[i] = row[:stop]
                bar.update(len(idx))
    finally:
        gen_model.train(was_training)
    return results


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    progress: bool = True,
    max_prompt_length: int | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, decoded without special tokens (only the new text)."""
    ids = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_length=max_prompt_length,
        progress=progress,
    )
    return tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []


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


def compute_metrics(records: Sequence[dict], difficulty_keys: Sequence[str] = DIFFICULTY_KEYS) -> dict:
    """Accuracy overall, per source and per value of each difficulty key present in `meta`.

    metrics = {accuracy, n, n_correct, n_no_answer, n_no_marker, n_no_gold, n_ungradable, n_grading_timeout,
               per_source: {source: {accuracy, n, n_correct}},
               per_difficulty: {key: {str(value): {accuracy, n, n_correct}}}}
    n_no_answer: generations with no answer at all; n_no_marker: generations that do not state their
    answer explicitly (no ####, "the answer is" or \\boxed; the answer, if any, is the whole text or its
    last value), a superset of n_no_answer. n_ungradable: examples whose grading failed or timed out
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


def evaluate_examples(
    model,
    tokenizer,
    examples: Sequence,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    difficulty_keys: Sequence[str] = DIFFICULTY_KEYS,
    accelerator=None,
    max_prompt_length: int | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Generate, extract and score every example; return (metrics, one record per example, in order).

    With an `accelerator` (an `Accelerator` or accelerate's `PartialState`) of several processes,
    each process generates for its shard (examples[rank::world]) and the records are gathered,
    so every process returns the full result. Records: id, source, meta, prompt, generation, extracted,
    answer_from, gold, correct, grading (see `grade_example`).
    """
    examples = list(examples)
    world = getattr(accelerator, "num_processes", 1) if accelerator is not None else 1
    rank = accelerator.process_index if world > 1 else 0
    positions = list(range(rank, len(examples), world))
    shard = [examples[i] for i in positions]
    generations = generate(
        model,
        tokenizer,
        [ex.prompt for ex in shard],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_prompt_length=max_prompt_length,
        progress=progress and (accelerator is None or accelerator.is_local_main_process),
    )
    records = []
    for pos, ex, text in zip(positions, shard, generations):
        records.append(
            {
                "_pos": pos,
                "id": ex.id,
                "source": ex.source,
                "meta": dict(ex.meta or {}),
                "prompt": ex.prompt,
                "generation": text,
                **grade_example(text, ex.response),
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


# ----------------------------------------------------------------------------- the stage


def _looks_local(data: str) -> bool:
    """Whether `data` names a local file or directory rather than a hub dataset (`openai/gsm8k`): it exists, has
    a data-file extension, starts like a path (".", "/", "~"), or has a parent directory that exists."""
    p = Path(data).expanduser()
    if p.exists() or p.suffix.lower() in FILE_READERS or data.startswith((".", "/", "~")):
        return True
    return len(p.parts) > 1 and p.parent.is_dir()


@dataclass
class EvalConfig:
    """Evaluate a causal LM on math problems: greedy decoding, answer extraction, accuracy."""

    model: str = "runs/train/model"
    """HF checkpoint directory or hub id holding the model and its tokenizer; `preset:NAME` or
    `embedded:demo-base` as in train."""
    data: str = "runs/demo/data/test.jsonl"
    """Evaluation examples (any file `load_examples` reads); the gold answer is extracted from each response."""
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
    """Weights dtype: float32, bfloat16, float16, auto; default: the loader's default."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        # Refused here, before any data or model is loaded: `--limit -1` once evaluated 49 of 50.
        checks.positive("max_new_tokens", self.max_new_tokens)
        checks.positive("batch_size", self.batch_size)
        checks.positive("limit", self.limit, optional=True)
        checks.positive("max_prompt_length", self.max_prompt_length, optional=True)
        checks.one_of("dtype", self.dtype, (*DTYPES, None))
        if not self.data or _looks_local(self.data):
            checks.existing_path("data", self.data)


def _records_jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(rundir.to_jsonable(r), ensure_ascii=False) + "\n" for r in records)


def run(cfg: EvalConfig) -> dict:
    """Load the model and the data, evaluate, write out/predictions.jsonl and out/metrics.json."""
    import os

    from datalever.examples import load_examples
    from datalever.models import load_model, load_tokenizer, resolve_model

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Launched with torchrun/accelerate: the process state already set up (e.g. by training in
        # this process, CPU or GPU) is reused as it is; PartialState() does not reconfigure it.
        from accelerate import PartialState

        accelerator = PartialState()
        device = accelerator.device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    examples = list(load_examples(cfg.data))
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    model_path = resolve_model(cfg.model, seed=cfg.seed)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=cfg.dtype).to(device)
    metrics, records = evaluate_examples(
        model,
        tokenizer,
        examples,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        difficulty_keys=cfg.difficulty_keys,
        accelerator=accelerator,
        max_prompt_length=cfg.max_prompt_length,
        progress=cfg.progress,
    )
    if accelerator is None or accelerator.is_main_process:
        out = rundir.EvalDir(cfg.out)
        rundir.record_provenance(
            out.root, "evaluate", cfg, data_fingerprint=rundir.fingerprint(examples), n_examples=len(examples)
        )
        rundir.atomic_write_text(out.predictions, _records_jsonl(records))
        rundir.write_json(out.metrics, metrics)  # last: its presence marks a finished evaluation
    if accelerator is not None:
        accelerator.wait_for_everyone()
    log.info(
        "accuracy %.4f on %d examples (%d without an answer, %d without an answer marker, %d ungradable)",
        metrics["accuracy"] or 0.0,
        metrics["n"],
        metrics["n_no_answer"],
        metrics["n_no_marker"],
        metrics["n_ungradable"],
    )
    return metrics
