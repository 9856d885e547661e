"""The pretraining corpus is deterministic, its arithmetic is right, it holds no word problems,
and a few-step run writes a loadable HF checkpoint."""

import json
import re
from fractions import Fraction

import pytest
import torch

from datalever import pretrain

EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")


def _evaluate(expr: str) -> Fraction:
    """Left to right, as the worked answers read (chains use only * and /)."""
    tokens = expr.split()
    value = Fraction(int(tokens[0]))
    for op, b in zip(tokens[1::2], map(int, tokens[2::2])):
        value = {"+": lambda: value + b, "-": lambda: value - b, "*": lambda: value * b, "/": lambda: value / b}[op]()
    return value


def test_corpus_is_deterministic_by_seed():
    assert pretrain.corpus(200, seed=3) == pretrain.corpus(200, seed=3)
    assert pretrain.corpus(200, seed=3) != pretrain.corpus(200, seed=4)


def test_every_equation_is_right():
    docs = pretrain.corpus(3000, seed=0)
    found = 0
    for doc in docs:
        for expr, result in EQUATION.findall(doc):
            value = _evaluate(expr)
            assert value.denominator == 1 and value >= 0 and value == int(result), (expr, result)
            found += 1
    assert found > 3000
    chains = [e for d in docs for e, _ in EQUATION.findall(d) if e.endswith("/ 100")]
    assert chains, "percentages (a * p / 100) are drilled"


def test_chained_drills_start_from_the_last_result():
    chained = 0
    for doc in pretrain.corpus(2000, seed=1, mix={"arith": 1.0}):
        lines = [EQUATION.fullmatch(line).groups() for line in doc.split("\n")]
        chained += sum(int(lines[i][0].split()[0]) == int(lines[i - 1][1]) for i in range(1, len(lines)))
    assert chained > 1000


def test_context_kinds_use_the_context():
    for doc in pretrain.corpus(300, seed=2, mix={"copy": 1.0}):
        context, last = doc.split("\n")
        assert last in context
    for doc in pretrain.corpus(300, seed=2, mix={"use": 1.0}):
        context, last = doc.split("\n")
        names, expr = last.rstrip(".").split(": ")
        operands = expr.split(" = ")[0].split()[::2]
        for name, n in zip(names.split(" ")[::2], operands):
            assert re.search(rf"\b{name} \w+ {n} ", context), (name, n, doc)


def test_corpus_holds_no_word_problems():
    text = "\n".join(pretrain.corpus(3000, seed=0))
    assert "####" not in text and "Question" not in text and "Answer" not in text and "?" not in text


def test_bad_mix_is_refused():
    with pytest.raises(ValueError, match="mix"):
        pretrain.corpus(1, seed=0, mix={"poems": 1.0})


def test_packed_batches_are_full_rows_joined_by_eos():
    from datalever.models import build_tokenizer

    tok = build_tokenizer(512)
    batches = pretrain.packed_batches(tok, seed=0, mix=pretrain.PretrainConfig().mix, batch_size=2, seq_len=64)
    first, second = next(batches), next(batches)
    assert first.shape == second.shape == (2, 64)
    assert (first == tok.eos_token_id).any()
    assert not torch.equal(first, second)


def test_run_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = pretrain.PretrainConfig(
        out=str(tmp_path / "base"), preset="tiny", steps=3, batch_size=2, seq_len=32, warmup_steps=1, log_every=0
    )
    path = pretrain.run(cfg)
    assert path == cfg.out and not (tmp_path / "base.tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("12 + 30 =", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size
    record = json.loads((tmp_path / "base" / "pretrain.json").read_text())
    assert record["config"]["steps"] == 3 and record["command"].startswith("python -m datalever.pretrain")
    again = pretrain.run(cfg)  # same seed, same weights
    model2 = AutoModelForCausalLM.from_pretrained(again)
    for (_, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b)
