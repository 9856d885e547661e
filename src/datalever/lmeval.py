"""A saved model evaluated by lm-evaluation-harness itself, on a local copy of a test set, offline.

datalever's own evaluation (evaluate.py) asks each test problem as the arm was trained to read it and grades the
answer by value; published numbers come from lm-evaluation-harness (lm-eval), with its own prompts, few-shot
examples, stop sequences and extraction. `run` gives a user the second number beside the first: lm-eval's HF model
on the arm's saved model directory, on the same test problems, through a task that lm-eval loads from a directory
of ours (its `include_path`), never from the hub.

The task is lm-eval's own, included whole (`include:` its YAML in the installed package), with only the data it
reads replaced:

- gsm8k-style tests (answers after `####`) mirror lm-eval's `gsm8k` (tasks/gsm8k/gsm8k.yaml, version 3.0 in
  lm-eval 0.4.13): prompt "Question: {question}\\nAnswer:", greedy, stops at "Question:", "</s>", "<|im_end|>";
  `strict-match` takes the first `#### (\\-?[0-9\\.\\,]+)`, `flexible-extract` the last number
  (`(-?[$0-9.,]{2,})|(-?[0-9]+)`); both compared by exact match after removing commas, "$", everything up to
  "#### " and a final "." (case ignored). lm-eval draws 5 few-shot examples from GSM8K's train split: here from
  the GSM8K-style examples given (`fewshot`: a local copy of that split, or `openai/gsm8k:main` where the hub or
  its cache is reachable), else the test is asked zero-shot.
- MATH-style tests (answers in `\\boxed{}`) mirror lm-eval's `minerva_math` (tasks/minerva_math/
  minerva_math_algebra.yaml, version 3.1, as `minerva_math500` applies it to MATH-500): prompt
  "Problem:\\n{problem}\\n\\nSolution:", Minerva's 4 fixed few-shot examples (they ship with lm-eval: offline),
  stops at "Problem:"; `exact_match` compares the normalized "Final Answer: The final answer is ..." with the
  gold's last `\\boxed{}` (sympy), `math_verify` compares the whole generation with the gold solution
  (math-verify). On the full MATH test set one task over all 5,000 problems gives what lm-eval's `minerva_math`
  group reports (its subject tasks' mean weighted by size).

What changes to read local files: `dataset_path: json` with `dataset_kwargs.data_files` naming the documents
written here (the test set's questions and gold solutions in the task's own columns: question/answer, or
problem/solution), `dataset_name` none, the few-shot split local or none. Nothing else: prompt, few-shot format,
generation settings, filters and metrics are lm-eval's. The questions come from the datalever test file: its
prompts were rendered with a template (`Question: {question}\\nAnswer:\\n`, an Alpaca template, ...) and `run`
takes the question back out of each prompt by matching the templates it is given, then datalever's defaults; a
conversation's question is its last user turn.

Why lm-eval's number and datalever's can differ: extraction (lm-eval's gsm8k strict match needs "#### N" and
its flexible match takes the last number written, even one the model wrote after its answer; datalever takes the
first `####` or "the answer is", else the last `\\boxed{}`, else the last value, and compares values: `1,234` =
`1234.0`, `1/2` = `0.5`), and prompts (lm-eval's "Question: ... Answer:" with its few-shot examples, where the arm
was trained and is asked by datalever in its own training format, e.g. MathInstruct's Alpaca prompt, zero-shot).

lm-eval is an optional extra (`pip install 'datalever[lm-eval]'`), imported only inside `run`. The command
`datalever lm-eval` (`LmEvalConfig`) runs it on any model and test set; an experiment with `lm_eval: true` on every
arm's saved model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from dataclasses import dataclass, field
from typing import Sequence

import yaml

from datalever import checks, rundir
from datalever.examples import DEFAULT_TEMPLATES, Example, local_data, read_data
from datalever.rundir import EvalDir

log = logging.getLogger(__name__)

INSTALL_HINT = "lm-eval is not installed: pip install 'datalever[lm-eval]'"
MAX_GEN_TOKS = 256  # lm-eval's HF model's default cap on generated tokens (its `max_gen_toks`)
KINDS = ("auto", "gsm8k", "math")


@dataclass(frozen=True)
class Task:
    """How a kind of test set is asked and scored in lm-eval: the task mirrored and its documents' columns."""

    mirrors: str  # the lm-eval task
    yaml: tuple[str, ...]  # its YAML, in lm-eval's tasks/ directory
    question: str  # the document column holding the question
    answer: str  # ... and the gold solution
    scores: tuple[tuple[str, str], ...]  # (name here, lm-eval's "metric,filter" key)
    fewshot_from_split: bool  # whether lm-eval draws its few-shot examples from a split (else fixed ones)


TASKS = {
    "gsm8k": Task(
        mirrors="gsm8k",
        yaml=("gsm8k", "gsm8k.yaml"),
        question="question",
        answer="answer",
        scores=(("strict-match", "exact_match,strict-match"), ("flexible-extract", "exact_match,flexible-extract")),
        fewshot_from_split=True,
    ),
    "math": Task(
        mirrors="minerva_math",
        yaml=("minerva_math", "minerva_math_algebra.yaml"),
        question="problem",
        answer="solution",
        scores=(("exact_match", "exact_match,none"), ("math_verify", "math_verify,none")),
        fewshot_from_split=False,
    ),
}


def detect_kind(examples: Sequence[Example]) -> str:
    """gsm8k when most gold responses state their answer after `####`, math when most box it (`\\boxed{}`)."""
    hashes = sum("####" in ex.response for ex in examples)
    boxed = sum("\\boxed" in ex.response for ex in examples)
    if max(hashes, boxed) * 2 <= len(examples):
        raise ValueError(
            f"cannot tell the kind of this test set: of {len(examples)} gold responses {hashes} have '####' and "
            f"{boxed} '\\boxed'; lm-eval's gsm8k needs '#### N', its minerva_math a \\boxed answer"
        )
    return "gsm8k" if hashes >= boxed else "math"


def _template_pattern(template: str) -> re.Pattern | None:
    """A regex matching what `template` renders, its one field as a group; None for templates of another shape
    (several fields, or nothing but the field: those would match any prompt)."""
    parts = list(string.Formatter().parse(template))
    fields = [f for _, f, _, _ in parts if f is not None]
    if len(fields) != 1 or not template.replace("{" + fields[0] + "}", "").strip():
        return None
    regex = "".join(re.escape(literal) + ("(.*)" if f is not None else "") for literal, f, _, _ in parts)
    return re.compile(regex, re.DOTALL)


def question_of(ex: Example, templates: Sequence[str]) -> str:
    """The question an example's prompt was rendered from: its last user turn (a conversation), else the field of
    the first template that renders exactly its prompt (`templates`, then datalever's defaults)."""
    if ex.messages is not None:
        return next(content for role, content in reversed(ex.messages) if role == "user")
    tried = [t for t in dict.fromkeys([*templates, *DEFAULT_TEMPLATES.values()]) if _template_pattern(t)]
    for template in tried:
        m = _template_pattern(template).fullmatch(ex.prompt)
        if m:
            return m.group(1).strip()
    raise ValueError(
        f"example {ex.id}: its prompt {ex.prompt[:80]!r} matches none of the templates tried "
        f"({', '.join(map(repr, tried))}); give the template the test set was rendered with"
    )


def _documents(examples: Sequence[Example], task: Task, templates: Sequence[str]) -> list[dict]:
    docs = [{task.question: question_of(ex, templates), task.answer: ex.response, "id": ex.id} for ex in examples]
    marker = "####" if task.mirrors == "gsm8k" else "\\boxed"
    missing = [ex.id for ex in examples if marker not in ex.response]
    if missing:
        raise ValueError(
            f"{len(missing)} gold responses lack {marker!r}, which lm-eval's {task.mirrors} reads the gold answer "
            f"from (first: {missing[0]})"
        )
    return docs


def _lm_eval_task_yaml(task: Task) -> str:
    """lm-eval's own YAML of the task mirrored, in the installed package (not a run-directory path)."""
    import lm_eval.tasks

    path = os.path.join(os.path.dirname(lm_eval.tasks.__file__), *task.yaml)
    if not os.path.isfile(path):
        raise RuntimeError(f"this lm-eval has no {'/'.join(task.yaml)}: datalever mirrors lm-eval 0.4.13's tasks")
    return path


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)


def _write_task(work: rundir.LmEvalDir, name: str, task: Task, docs: list[dict], shots: list[dict] | None) -> None:
    """The task directory lm-eval's TaskManager reads: lm-eval's YAML included, its data replaced by local files."""
    work.root.mkdir(parents=True, exist_ok=True)  # every process of a torchrun writes the same files, atomically
    data_files = {"test": str(work.docs)}
    rundir.atomic_write_text(work.docs, _jsonl(docs))
    config = {
        "include": _lm_eval_task_yaml(task),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "training_split": None,
        "test_split": "test",
    }
    if task.fewshot_from_split:
        config["fewshot_split"] = None
        if shots:
            data_files["train"] = str(work.fewshot_docs)
            rundir.atomic_write_text(work.fewshot_docs, _jsonl(shots))
            config.update(training_split="train", fewshot_split="train")
    config["dataset_kwargs"] = {"data_files": data_files}
    rundir.atomic_write_text(work.task(name), yaml.safe_dump(config, sort_keys=False))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(
    model: str,
    data: str,
    out: str | os.PathLike,
    *,
    kind: str = "auto",
    templates: Sequence[str] = (),
    fewshot: str | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int = MAX_GEN_TOKS,
    batch_size: int = 16,
    limit: int | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Evaluate the HF model directory `model` with lm-eval on the test set `data` (a datalever file, as the
    experiment writes into RUN/data/, or any data datalever reads); write `EvalDir(out).lm_eval` and return it.

    kind: gsm8k | math | auto (from the gold responses: `####` or `\\boxed`). templates: the templates the test
    prompts may have been rendered with (the question is taken back out of each prompt; datalever's defaults are
    tried after them). fewshot: GSM8K-style examples for gsm8k's few-shot examples (lm-eval draws them from
    GSM8K's train split: a local copy, or `openai/gsm8k:main`, whose train split is read); num_fewshot: default
    lm-eval's (gsm8k 5 with `fewshot`, else 0; math 4).
    max_gen_toks: lm-eval's default (256) unless given. dtype: default bfloat16 on a GPU that supports it, else the
    checkpoint's. The JSON holds lm-eval's accuracies (gsm8k: strict-match and flexible-extract; math:
    exact_match and math_verify), their standard errors, the settings and lm-eval's version; the per-sample log
    is `EvalDir(out).lm_eval_work.samples`. Under torchrun every process calls it: lm-eval shares the documents
    among them, and the first process writes the results (the others return {}).
    """
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    examples = read_data(str(data), default_split="test")
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{data}: no examples to evaluate")
    kind = detect_kind(examples) if kind == "auto" else kind
    task = TASKS[kind]
    shots = None
    if fewshot is not None:
        if not task.fewshot_from_split:
            raise ValueError(f"lm-eval's {task.mirrors} asks with its own fixed few-shot examples: give no fewshot")
        shots = _documents(read_data(fewshot, default_split="train"), task, templates)
    if task.fewshot_from_split and not shots:
        if num_fewshot:
            raise ValueError(f"num_fewshot={num_fewshot} needs few-shot examples: give fewshot")
        num_fewshot = 0
    out = EvalDir(out)
    name = f"datalever_{task.mirrors}"
    _write_task(out.lm_eval_work, name, task, _documents(examples, task, templates), shots)

    import torch

    from datalever.evaluate import eval_dtype

    device = _device()
    model_args = {"pretrained": str(model), "dtype": eval_dtype(dtype, torch.device(device)) or "auto"}
    if trust_remote_code:
        model_args["trust_remote_code"] = True
    results = simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[name],
        task_manager=TaskManager(include_path=str(out.lm_eval_work.root), include_defaults=False),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        gen_kwargs={"max_gen_toks": max_gen_toks},
        log_samples=True,
    )
    if results is None:
        return {}  # a process other than the first under torchrun: lm-eval gave the first process everything
    scores = results["results"][name]
    samples = results["samples"][name]
    rundir.atomic_write_text(out.lm_eval_work.samples, _jsonl(samples))
    config = results["configs"][name]
    found = {
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "task": task.mirrors,
        "task_version": (config.get("metadata") or {}).get("version"),
        "kind": kind,
        "n": len(examples),
        "num_fewshot": results.get("n-shot", {}).get(name, config.get("num_fewshot")),
        "fewshot": str(fewshot) if shots else None,
        "max_gen_toks": max_gen_toks,
        "accuracy": {short: scores[key] for short, key in task.scores},
        "stderr": {short: scores.get(key.replace(",", "_stderr,", 1)) for short, key in task.scores},
        "model": str(model),
        "data": str(data),
        "prompt": samples[0]["arguments"][0][0] if samples else None,
    }
    rundir.write_json(out.lm_eval, found)  # last: its presence marks a finished lm-eval run
    log.info(
        "lm-eval %s (%s-shot) on %d examples: %s",
        task.mirrors,
        found["num_fewshot"],
        found["n"],
        ", ".join(f"{k} {v:.4f}" for k, v in found["accuracy"].items()),
    )
    return found


def require_lm_eval(option: str) -> None:
    """A ConfigError naming `option` and the extra to install when lm-eval is missing (said before any work)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise checks.ConfigError(f"{option}: {INSTALL_HINT}")


@dataclass
class LmEvalConfig:
    """Evaluate a model with lm-evaluation-harness itself on a local test set, offline (its gsm8k or minerva_math
    task over local files): numbers comparable with published lm-eval results."""

    model: str = "runs/train/model"
    """HF checkpoint directory (an arm's train/model), or `preset:NAME` / `embedded:demo-base`."""
    data: str | None = None
    """Test examples: a datalever file (an experiment's RUN/data/test*.jsonl) or any local data datalever reads;
    required."""
    out: str = "runs/eval"
    """Output directory: lm_eval.json (accuracies, settings, lm-eval's version) and lm_eval/ (the task directory
    given to lm-eval and its per-sample log)."""
    kind: str = "auto"
    """gsm8k (answers after ####: lm-eval's gsm8k) | math (\\boxed answers: its minerva_math) | auto (from the gold
    answers)."""
    templates: list[str] = field(default_factory=list)
    """Templates the test prompts may have been rendered with (the question is taken back out of each prompt), e.g.
    the Alpaca template of a run's test_templates; datalever's default templates are tried after them."""
    fewshot: str | None = None
    """gsm8k: GSM8K-style examples to draw lm-eval's few-shot examples from (lm-eval draws 5 from GSM8K's train
    split: a local copy, or `openai/gsm8k:main` where the hub or its cache is reachable); without it, zero-shot.
    math: none (Minerva's 4 fixed examples ship with lm-eval)."""
    num_fewshot: int | None = None
    """Few-shot examples per question; default lm-eval's (gsm8k 5 with `fewshot`, else 0; math 4)."""
    max_gen_toks: int = MAX_GEN_TOKS
    """Most tokens generated per question (lm-eval's default 256)."""
    batch_size: int = 16
    """Questions per generation batch."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    dtype: str | None = None
    """Weights dtype (float32, bfloat16, float16, auto); default bfloat16 on a GPU that supports it, else the
    checkpoint's."""
    trust_remote_code: bool = False
    """Allow custom model code from the checkpoint (only for checkpoints you trust)."""

    def __post_init__(self) -> None:
        checks.one_of("kind", self.kind, KINDS)
        checks.positive("max_gen_toks", self.max_gen_toks)
        checks.positive("batch_size", self.batch_size)
        checks.positive("limit", self.limit, optional=True)
        checks.non_negative("num_fewshot", self.num_fewshot, optional=True)
        if self.data is None:
            raise checks.ConfigError("data is required: the test examples (--data FILE)")
        local_data("data", self.data)
        local_data("fewshot", self.fewshot, optional=True)
        require_lm_eval("lm-eval")


def run_command(cfg: LmEvalConfig) -> dict:
    """`datalever lm-eval`: `run` with the command's options (the model spec resolved as every stage does)."""
    from datalever.models import resolve_model

    return run(
        resolve_model(cfg.model),
        cfg.data,
        cfg.out,
        kind=cfg.kind,
        templates=cfg.templates,
        fewshot=cfg.fewshot,
        num_fewshot=cfg.num_fewshot,
        max_gen_toks=cfg.max_gen_toks,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
