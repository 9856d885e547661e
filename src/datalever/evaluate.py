"""Evaluate a causal LM on math word problems: greedy generation, answer extraction, accuracy.

The pipeline, one function each:

- `generation.generations` (generation.py): batched greedy decoding of each example's prompt, which rows the cap cut.
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
from typing import Any, Sequence

import torch

from datalever import checks, generation, provenance, rundir
from datalever.answers import ERROR, GRADED, MARKERS, TIMEOUT, find_answer, grade, is_program
from datalever.examples import DIFFICULTY_KEYS, NO_SOURCE, DataFormat, local_data, read_data
from datalever.generation import CACHES, GenerationOptions
from datalever.models import DTYPES
from datalever.provenance import Classified
from datalever.tokens import Formatter, check_chat_template

log = logging.getLogger(__name__)

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
    outputs = generation.generations(model, tokenizer, prompts, options=options)
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
