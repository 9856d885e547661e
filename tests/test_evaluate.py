"""Tests of the evaluation stage: batched greedy generation, metrics, the eval command."""

import copy
import dataclasses
import json

import pytest
import torch

from datalever import evaluate as ev
from datalever import generation
from datalever.answers import Grade
from datalever.checks import ConfigError
from datalever.evaluate import EvalConfig, compute_metrics, evaluate_examples
from datalever.examples import NO_SOURCE, Example
from datalever.generation import (
    Generation,
    GenerationOptions,
    cut_at_stop,
    encode_prompts,
    generate,
    generate_ids,
    length_sorted_batches,
    stop_triggers,
    supports_static_cache,
)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datalever.models import build_preset, load_model, load_tokenizer

    path = build_preset("tiny", tmp_path_factory.mktemp("eval") / "m", seed=0)
    return load_model(str(path)), load_tokenizer(str(path)), path


PROMPTS = [
    "Question: What is 2+2?\nAnswer:\n",
    "x",
    "Question: Tom has 3 apples and buys 4 more at the store, then gives half of them to his sister. "
    "How many apples does he have now?\nAnswer:\n",
    "Question: 17 birds sit on a wire.\nAnswer:\n",
    "Question: A train leaves at 3 pm.\nAnswer:\n",
]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tok, _ = tiny
    lengths = {len(ids) for ids in encode_prompts(tok, PROMPTS)}
    assert len(lengths) >= 4  # really different lengths, so really padded
    batched = generate_ids(model, tok, PROMPTS, GenerationOptions(max_new_tokens=10, batch_size=3, progress=False))
    single = [
        generate_ids(model, tok, [p], GenerationOptions(max_new_tokens=10, batch_size=1, progress=False))[0]
        for p in PROMPTS
    ]
    assert batched == single
    assert sum(map(len, batched)) > 0
    assert all(len(ids) <= 10 for ids in batched)
    texts = generate(model, tok, PROMPTS, GenerationOptions(max_new_tokens=10, batch_size=4, progress=False))
    assert texts == tok.batch_decode(batched, skip_special_tokens=True)
    model.train()
    generate_ids(model, tok, PROMPTS[:1], GenerationOptions(max_new_tokens=2, progress=False))
    assert model.training  # the mode is restored after generation
    model.eval()


def test_each_row_stops_at_its_own_eos(tiny):
    model, tok, _ = tiny
    free = generate_ids(model, tok, PROMPTS, GenerationOptions(max_new_tokens=10, batch_size=8, progress=False))
    row = max(range(len(free)), key=lambda i: len(free[i]))
    stop_token = free[row][3]  # pretend this token is an EOS
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_token]
    try:
        stopped = generate_ids(model, tok, PROMPTS, GenerationOptions(max_new_tokens=10, batch_size=8, progress=False))
    finally:
        model.generation_config.eos_token_id = old
    for before, after in zip(free, stopped):
        cut = before.index(stop_token) if stop_token in before else len(before)
        assert after == before[:cut]  # rows that did not stop continue unchanged
    assert len(stopped[row]) <= 3


class _CharTokenizer:
    """Token i is the character chr(i): hand-made generations decode to what they spell."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(map(chr, row)) for row in rows]


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_generations_say_which_the_cap_cut(monkeypatch):
    """Hand-made token rows as generate_ids returns them (EOS and end of turn already removed), cap 5."""
    rows = {
        "capped": _ids("12345"),  # 5 tokens, no end: cut
        "eos at the cap": _ids("1234"),  # its 5th token was EOS (removed): ended on its own
        "eos early": _ids("12"),
        "stop at the cap": _ids("123Q:"),  # the stop string arrived with the 5th token: ended on its own
        "stop early": _ids("1Q:"),
    }
    monkeypatch.setattr(generation, "generate_ids", lambda model, tok, prompts, options: [rows[p] for p in prompts])
    out = generation.generations(None, _CharTokenizer(), list(rows), GenerationOptions(max_new_tokens=5, stop=["Q:"]))
    assert [g.cut for g in out] == [True, False, False, False, False]
    assert [g.text for g in out] == ["12345", "1234", "12", "123", "1"]
    # without stop strings, a full row is cut whatever it spells
    out = generation.generations(None, _CharTokenizer(), ["stop at the cap"], GenerationOptions(max_new_tokens=5))
    assert out == [Generation("123Q:", True)]
    assert not generation.reached_cap(_ids("12345"), "12345", GenerationOptions(max_new_tokens=6))


def test_a_real_model_cut_at_the_cap_ended_by_eos_or_by_a_stop_string(tiny):
    model, tok, _ = tiny
    options = GenerationOptions(max_new_tokens=8, batch_size=8, progress=False)
    free = generate_ids(model, tok, PROMPTS, options)
    assert all(len(row) == 8 for row in free)  # the random tiny model never says EOS this early
    assert [g.cut for g in generation.generations(model, tok, PROMPTS, options)] == [True] * len(PROMPTS)
    # the third token made an EOS: every row holding it ends there, on its own
    eos_like = free[0][2]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, eos_like]
    try:
        ended = generation.generations(model, tok, PROMPTS, options)
    finally:
        model.generation_config.eos_token_id = old
    assert ended[0].cut is False
    assert [g.cut for g in ended] == [eos_like not in row for row in free]
    # a stop string that the first row completes with its last token: that row ended on its own
    whole = tok.decode(free[0], skip_special_tokens=True)
    stop = whole[-3:].strip() or whole.strip()
    assert stop and all(stop not in tok.decode(row[:-1], skip_special_tokens=True) for row in free[:1])
    stopped = generation.generations(model, tok, PROMPTS[:1], dataclasses.replace(options, stop=[stop]))
    assert stopped[0].cut is False and stopped[0].text == cut_at_stop(whole, [stop])


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3", "tiny-gemma3"])
def family(request):
    """A tiny preset of each family whose cache differs: Llama, Qwen3 (q/k norms), Gemma 3 (sliding-window layers)."""
    from datalever.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(f"preset:{request.param}", seed=0)
    return load_model(path).eval(), load_tokenizer(path)


def _one_at_a_time(model, tok, prompts, **kw):
    return [generate_ids(model, tok, [p], GenerationOptions(batch_size=1, progress=False, **kw))[0] for p in prompts]


def _stops_from(texts: list[str]) -> list[str]:
    """Two ASCII stop strings taken from inside two of the free generations (so they really stop rows)."""
    stops = []
    for text in sorted(texts, key=len, reverse=True):
        for start in range(4, len(text) - 3):
            piece = text[start : start + 3]
            if piece.isascii() and piece.isprintable() and piece.strip() == piece and piece not in stops:
                stops.append(piece)
                break
        if len(stops) == 2:
            return stops
    raise AssertionError(f"no stop strings found in {texts!r}")


def test_static_cache_and_stop_strings_match_one_at_a_time_decoding(family):
    """Batched, static-cache decoding stopped at stop strings gives each row's one-at-a-time dynamic-cache tokens,
    cut where its text first contains a stop string (and not one token later)."""
    model, tok = family
    assert supports_static_cache(model)
    free = generate_ids(
        model, tok, PROMPTS, GenerationOptions(max_new_tokens=24, batch_size=3, progress=False, cache="static")
    )
    assert free == _one_at_a_time(model, tok, PROMPTS, max_new_tokens=24, cache="dynamic")
    texts = tok.batch_decode(free, skip_special_tokens=True)
    stops = _stops_from(texts)

    stopped = generate_ids(
        model, tok, PROMPTS, GenerationOptions(max_new_tokens=24, batch_size=3, progress=False, stop=stops)
    )
    assert stopped == _one_at_a_time(model, tok, PROMPTS, max_new_tokens=24, stop=stops, cache="dynamic")
    assert stopped == _one_at_a_time(model, tok, PROMPTS, max_new_tokens=24, stop=stops, cache="static")
    n_cut = 0
    for before, after in zip(free, stopped):
        assert after == before[: len(after)]  # stopping only ends a row early
        if len(after) < len(before):
            n_cut += 1
            assert any(s in tok.decode(after, skip_special_tokens=True) for s in stops)
            assert not any(s in tok.decode(after[:-1], skip_special_tokens=True) for s in stops)
    assert n_cut >= 1
    cut = generate(model, tok, PROMPTS, GenerationOptions(max_new_tokens=24, batch_size=4, progress=False, stop=stops))
    assert cut == [cut_at_stop(text, stops) for text in texts]
    assert sum(text != c for text, c in zip(texts, cut)) >= 2  # both stop strings cut something


def test_a_stop_string_straddling_the_prompt_does_not_stop(tiny):
    """Only the continuation is searched: HF's stop_strings, matching the whole sequence's end, would stop here."""
    model, tok, _ = tiny
    prompt = PROMPTS[0]
    free = generate(model, tok, [prompt], GenerationOptions(max_new_tokens=12, progress=False))[0]
    straddling = prompt[-3:] + free[:2]
    assert straddling not in free
    assert generate(model, tok, [prompt], GenerationOptions(max_new_tokens=12, progress=False, stop=[straddling])) == [
        free
    ]


def test_stop_triggers_are_the_tokens_that_can_complete_a_stop_string(tiny):
    model, tok, _ = tiny
    table = stop_triggers(tok, ["Question:"], 600)
    assert table.shape == (601,) and not table[len(tok) :].any()  # ids past the vocabulary never trigger
    assert not table[tok.eos_token_id] and not table[tok.pad_token_id]
    for i in range(len(tok)):
        text = tok.decode([i], skip_special_tokens=True)
        if ":" in text:
            assert table[i], text
        elif text.isascii() and text:
            assert not table[i], text


def test_unsupported_models_decode_with_the_dynamic_cache(tiny, monkeypatch):
    model, tok, _ = tiny
    seen = []
    real = type(model).generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    static = generate_ids(model, tok, PROMPTS, GenerationOptions(max_new_tokens=6, batch_size=8, progress=False))
    generate_ids(
        model, tok, PROMPTS, GenerationOptions(max_new_tokens=6, batch_size=8, progress=False, cache="dynamic")
    )
    monkeypatch.setattr(model, "_can_compile_fullgraph", False, raising=False)  # e.g. custom model code
    assert not supports_static_cache(model)
    assert (
        generate_ids(model, tok, PROMPTS, GenerationOptions(max_new_tokens=6, batch_size=8, progress=False)) == static
    )
    assert seen == ["static", None, None]


def test_batches_group_prompts_of_similar_length_longest_first():
    encoded = [[1] * n for n in (3, 9, 1, 7, 3, 5)]
    assert length_sorted_batches(encoded, 2) == [[1, 3], [5, 0], [4, 2]]
    assert length_sorted_batches([], 4) == []


def test_cut_at_stop():
    assert cut_at_stop("7\n\nQuestion: next", ["\n\nQuestion:", "Question:"]) == "7"
    assert cut_at_stop("a Question: b \n\nQuestion:", ["\n\nQuestion:", "Question:"]) == "a "
    assert cut_at_stop("no stop here", ["Question:"]) == "no stop here"
    assert cut_at_stop("x", []) == "x"


def test_eval_dtype_follows_training_on_a_gpu(monkeypatch):
    assert ev.eval_dtype(None, torch.device("cpu")) is None  # the loader's default, as before
    assert ev.eval_dtype("float32", torch.device("cuda")) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert ev.eval_dtype(None, torch.device("cuda")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert ev.eval_dtype(None, torch.device("cuda")) is None


def test_long_prompts_are_cut_from_the_left(tiny):
    model, tok, _ = tiny
    long_prompt = "Tom has 3 apples. " * 200
    n = len(encode_prompts(tok, [long_prompt])[0])
    positions = model.config.max_position_embeddings
    assert n > positions
    out = generate_ids(
        model, tok, [long_prompt], GenerationOptions(max_new_tokens=4, progress=False)
    )  # does not overflow
    assert out == generate_ids(
        model, tok, [long_prompt], GenerationOptions(max_new_tokens=4, max_prompt_length=positions - 4, progress=False)
    )
    with pytest.raises(ValueError):
        generate_ids(model, tok, ["x"], GenerationOptions(max_new_tokens=positions, progress=False))


class _BosTokenizer:
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] + [ord(c) for c in t] for t in texts]}


def test_encode_prompts_keeps_bos_when_cutting():
    tok = _BosTokenizer()
    assert encode_prompts(tok, ["abcdef"], max_prompt_length=4) == [[1, ord("d"), ord("e"), ord("f")]]
    assert encode_prompts(tok, ["ab"], max_prompt_length=4) == [[1, ord("a"), ord("b")]]
    assert encode_prompts(tok, ["ab"]) == [[1, ord("a"), ord("b")]]


# ----------------------------------------------------------------------------- metrics and the stage

EXAMPLES = [
    Example("e1", "p1", "48/2 = 24\n#### 5", "gsm8k", {"level": 1, "steps": 2}),
    Example("e2", "p2", "#### 10", "gsm8k", {"level": 2, "steps": 3}),
    Example("e3", "p3", "so \\boxed{\\frac{1}{2}}", "math", {"level": 1}),
    Example("e4", "p4", "#### 7", "math", {"level": 2}),
    Example("e5", "p5", "the answer is 3", None, {"steps": 2}),
    Example("e6", "p6", "#### 1,000", "gsm8k", {"steps": 10}),
]
GENERATIONS = {
    "p1": "24 + 5 = 29? No. #### 5",  # right
    "p2": "The answer is 11.",  # wrong
    "p3": "we get \\boxed{0.5}",  # right (math-verify)
    "p4": "no idea",  # no answer
    "p5": "It is 3.0",  # right (last number)
    "p6": "#### 1000",  # right
}


@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def fake(model, tokenizer, prompts, **kwargs):
        calls.append(list(prompts))
        return [Generation(GENERATIONS[p], p == "p4") for p in prompts]  # p4 ran out of room

    monkeypatch.setattr(generation, "generations", fake)
    return calls


def test_metrics_by_hand(fake_generate):
    metrics, records = evaluate_examples(
        None,
        None,
        EXAMPLES,
        GenerationOptions(max_new_tokens=8, batch_size=2),
        difficulty_keys=["level", "steps", "absent"],
    )
    assert fake_generate == [[ex.prompt for ex in EXAMPLES]]
    assert [r["id"] for r in records] == [ex.id for ex in EXAMPLES]
    assert [r["correct"] for r in records] == [True, False, True, False, True, True]
    assert [r["extracted"] for r in records] == ["5", "11", "0.5", None, "3", "1000"]
    assert [r["gold"] for r in records] == ["5", "10", "\\frac{1}{2}", "7", "3", "1000"]
    assert [r["answer_from"] for r in records] == ["####", "the answer is", "\\boxed", None, "last value", "####"]
    assert set(records[0]) == {
        "id",
        "source",
        "meta",
        "prompt",
        "generation",
        "extracted",
        "answer_from",
        "gold",
        "correct",
        "grading",
        "cut",
        "program",
    }
    assert [r["grading"] for r in records] == ["graded"] * 6
    assert [r["cut"] for r in records] == [False, False, False, True, False, False]
    assert metrics["n_cut"] == 1 and metrics["n_program"] == 0
    assert metrics["n"] == 6 and metrics["n_correct"] == 4 and metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["n_no_answer"] == 1 and metrics["n_no_gold"] == 0
    assert metrics["n_no_marker"] == 2  # p4 (nothing) and p5 (its last number)
    assert metrics["n_ungradable"] == 0 and metrics["n_grading_timeout"] == 0
    assert metrics["per_source"] == {
        NO_SOURCE: {"accuracy": 1.0, "n": 1, "n_correct": 1},
        "gsm8k": {"accuracy": pytest.approx(2 / 3), "n": 3, "n_correct": 2},
        "math": {"accuracy": 0.5, "n": 2, "n_correct": 1},
    }
    assert metrics["per_difficulty"] == {
        "level": {"1": {"accuracy": 1.0, "n": 2, "n_correct": 2}, "2": {"accuracy": 0.0, "n": 2, "n_correct": 0}},
        "steps": {
            "2": {"accuracy": 1.0, "n": 2, "n_correct": 2},
            "3": {"accuracy": 0.0, "n": 1, "n_correct": 0},
            "10": {"accuracy": 1.0, "n": 1, "n_correct": 1},
        },
    }
    assert list(metrics["per_difficulty"]["steps"]) == ["2", "3", "10"]  # numeric order


def test_metrics_of_nothing():
    m = compute_metrics([])
    assert m["n"] == 0 and m["accuracy"] is None and m["per_source"] == {} and m["per_difficulty"] == {}
    assert m["n_no_marker"] == 0 and m["n_ungradable"] == 0


def _evaluate(monkeypatch, pairs):
    """evaluate_examples on (generation, response) pairs, the generations given."""
    examples = [Example(f"e{i}", f"p{i}", response, "s", {}) for i, (_, response) in enumerate(pairs)]
    texts = {f"p{i}": generation for i, (generation, _) in enumerate(pairs)}
    monkeypatch.setattr(
        generation,
        "generations",
        lambda model, tokenizer, prompts, **kw: [Generation(texts[p], False) for p in prompts],
    )
    return evaluate_examples(None, None, examples, difficulty_keys=[])


def test_outputs_without_an_answer_marker_are_counted(monkeypatch):
    """The last-number fallback always finds a number: n_no_answer said 0 when no output stated its answer."""
    metrics, records = _evaluate(
        monkeypatch,
        [
            ("She has 3 apples, then 4 more, so 7", "#### 7"),  # right, but by its last number
            ("I think 12", "#### 12"),  # right, last number
            ("Let me count: 5 and 6", "#### 9"),  # wrong, last number
            ("#### 9", "#### 9"),  # stated
            ("\\boxed{2}", "#### 3"),  # stated, wrong
            ("The answer is 4", "#### 4"),  # stated
        ],
    )
    assert [r["correct"] for r in records] == [True, True, False, True, False, True]
    assert metrics["n_no_answer"] == 0
    assert metrics["n_no_marker"] == 3
    on_disk = json.loads(json.dumps(metrics))
    assert on_disk["n_no_marker"] == 3 and on_disk["n_no_answer"] == 0


def test_numbers_past_the_int_conversion_limit_do_not_abort_an_eval(monkeypatch):
    """A 5,000-digit integer once raised ValueError after generation, and the eval wrote nothing."""
    big = "7" * 5000
    metrics, records = _evaluate(
        monkeypatch,
        [(f"#### {big}", f"#### {big}"), (f"#### {big}", "#### 7"), ("#### 7", f"so {big}"), ("#### 7", "#### 7")],
    )
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert records[0]["extracted"] == big and records[2]["gold"] == big
    assert metrics["n_correct"] == 2 and metrics["n_ungradable"] == 0


def test_an_example_that_cannot_be_graded_is_counted_not_fatal(monkeypatch):
    real_grade = ev.grade

    def grade(pred, gold, **kw):
        if pred == "13":
            raise RecursionError("maximum recursion depth exceeded")  # e.g. a pathological nesting
        if pred == "14":
            return Grade(False, "timeout")
        return real_grade(pred, gold, **kw)

    monkeypatch.setattr(ev, "grade", grade)
    metrics, records = _evaluate(monkeypatch, [("#### 13", "#### 13"), ("#### 14", "#### 14"), ("#### 5", "#### 5")])
    assert [r["grading"] for r in records] == ["error", "timeout", "graded"]
    assert [r["correct"] for r in records] == [False, False, True]
    assert records[0]["extracted"] == "13" and records[0]["gold"] == "13"  # what was found is kept
    assert metrics["n_ungradable"] == 2 and metrics["n_grading_timeout"] == 1 and metrics["n_correct"] == 1


def test_metrics_of_records_without_answer_from():
    """Records from before `answer_from` existed: whether the answer was marked is found again."""
    old = [
        {"generation": "#### 4", "extracted": "4", "gold": "4", "correct": True},
        {"generation": "so 4", "extracted": "4", "gold": "4", "correct": True},
    ]
    m = compute_metrics(old)
    assert m["n_no_marker"] == 1 and m["n_ungradable"] == 0
    assert m["n_cut"] is None  # not recorded then: unknown, not zero
    assert m["n_program"] == 0
    m = compute_metrics([*old, {"generation": "x = 4\nprint(x)", "extracted": "4", "gold": "4", "correct": True}])
    assert m["n_program"] == 1  # decided again from the text


def test_program_answers_are_counted_and_never_run(monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("a program answer was run"))
    metrics, records = _evaluate(
        monkeypatch,
        [
            ("n0 = 3.0\nn1 = 4.0\nanswer = n0 + n1\nprint(answer)", "#### 7"),  # MathInstruct's PoT style
            ("def solution():\n    return 12\n\nprint(solution())", "#### 12"),
            ("import math\nprint(math.sqrt(16))", "#### 4"),
            ("3 + 4 = 7\n#### 7", "#### 7"),
            ("We could print(7) it, but the answer is 7", "#### 7"),  # prose that mentions print(
        ],
    )
    assert [r["program"] for r in records] == [True, True, True, False, False]
    assert metrics["n_program"] == 3
    # graded on what find_answer finds in the text, not on what the program would print: 12 is the last number
    # of the second, while the first's last number is 4 (n1 = 4.0) and the third's 16
    assert [r["correct"] for r in records] == [False, True, False, True, True]


# ----------------------------------------------------------------------------- options, checked up front


@pytest.fixture
def data_file(tmp_path):
    from datalever.examples import save_examples

    path = tmp_path / "test.jsonl"
    save_examples(str(path), EXAMPLES)
    return str(path)


@pytest.mark.parametrize(
    "option, value",
    [
        ("limit", -1),  # once evaluated 49 of 50 examples
        ("limit", 0),
        ("max_new_tokens", 0),
        ("batch_size", 0),
        ("batch_size", -2),
        ("max_prompt_length", 0),
        ("dtype", "fp16"),
        ("cache", "paged"),
        ("stop", [""]),  # would stop every generation at once
        ("stop", "Question:"),  # a string, not a list of them
    ],
)
def test_bad_options_are_refused_when_the_config_is_built(data_file, option, value):
    with pytest.raises(ConfigError, match=rf"^{option}\b"):
        EvalConfig(data=data_file, **{option: value})


def test_data_is_checked_when_it_is_a_local_path(tmp_path, data_file):
    for missing in (tmp_path / "missing.jsonl", tmp_path / "missing", "./missing", "no_such_dir/test.csv"):
        with pytest.raises(ConfigError, match="^data: no such file or directory"):
            EvalConfig(data=str(missing))
    # hub dataset names are left to the loader
    assert EvalConfig(data="openai/gsm8k").data == "openai/gsm8k"
    assert EvalConfig(data="gsm8k").data == "gsm8k"
    cfg = EvalConfig(data=data_file, limit=3, max_prompt_length=None, dtype="bfloat16", stop=["Question:"])
    assert cfg.limit == 3 and cfg.stop == ["Question:"] and cfg.cache == "static"
    assert EvalConfig(data=str(tmp_path), dtype=None).dtype is None


def test_the_command_line_names_a_bad_option_in_one_line(data_file, capsys):
    from datalever.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--data", data_file, "--limit", "-1", "--out", data_file + ".out"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["datalever eval: error: limit must be > 0, got -1"]


class _FakeAccelerator:
    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world
        self.is_local_main_process = rank == 0


def test_sharded_evaluation_gathers_every_record_in_order(fake_generate, monkeypatch):
    import accelerate.utils

    single_metrics, single = evaluate_examples(None, None, EXAMPLES, difficulty_keys=["level"])
    from_rank1 = []
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: from_rank1.extend(copy.deepcopy(objs)) or objs)
    evaluate_examples(None, None, EXAMPLES, difficulty_keys=["level"], accelerator=_FakeAccelerator(1, 2))
    assert [r["id"] for r in from_rank1] == ["e2", "e4", "e6"]  # rank 1's shard: examples[1::2]
    # rank 0: the gather returns both shards, rank 1's first
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: from_rank1 + objs)
    metrics, records = evaluate_examples(
        None, None, EXAMPLES, difficulty_keys=["level"], accelerator=_FakeAccelerator(0, 2)
    )
    assert fake_generate[-1] == ["p1", "p3", "p5"]
    assert records == single and metrics == single_metrics


def test_run_writes_predictions_and_metrics(tiny, tmp_path, monkeypatch):
    from datalever.examples import save_examples

    data = tmp_path / "test.jsonl"
    save_examples(str(data), EXAMPLES)
    model_dir = tiny[2]
    cfg = EvalConfig(
        model=str(model_dir),
        data=str(data),
        out=str(tmp_path / "out"),
        max_new_tokens=4,
        batch_size=4,
        limit=5,
        progress=False,
    )
    metrics = ev.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [ex.id for ex in EXAMPLES[:5]]
    assert rows[0]["meta"] == {"level": 1, "steps": 2} and rows[2]["gold"] == "\\frac{1}{2}"
    assert [r["prompt"] for r in rows] == [ex.prompt for ex in EXAMPLES[:5]]  # plain text: as in the data
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == metrics and metrics["n"] == 5
    assert metrics["n_correct"] == sum(r["correct"] for r in rows)
    assert set(metrics) >= {"accuracy", "n", "n_correct", "per_source", "per_difficulty", "n_no_answer"}
    assert set(metrics) >= {"n_no_marker", "n_ungradable", "n_grading_timeout"}
    assert set(rows[0]) >= {"answer_from", "grading"}


def test_run_passes_the_generation_and_loading_options(tiny, tmp_path, monkeypatch):
    from datalever import models
    from datalever.examples import save_examples

    data = tmp_path / "test.jsonl"
    save_examples(str(data), EXAMPLES)
    loaded, generated = {}, {}
    real_model, real_tokenizer, real_generate = models.load_model, models.load_tokenizer, generation.generations
    monkeypatch.setattr(models, "load_model", lambda path, **kw: loaded.setdefault("model", kw) and real_model(path))
    monkeypatch.setattr(
        models, "load_tokenizer", lambda path, **kw: loaded.setdefault("tokenizer", kw) and real_tokenizer(path)
    )
    monkeypatch.setattr(generation, "generations", lambda *a, **kw: generated.update(kw) or real_generate(*a, **kw))
    cfg = EvalConfig(
        model=str(tiny[2]),
        data=str(data),
        out=str(tmp_path / "out"),
        max_new_tokens=4,
        limit=2,
        progress=False,
        stop=["Question:"],
        cache="dynamic",
        trust_remote_code=True,
    )
    ev.run(cfg)
    assert loaded == {"tokenizer": {"trust_remote_code": True}, "model": {"dtype": None, "trust_remote_code": True}}
    assert generated["options"].stop == ["Question:"] and generated["options"].cache == "dynamic"


def test_config_fields_have_docstrings():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(EvalConfig))
    body = tree.body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            nxt = body[i + 1]
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value.value, str), node.target.id


EVAL_WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
from accelerate import PartialState
state = PartialState(cpu=True)  # run() reuses the state it finds
from datalever.evaluate import EvalConfig, run
metrics = run(EvalConfig(model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], max_new_tokens=6, batch_size=2,
                         progress=False))
# Each rank writes its own file: two ranks printing long lines to one pipe can interleave them.
with open(f"{sys.argv[4]}/rank{state.process_index}.json", "w") as f:
    json.dump(metrics, f, sort_keys=True)
state.wait_for_everyone()
torch.distributed.destroy_process_group()  # explicit: gloo torn down at interpreter exit can abort
import os
os._exit(0)  # and skip the interpreter's teardown, where gloo's threads can still abort on a loaded machine
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_run_with_two_cpu_processes_matches_one(tiny, tmp_path):
    import os
    import subprocess
    import sys

    from datalever.examples import save_examples

    data = tmp_path / "test.jsonl"
    save_examples(str(data), EXAMPLES)
    script = tmp_path / "worker.py"
    script.write_text(EVAL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tiny[2]),
            str(data),
            str(tmp_path / "two"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reported = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    single = ev.run(
        EvalConfig(
            model=str(tiny[2]),
            data=str(data),
            out=str(tmp_path / "one"),
            max_new_tokens=6,
            batch_size=3,
            progress=False,
        )
    )
    assert reported == [single, single]
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()


def test_eval_resolves_a_model_spec_as_train_does(tmp_path):
    """`datalever eval --model embedded:demo-base` evaluates the shipped model (it once died in from_pretrained)."""
    from datalever import synth
    from datalever.cli import main

    data = synth.write_splits(str(tmp_path / "data"), n_train=1, n_val=1, n_test=3, seed=0)["test"]
    out = tmp_path / "eval"
    main(
        ["eval", "--model", "embedded:demo-base", "--data", data, "--out", str(out)]
        + ["--max_new_tokens", "4", "--progress", "false"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and len((out / "predictions.jsonl").read_text().splitlines()) == 3
    # A rerun with other settings into the same place is refused, in one line, unless --overwrite true.
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "embedded:demo-base", "--data", data, "--out", str(out), "--limit", "2"])
    assert exit_.value.code == 2 and json.loads((out / "metrics.json").read_text())["n"] == 3
    main(
        ["eval", "--model", "embedded:demo-base", "--data", data, "--out", str(out), "--limit", "2"]
        + ["--max_new_tokens", "4", "--progress", "false", "--overwrite", "true"]
    )
    assert json.loads((out / "metrics.json").read_text())["n"] == 2
