"""Pretrain a small base model on generic skills, so that fine-tuning starts from something.

The paper fine-tunes *pretrained* base LMs. A preset built from random weights cannot play that
part: fine-tuned on 2000 word problems it learns the answer format but never learns to copy the
question's numbers or to add them. This module makes the analog of a base model: `preset:demo`
trained with plain next-token loss on a generated corpus of generic skills that is *not* the
fine-tuning task:

* ``arith``:   drills in the exact surface form of the worked answers, "47 + 38 = 85",
               "6 * 14 = 84", "96 / 8 = 12", "120 * 25 / 100 = 30", over the operand ranges the
               word problems use; some drills chain (the next line starts from the last result).
* ``copy``:    a few sentences stating names and numbers, then one of them restated, which
               teaches looking a number up in the context ("Ava has 23 pens. Ben has 7 pens.\\nBen
               has 7 pens.").
* ``use``:     the same kind of context, then an equation whose operands are numbers from it
               ("Ava has 23 pens. Ben has 7 pens.\\nAva and Ben: 23 + 7 = 30.").

No document is a word problem: no question, no "Question:/Answer:" template, no "####" line.
Documents are joined with EOS and packed into fixed-length rows (no padding). Everything random
goes through one `random.Random(seed)` and `torch.manual_seed(seed)`, so a run is repeatable on CPU.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Iterator

import torch

from datalever import synth

KINDS = ("arith", "copy", "use")
_PERCENTS = (5, 10, 15, 20, 25, 30, 40, 50, 60, 75)
_VERBS = ("has", "had", "owns", "keeps", "collected", "bought", "found")


@dataclass
class PretrainConfig:
    """Pretrain a small base model on generic arithmetic and copy skills (not the fine-tuning task)."""

    out: str = "runs/pretrain/demo-base"
    """Output HF checkpoint directory (written atomically: a temporary directory, then a rename)."""
    preset: str = "demo"
    """Model preset to start from (random weights, see datalever.models.PRESETS)."""
    steps: int = 1500
    """Optimizer steps."""
    batch_size: int = 16
    """Packed rows per step."""
    seq_len: int = 256
    """Tokens per packed row (documents are joined with EOS and cut into rows of this length)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    warmup_steps: int = 100
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    max_grad_norm: float = 1.0
    """Clip the gradient to this global norm."""
    mix: dict[str, float] = field(default_factory=lambda: {"arith": 0.5, "copy": 0.2, "use": 0.3})
    """Shares of the document kinds: arith (equation drills), copy (restate a fact), use (equation on facts)."""
    seed: int = 0
    """Seed for the weights and the corpus."""
    threads: int = 1
    """torch.set_num_threads for the run (0: leave torch's default)."""
    log_every: int = 100
    """Print the mean training loss every this many steps (0: never)."""


# ----------------------------------------------------------------------------- the corpus


def _number(rng: random.Random) -> int:
    """An operand: mostly two digits, as in the word problems, with one- and three-digit ones."""
    r = rng.random()
    if r < 0.2:
        return rng.randint(1, 9)
    if r < 0.8:
        return rng.randint(10, 99)
    return rng.randint(100, 999)


def _equation(rng: random.Random, first: int | None = None) -> tuple[str, int]:
    """One drill "a op b = c" (or "a * b / 100 = c"), exact and non-negative; `first` fixes a
    (a chained drill), falling back to "+" where no exact division or percentage of it exists."""
    a = _number(rng) if first is None else first
    op = rng.choice("+-*/%")
    if op == "/":
        if first is None:
            d = rng.choice([rng.randint(2, 12), rng.randint(2, 50)])
            a = d * _number(rng)
        else:
            divisors = [d for d in range(2, 51) if a % d == 0 and a > 0]
            d = rng.choice(divisors) if divisors else None
        terms = [a, "/", d] if d else None
    elif op == "%":  # a percentage, as the answers write it: a * p / 100
        if first is None:
            p = rng.choice(_PERCENTS)
            unit = 100 // math.gcd(100, p)  # a must be a multiple of this for an exact result
            a = unit * max(1, a // unit)
        else:
            fits = [p for p in _PERCENTS if a * p % 100 == 0 and a > 0]
            p = rng.choice(fits) if fits else None
        terms = [a, "*", p, "/", 100] if p else None
    elif op == "-":
        b = _number(rng)
        if b > a:
            a, b = (a, rng.randint(0, a)) if first is not None else (b, a)
        terms = [a, "-", b]
    elif op == "*":
        small = rng.randint(2, 12) if rng.random() < 0.6 else rng.randint(2, 40)
        terms = [small, "*", a] if first is None and rng.random() < 0.5 else [a, "*", small]
    else:
        terms = None
    terms = terms or [a, "+", _number(rng)]
    value = Fraction(terms[0])
    for o, b in zip(terms[1::2], terms[2::2]):
        if o == "+":
            value += b
        elif o == "-":
            value -= b
        elif o == "*":
            value *= b
        else:
            value /= b
    assert value.denominator == 1 and value >= 0, terms
    return " ".join(map(str, terms)) + f" = {int(value)}", int(value)


def _arith_doc(rng: random.Random) -> str:
    lines, last = [], None
    for _ in range(rng.randint(3, 6)):
        chain = last is not None and last <= 9999 and rng.random() < 0.4
        line, last = _equation(rng, last if chain else None)
        lines.append(line)
    return "\n".join(lines)


def _facts(rng: random.Random) -> list[tuple[str, int, str]]:
    """2-4 (name, number, object) facts with distinct names."""
    names = rng.sample(synth.FEMALE + synth.MALE, rng.randint(2, 4))
    shared = rng.choice(synth.OBJECTS)
    return [(n, _number(rng), shared if rng.random() < 0.7 else rng.choice(synth.OBJECTS)) for n in names]


def _sentence(rng: random.Random, name: str, n: int, obj: str) -> str:
    return f"{name} {rng.choice(_VERBS)} {n} {obj}."


def _copy_doc(rng: random.Random) -> str:
    facts = _facts(rng)
    sentences = [_sentence(rng, *f) for f in facts]
    i = rng.randrange(len(facts))
    return " ".join(sentences) + "\n" + sentences[i]


def _use_doc(rng: random.Random) -> str:
    facts = _facts(rng)
    (na, a, _), (nb, b, _) = rng.sample(facts, 2)
    op = rng.choice("+-*")
    if op == "-" and b > a:
        (na, a), (nb, b) = (nb, b), (na, a)
    if op == "*":
        b = rng.randint(2, 12)
        facts = [(n, b if n == nb else x, o) for n, x, o in facts]
    c = a + b if op == "+" else a - b if op == "-" else a * b
    word = {"+": "and", "-": "minus", "*": "times"}[op]
    return " ".join(_sentence(rng, *f) for f in facts) + f"\n{na} {word} {nb}: {a} {op} {b} = {c}."


_MAKERS = {"arith": _arith_doc, "copy": _copy_doc, "use": _use_doc}


def documents(seed: int, mix: dict[str, float] | None = None) -> Iterator[str]:
    """An endless, seeded stream of corpus documents (plain text, no EOS)."""
    mix = mix or PretrainConfig().mix
    unknown = set(mix) - set(KINDS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"mix must give non-negative shares of {KINDS}, got {mix}")
    rng = random.Random(f"pretrain:{seed}")
    kinds, weights = zip(*mix.items())
    while True:
        yield _MAKERS[rng.choices(kinds, weights)[0]](rng)


def corpus(n: int, seed: int, mix: dict[str, float] | None = None) -> list[str]:
    """The first n documents of `documents(seed, mix)`."""
    stream = documents(seed, mix)
    return [next(stream) for _ in range(n)]


def packed_batches(
    tokenizer, seed: int, mix: dict[str, float], batch_size: int, seq_len: int
) -> Iterator[torch.Tensor]:
    """Endless (batch_size, seq_len) batches of token ids: documents joined by EOS, cut into rows."""
    stream, buf, need = documents(seed, mix), [], batch_size * seq_len
    while True:
        while len(buf) < need:
            docs = [next(stream) for _ in range(256)]
            for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
                buf.extend(ids + [tokenizer.eos_token_id])
        yield torch.tensor(buf[:need]).view(batch_size, seq_len)
        buf = buf[need:]


# ----------------------------------------------------------------------------- training


def run(cfg: PretrainConfig) -> str:
    """Build the preset, train it on the corpus, save an HF checkpoint at cfg.out; returns the path."""
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: PretrainConfig) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datalever.models import resolve_model
    from datalever.optim import OptimConfig, build_optimizer, lr_factor, set_lr
    from datalever.rundir import ModelDir, atomic_dir, to_jsonable

    preset = resolve_model(f"preset:{cfg.preset}", seed=cfg.seed)  # random weights + tokenizer
    model = AutoModelForCausalLM.from_pretrained(preset)
    tokenizer = AutoTokenizer.from_pretrained(preset)
    torch.manual_seed(cfg.seed)
    opt = build_optimizer(model, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)))
    batches = packed_batches(tokenizer, cfg.seed, cfg.mix, cfg.batch_size, cfg.seq_len)

    model.train()
    start, running, losses = time.time(), 0.0, []
    for step in range(cfg.steps):
        set_lr(opt, lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        running += loss.item()
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            losses.append(round(running / cfg.log_every, 4))
            running = 0.0
            print(
                f"step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} {time.time() - start:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    wall = time.time() - start

    record = {
        "config": to_jsonable(asdict(cfg)),
        "wall_s": round(wall, 1),
        "loss_every_log": losses,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "command": "python -m datalever.pretrain "
        + " ".join(f"--{k} '{json.dumps(v)}'" if isinstance(v, dict) else f"--{k} {v}" for k, v in asdict(cfg).items()),
    }
    with atomic_dir(cfg.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ModelDir(tmp).pretrain_record.write_text(json.dumps(record, indent=2) + "\n")
    return cfg.out


if __name__ == "__main__":
    import jsonargparse

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    print(run(jsonargparse.CLI(PretrainConfig, as_positional=False)))
