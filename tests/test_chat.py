"""Chat templates (`--chat_template auto|none|FILE`): the loss on the assistant's tokens only, exactly one BOS, and
the evaluation prompt the very prefix training saw; profile, score, train and eval alike.

Two small local tokenizers stand in for the real ones: the preset tokenizer with Llama 3's chat tokens and template
(a BOS that the tokenizer also adds itself, as the real one does, and the chat tokens only among its added tokens,
as in a base Llama 3) and with Qwen2.5's (no BOS, a default system turn). Every expectation is written out by hand
from the template's rules, never taken from `tokens.Formatter` itself.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import AddedToken
from tokenizers.processors import TemplateProcessing

from datalever import checks, cli, generation, rundir
from datalever.examples import Example, content_id, load_examples, plain_prompt
from datalever.models import PRESETS, build_config, load_tokenizer, resolve_model
from datalever.tokens import IGNORE, Formatter, Truncation, check_chat_template, collate, encode_example

# ----------------------------------------------------------------------------- the two template styles

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN_SYSTEM = "You are a helpful assistant."
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + QWEN_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Style:
    """A template's rules, for writing out by hand what it renders."""

    template: str
    bos: str  # what the template writes first
    default_system: str  # what it renders when the conversation has no system turn
    end: str  # what closes every turn
    stop: str  # the end-of-turn token
    head: str  # the header of a turn, with {role}

    def header(self, role: str) -> str:
        return self.head.format(role=role)


LLAMA3 = Style(
    LLAMA3_TEMPLATE,
    "<|begin_of_text|>",
    "",
    "<|eot_id|>",
    "<|eot_id|>",
    "<|start_header_id|>{role}<|end_header_id|>\n\n",
)
QWEN = Style(
    QWEN_TEMPLATE,
    "",
    f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n",
    "<|im_end|>\n",
    "<|im_end|>",
    "<|im_start|>{role}\n",
)
STYLES = {"llama3": LLAMA3, "qwen": QWEN}

# ----------------------------------------------------------------------------- tokenizers and models


def add_llama3_tokens(tok) -> None:
    """<|begin_of_text|> as BOS, added by the tokenizer itself too (a post-processor, as in the real tokenizer.json);
    the chat tokens as special added tokens only, as in a base Llama 3 (not among its named special tokens)."""
    bos = "<|begin_of_text|>"
    tok.add_special_tokens({"bos_token": AddedToken(bos, special=True, normalized=False)})
    chat = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in chat])
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )


def add_qwen_tokens(tok) -> None:
    """<|im_start|> and <|im_end|> as named special tokens, no BOS (as Qwen2.5's tokenizer)."""
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})


def save_chat_model(tok, out) -> str:
    """A tiny Llama whose vocabulary covers the added tokens, saved with `tok` as an HF checkpoint directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(PRESETS["tiny"], tok))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    """Checkpoint directories: llama3 and qwen (their templates set), qwen-tokens (the tokens, no template)."""
    base = resolve_model("preset:tiny")
    root = tmp_path_factory.mktemp("chat")
    dirs = {}
    for name, add, template in (
        ("llama3", add_llama3_tokens, LLAMA3_TEMPLATE),
        ("qwen", add_qwen_tokens, QWEN_TEMPLATE),
        ("qwen-tokens", add_qwen_tokens, None),
    ):
        tok = load_tokenizer(base)
        add(tok)
        if template is not None:
            tok.chat_template = template
        dirs[name] = save_chat_model(tok, root / name)
    return dirs


@pytest.fixture(scope="module")
def toks(chat_dirs):
    """The tokenizers as the stages load them, plus `plain`: the preset's own, without a template."""
    return {
        **{name: load_tokenizer(path) for name, path in chat_dirs.items()},
        "plain": load_tokenizer(resolve_model("preset:tiny")),
    }


@pytest.fixture(scope="module")
def template_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    files = {}
    for name, style in STYLES.items():
        files[name] = root / f"{name}.jinja"
        files[name].write_text(style.template, encoding="utf-8")
    return {name: str(path) for name, path in files.items()}


# ----------------------------------------------------------------------------- expectations by hand


def chat(*turns: tuple[str, str]) -> Example:
    """An example in the messages format, as the loader makes it."""
    return Example(content_id(json.dumps(turns)), plain_prompt(turns), turns[-1][1], messages=tuple(turns))


SINGLE = chat(("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5.\n#### 5"))
MULTI = chat(
    ("system", "Answer with a number."),
    ("user", "What is 2 + 3?"),
    ("assistant", "5"),
    ("user", "And 4 times that?"),
    ("assistant", "4 * 5 = 20.\n#### 20"),
)


def expected_segments(style: Style, turns) -> list[tuple[str, bool]]:
    """The conversation as (text, carries loss), by the template's rules: an assistant turn's content and its end
    carry loss; its header, and every other turn, none."""
    out = [(style.bos + (style.default_system if turns[0][0] != "system" else ""), False)]
    for role, content in turns:
        if role == "assistant":  # what follows the end-of-turn token (Qwen's newline) is never generated: no loss
            out += [(style.header(role), False), (content + style.stop, True), (style.end[len(style.stop) :], False)]
        else:
            out.append((style.header(role) + content + style.end, False))
    merged: list[tuple[str, bool]] = []
    for text, loss in out:
        if not text:
            continue
        if merged and merged[-1][1] == loss:
            merged[-1] = (merged[-1][0] + text, loss)
        else:
            merged.append((text, loss))
    return merged


def before_final_answer(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The segments before the last one that carries loss: what the model is given at evaluation."""
    return segments[: max(j for j, (_, loss) in enumerate(segments) if loss)]


def ids_and_labels(tok, segments, *, first_special: bool = False) -> tuple[list[int], list[int]]:
    """Each segment tokenized on its own; labels are the ids where the segment carries loss, IGNORE elsewhere."""
    ids, labels = [], []
    for j, (text, loss) in enumerate(segments):
        piece = tok(text, add_special_tokens=first_special and j == 0)["input_ids"]
        ids += piece
        labels += piece if loss else [IGNORE] * len(piece)
    return ids, labels


def labels_of(encoded, pad_id: int) -> list[int]:
    return collate([encoded], pad_id)["labels"][0].tolist()


def loss_spans(labels: list[int]) -> list[list[int]]:
    """The runs of labels that carry loss, in order."""
    spans: list[list[int]] = []
    for j, label in enumerate(labels):
        if label == IGNORE:
            continue
        if j and labels[j - 1] != IGNORE:
            spans[-1].append(label)
        else:
            spans.append([label])
    return spans


def read_yaml(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def token_id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


# ----------------------------------------------------------------------------- one BOS, the loss on the assistant


def test_llama3_single_turn_has_one_bos_and_loss_on_the_answer_and_eot(toks):
    tok = toks["llama3"]
    prompt = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    answer = "2 + 3 = 5.\n#### 5<|eot_id|>"
    want_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    want_answer = tok(answer, add_special_tokens=False)["input_ids"]
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds a BOS itself: the trap of two

    encoded = Formatter(tok, "auto").encode(SINGLE, 512)
    assert encoded.input_ids == want_prompt + want_answer
    assert encoded.input_ids.count(tok.bos_token_id) == 1 and encoded.input_ids[0] == tok.bos_token_id
    assert labels_of(encoded, tok.pad_token_id) == [IGNORE] * len(want_prompt) + want_answer
    assert want_answer[-1] == token_id(tok, "<|eot_id|>")
    assert encoded.n_prompt == len(want_prompt) and encoded.n_response == len(want_answer)
    # HF's own tokenization of the conversation: the same ids, one BOS.
    messages = [{"role": r, "content": c} for r, c in SINGLE.messages]
    assert list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == encoded.input_ids


def test_qwen_single_turn_adds_no_bos_and_renders_the_default_system_turn(toks):
    tok = toks["qwen"]
    prompt = (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    answer = "2 + 3 = 5.\n#### 5<|im_end|>"
    want_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    want_answer = tok(answer, add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]

    encoded = Formatter(tok, "auto").encode(SINGLE, 512)
    assert tok.bos_token_id is None and encoded.input_ids[0] == token_id(tok, "<|im_start|>")
    assert encoded.input_ids == want_prompt + want_answer + newline  # as the template renders it
    # The newline after <|im_end|> is never generated (evaluation stops at <|im_end|>): it carries no loss.
    labels = [IGNORE] * len(want_prompt) + want_answer + [IGNORE] * len(newline)
    assert labels_of(encoded, tok.pad_token_id) == labels
    assert encoded.n_response == len(want_answer)


@pytest.mark.parametrize("style", STYLES)
def test_multi_turn_every_assistant_turn_carries_loss_and_no_other(toks, style):
    tok = toks[style]
    want_ids, want_labels = ids_and_labels(tok, expected_segments(STYLES[style], MULTI.messages))
    encoded = Formatter(tok, "auto").encode(MULTI, 512)
    assert encoded.input_ids == want_ids
    assert labels_of(encoded, tok.pad_token_id) == want_labels
    # Read back: the loss-carrying text is the two answers with their ends, nothing else.
    stop = STYLES[style].stop
    spans = loss_spans(labels_of(encoded, tok.pad_token_id))
    assert [tok.decode(span) for span in spans] == ["5" + stop, "4 * 5 = 20.\n#### 20" + stop]
    assert encoded.n_response == sum(label != IGNORE for label in want_labels)
    if style == "llama3":
        assert encoded.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("style", STYLES)
def test_eval_prompt_is_the_training_prefix_ending_with_the_assistant_header(toks, style):
    tok, rules = toks[style], STYLES[style]
    formatter = Formatter(tok, "auto")
    for ex in (SINGLE, MULTI):
        prompt = formatter.prompt_ids(ex)
        final = tok(ex.response + rules.end, add_special_tokens=False)["input_ids"]
        encoded = formatter.encode(ex, 512)
        assert encoded.input_ids == prompt + final  # the prefix training saw, then the answer it learned
        header = tok(rules.header("assistant"), add_special_tokens=False)["input_ids"]
        assert prompt[-len(header) :] == header
        messages = [{"role": r, "content": c} for r, c in ex.messages[:-1]]
        hf = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert list(hf["input_ids"]) == prompt


def test_stop_ids_are_the_templates_end_of_turn(toks, template_files):
    # <|eot_id|> is only among the added tokens (as in a base Llama 3), not in all_special_ids.
    assert token_id(toks["llama3"], "<|eot_id|>") not in toks["llama3"].all_special_ids
    assert Formatter(toks["llama3"], "auto").stop_ids() == [token_id(toks["llama3"], "<|eot_id|>")]
    assert Formatter(toks["qwen"], "auto").stop_ids() == [token_id(toks["qwen"], "<|im_end|>")]
    assert Formatter(toks["qwen-tokens"], template_files["qwen"]).stop_ids() == [token_id(toks["qwen"], "<|im_end|>")]
    assert Formatter(toks["llama3"], "none").stop_ids() == []
    assert Formatter(toks["plain"], "auto").stop_ids() == []


def test_an_end_of_turn_token_with_a_y_in_its_name_is_found(toks, tmp_path):
    tok = copy.deepcopy(toks["plain"])
    tok.add_special_tokens({"additional_special_tokens": ["<|end_of_reply|>"]})
    path = tmp_path / "reply.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end_of_reply|>\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        encoding="utf-8",
    )
    assert Formatter(tok, str(path)).stop_ids() == [token_id(tok, "<|end_of_reply|>")]


def test_an_end_of_turn_token_that_swallows_the_newline_keeps_it_in_the_answer(toks, tmp_path):
    """A token with rstrip (Phi-3's <|end|>) takes the newline after it when tokenized together: the turn is not
    split there, so the tokens stay those of the template's own tokenization."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(toks["plain"])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|end|>", rstrip=True, normalized=False)]})
    path = tmp_path / "phi3.jinja"
    path.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        encoding="utf-8",
    )
    formatter = Formatter(tok, str(path))
    encoded = formatter.encode(SINGLE, 512)
    messages = [{"role": r, "content": c} for r, c in SINGLE.messages]
    rendered = tok.apply_chat_template(messages, chat_template=path.read_text(), tokenize=False)
    assert encoded.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert formatter.stop_ids() == [token_id(tok, "<|end|>")]
    n_prompt = len(formatter.prompt_ids(SINGLE))
    assert labels_of(encoded, tok.pad_token_id)[n_prompt:] == encoded.input_ids[n_prompt:]  # all of it, to the end


def test_an_empty_answer_in_plain_text_carries_loss_on_eos_only(toks):
    tok = toks["plain"]
    ex = Example("e", "What is 0?\n", "")
    encoded = Formatter(tok, "none").encode(ex, 512)
    prompt = tok("What is 0?\n")["input_ids"]
    assert encoded.input_ids == prompt + [tok.eos_token_id] and encoded.n_prompt == len(prompt)
    assert labels_of(encoded, tok.pad_token_id) == [IGNORE] * len(prompt) + [tok.eos_token_id]


def test_a_template_that_ends_turns_with_plain_text_stops_only_at_eos(toks, tmp_path):
    """A newline may be part of an answer: only a special token ends a turn early."""
    path = tmp_path / "lines.jinja"
    path.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        encoding="utf-8",
    )
    assert Formatter(toks["plain"], str(path)).stop_ids() == []


# ----------------------------------------------------------------------------- none, FILE, auto


def test_none_is_the_plain_rendering_with_the_tokenizers_bos_and_eos(toks):
    tok = toks["llama3"]
    formatter = Formatter(tok, "none")
    assert formatter.template is None and formatter.describe() == "plain text"
    want_ids, want_labels = ids_and_labels(
        tok, [("User: What is 2 + 3?\nAssistant:\n", False), ("2 + 3 = 5.\n#### 5", True)], first_special=True
    )
    encoded = formatter.encode(SINGLE, 512)
    eos = tok.eos_token_id
    assert encoded.input_ids == want_ids + [eos]
    assert labels_of(encoded, tok.pad_token_id) == want_labels + [eos]
    assert encoded.input_ids.count(tok.bos_token_id) == 1  # the tokenizer's own, once
    assert formatter.prompt_ids(SINGLE) == tok(SINGLE.prompt)["input_ids"]


def test_none_multi_turn_puts_loss_on_each_answer(toks):
    tok = toks["plain"]
    segments = [
        ("System: Answer with a number.\nUser: What is 2 + 3?\nAssistant:\n", False),
        ("5\n", True),
        ("User: And 4 times that?\nAssistant:\n", False),
        ("4 * 5 = 20.\n#### 20", True),
    ]
    want_ids, want_labels = ids_and_labels(tok, segments, first_special=True)
    encoded = Formatter(tok, "none").encode(MULTI, 512)
    assert encoded.input_ids == want_ids + [tok.eos_token_id]
    assert labels_of(encoded, tok.pad_token_id) == want_labels + [tok.eos_token_id]
    assert MULTI.prompt == "".join(text for text, _ in segments[:3])  # the plain prompt the data holds


@pytest.mark.parametrize("style", STYLES)
def test_a_template_file_works_like_the_tokenizers_own(toks, template_files, style):
    own = Formatter(toks[style], "auto")
    from_file = Formatter(toks[style], template_files[style])
    assert from_file.describe() == "chat template"
    for ex in (SINGLE, MULTI):
        assert from_file.encode(ex, 512) == own.encode(ex, 512)
        assert from_file.prompt_ids(ex) == own.prompt_ids(ex)
    if style == "qwen":  # on a tokenizer without a template
        assert Formatter(toks["qwen-tokens"], template_files[style]).encode(MULTI, 512) == own.encode(MULTI, 512)


def test_a_template_file_overrides_the_tokenizers_own(toks, tmp_path):
    bare = Style(QWEN_TEMPLATE.split("{% endif %}", 1)[1], "", "", QWEN.end, QWEN.stop, QWEN.head)  # no default system
    without_default_system = tmp_path / "qwen-bare.jinja"
    without_default_system.write_text(bare.template, encoding="utf-8")
    want_ids, want_labels = ids_and_labels(toks["qwen"], expected_segments(bare, SINGLE.messages))
    encoded = Formatter(toks["qwen"], str(without_default_system)).encode(SINGLE, 512)
    assert encoded.input_ids == want_ids
    assert labels_of(encoded, toks["qwen"].pad_token_id) == want_labels


def test_auto_with_several_named_templates_takes_the_default(toks):
    tok = copy.deepcopy(toks["qwen"])
    tok.chat_template = {"default": QWEN_TEMPLATE, "tool_use": "{{ raise_exception('not this one') }}"}
    assert Formatter(tok, "auto").encode(MULTI, 512) == Formatter(toks["qwen"], "auto").encode(MULTI, 512)


def test_auto_without_a_template_is_plain(toks):
    tok = toks["plain"]
    formatter = Formatter(tok, "auto")
    assert formatter.template is None and formatter.stop_ids() == []
    gsm = Example("g", "Question: What is 2 + 3?\nAnswer:\n", "2 + 3 = 5.\n#### 5")
    for ex in (gsm, SINGLE):
        assert formatter.encode(ex, 512) == Formatter(tok, "none").encode(ex, 512)
    assert formatter.encode(gsm, 512) == encode_example(tok, gsm, 512)
    assert formatter.prompt_ids(gsm) == tok(gsm.prompt)["input_ids"]


@pytest.mark.parametrize("style", STYLES)
def test_a_question_answer_example_becomes_one_user_and_one_assistant_turn(toks, style, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"}) + "\n")
    (ex,) = load_examples(str(data))
    assert ex.messages is None
    turns = (("user", "Question: What is 2 + 3?\nAnswer:\n"), ("assistant", "2 + 3 = 5.\n#### 5"))
    want_ids, want_labels = ids_and_labels(toks[style], expected_segments(STYLES[style], turns))
    encoded = Formatter(toks[style], "auto").encode(ex, 512)
    assert encoded.input_ids == want_ids
    assert labels_of(encoded, toks[style].pad_token_id) == want_labels


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("style", STYLES)
def test_truncation_keeps_ids_labels_and_counts_consistent(toks, style):
    tok = toks[style]
    full_ids, full_labels = ids_and_labels(tok, expected_segments(STYLES[style], MULTI.messages))
    n_loss = sum(label != IGNORE for label in full_labels)
    formatter = Formatter(tok, "auto")
    encoded_all = []
    for max_length in range(1, len(full_ids) + 2):
        encoded = formatter.encode(MULTI, max_length)
        labels = labels_of(encoded, tok.pad_token_id)
        kept = sum(label != IGNORE for label in labels)
        assert encoded.input_ids == full_ids[:max_length], max_length
        assert labels == full_labels[:max_length], max_length
        assert max(encoded.n_response, 0) == kept, max_length
        assert encoded.fully_truncated == (kept == 0), max_length
        # Cut tokens that carry loss, not the later user turn's tokens cut with them.
        assert encoded.n_cut == n_loss - kept, max_length
        assert encoded.full_length == len(full_ids)
        encoded_all.append(encoded)
    report = Truncation.of(encoded_all, 0)
    # Every max_length short of the final answer's end cuts it (Qwen's newline after it carries no loss).
    answer_end = max(j for j, label in enumerate(full_labels) if label != IGNORE) + 1
    assert report.n_cut == answer_end - 1 and report.needed_length == answer_end
    assert answer_end == len(full_ids) - (style == "qwen")


# ----------------------------------------------------------------------------- templates that cannot be split


COUNTING = (
    "{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# As Qwen3's: earlier assistant turns rendered otherwise than the last one.
LAST_ONLY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template, ex", [(COUNTING, SINGLE), (LAST_ONLY, MULTI)], ids=["counting", "last-only"])
def test_a_template_that_renders_prefixes_inconsistently_is_refused(toks, tmp_path, template, ex):
    path = tmp_path / "bad.jinja"
    path.write_text(template, encoding="utf-8")
    with pytest.raises(ValueError, match="renders a conversation's beginning differently"):
        Formatter(toks["qwen"], str(path)).encode(ex, 512)  # COUNTING: refused when made (one exchange shows it)
    if template is LAST_ONLY:
        Formatter(toks["qwen"], str(path)).encode(SINGLE, 512)  # one assistant turn: nothing rendered otherwise


# ----------------------------------------------------------------------------- end to end


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}],
    [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 7 - 4?"},
        {"role": "assistant", "content": "7 - 4 = 3.\n#### 3"},
    ],
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 times that?"},
        {"role": "assistant", "content": "4 * 5 = 20.\n#### 20"},
    ],
    [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "6 * 7 = 42.\n#### 42"}],
]


@pytest.fixture
def messages_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return str(path)


QUIET = ["--progress", "false"]
CASES = {"auto": ("llama3", "llama3", None), "file": ("qwen-tokens", "qwen", "qwen")}  # model, style, template file


def case_option(case: str, template_files) -> str:
    file = CASES[case][2]
    return template_files[file] if file else "auto"


def expected_loss_tokens(tok, style: Style, ex: Example) -> int:
    return sum(label != IGNORE for label in ids_and_labels(tok, expected_segments(style, ex.messages))[1])


@pytest.mark.parametrize("case", CASES)
def test_score_train_and_eval_from_the_command_line(
    chat_dirs, toks, template_files, messages_file, tmp_path, case, monkeypatch
):
    model_name, style_name, _ = CASES[case]
    option, tok, style = case_option(case, template_files), toks[model_name], STYLES[style_name]
    model = chat_dirs[model_name]
    examples = load_examples(messages_file)
    assert all(ex.messages is not None for ex in examples)

    scores = tmp_path / "score" / "losses.parquet"
    cli.main(["score", "--model", model, "--data", messages_file, "--chat_template", option, "--out", str(scores)])
    table = pq.read_table(scores).to_pydict()
    assert table["id"] == [ex.id for ex in examples]
    assert table["n_tokens"] == [expected_loss_tokens(tok, style, ex) for ex in examples]
    assert all(loss == loss and loss > 0 for loss in table["loss"])  # finite: every example has loss tokens

    train_out = tmp_path / "train"
    cli.main(
        [
            "train",
            "--model",
            model,
            "--data",
            messages_file,
            "--chat_template",
            option,
            "--out",
            str(train_out),
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--micro_batch_size",
            "2",
            "--warmup_ratio",
            "0",
            *QUIET,
        ]
    )
    layout = rundir.TrainDir(train_out)
    assert (layout.model / "model.safetensors").is_file()
    assert read_yaml(train_out / "train.config.yaml")["chat_template"] == option

    captured = {}
    real = generation.generate_ids

    def spy(model, tokenizer, prompts, **kw):
        captured.update(prompts=[list(p) for p in prompts], end_ids=list(kw["options"].end_ids))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(generation, "generate_ids", spy)
    eval_out = tmp_path / "eval"
    cli.main(
        [
            "eval",
            "--model",
            str(layout.model),
            "--data",
            messages_file,
            "--chat_template",
            option,
            "--out",
            str(eval_out),
            "--max_new_tokens",
            "4",
            *QUIET,
        ]
    )
    assert (eval_out / "predictions.jsonl").is_file() and (eval_out / "metrics.json").is_file()
    assert read_yaml(eval_out / "evaluate.config.yaml")["chat_template"] == option
    # The prompts generated from: each conversation's training prefix before its final answer, by hand.
    for ex, prompt in zip(examples, captured["prompts"]):
        segments = expected_segments(style, ex.messages)
        assert prompt == ids_and_labels(tok, before_final_answer(segments))[0], ex.id
        assert ex.messages[-1][1] + style.stop == segments[len(before_final_answer(segments))][0]
    assert captured["end_ids"] == [token_id(tok, style.stop)]
    # predictions.jsonl shows what the model was given: the rendered turns, not the plain prompt
    shown = [json.loads(line)["prompt"] for line in (eval_out / "predictions.jsonl").read_text().splitlines()]
    prompts = [before_final_answer(expected_segments(style, ex.messages)) for ex in examples]
    assert shown == [tok.decode(ids_and_labels(tok, segments)[0]) for segments in prompts]


@pytest.mark.parametrize("case", CASES)
def test_profile_records_the_assistant_tokens_under_the_template(
    chat_dirs, toks, template_files, messages_file, tmp_path, case
):
    model_name, style_name, _ = CASES[case]
    option, tok, style = case_option(case, template_files), toks[model_name], STYLES[style_name]
    run_dir = tmp_path / "run"
    cli.main(
        [
            "profile",
            "--run_dir",
            str(run_dir),
            "--data",
            messages_file,
            "--proxy",
            chat_dirs[model_name],
            "--chat_template",
            option,
            "--fraction",
            "1",
            "--checkpoints",
            "2",
            "--batch_size",
            "2",
            "--micro_batch_size",
            "2",
            *QUIET,
        ]
    )
    store = rundir.RunDir(run_dir)
    meta = rundir.read_json(store.trajectories_meta)
    assert meta["complete"] and meta["config"]["chat_template"] == option
    table = pq.read_table(store.trajectories).to_pydict()
    examples = {ex.id: ex for ex in load_examples(messages_file)}
    assert table["n_tokens"] == [expected_loss_tokens(tok, style, examples[i]) for i in table["id"]]
    train_cfg = read_yaml(store.proxy.root / "train.config.yaml")
    assert train_cfg["chat_template"] == option  # the proxy trains on what is recorded


def test_a_missing_template_file_is_refused_before_any_work(tmp_path, messages_file, capsys):
    missing = str(tmp_path / "missing.jinja")
    with pytest.raises(checks.ConfigError, match="chat_template must be auto, none or a template file"):
        check_chat_template(missing)
    for command in (["score"], ["train"], ["eval"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--data", messages_file, "--chat_template", missing, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2
        assert f"no such file: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- templates that cannot work

SYNTAX_ERROR = "{% for m in messages %}\n<|{{ m['role'] }}|>\n{{ m['content'] }\n{% endfor %}"
NO_ASSISTANT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_GENERATION_PROMPT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
# Llama 2's way: nothing between the user's turn and the answer, so no generation prompt is needed.
INST = "[INST] {{ messages[0]['content'] }} [/INST]{% if messages|length > 1 %} {{ messages[1]['content'] }}{% endif %}"
NEEDS_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}\n{{ raise_exception('begin with a system turn') }}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# What each is refused with, after "chat_template FILE: ", by hand from the template's lines and what it renders.
UNUSABLE = {
    "syntax": (SYNTAX_ERROR, "line 3: Jinja syntax error: unexpected '}'"),
    "no-assistant": (NO_ASSISTANT, "renders no assistant turn: an assistant message's text is not in its output"),
    "no-generation-prompt": (
        NO_GENERATION_PROMPT,
        "writes no generation prompt: add_generation_prompt adds nothing, so an evaluation prompt would end before "
        "the assistant's header '<|assistant|>\\n'; make the template write it when add_generation_prompt is true",
    ),
    "raises": (NEEDS_SYSTEM, "line 2: rendering a conversation fails: begin with a system turn (TemplateError)"),
}
COMMANDS = {
    "score": ["score", "--chat_template"],
    "profile": ["profile", "--chat_template"],
    "train": ["train", "--chat_template"],
    "eval": ["eval", "--chat_template"],
    "experiment": ["experiment", "--train.chat_template"],
}


@pytest.mark.parametrize("case", UNUSABLE)
def test_an_unusable_template_file_is_one_line_before_any_work(tmp_path, messages_file, capsys, monkeypatch, case):
    """Once a 52-line traceback (exit status 1) from the first rendering, after the model had loaded."""
    template, cause = UNUSABLE[case]
    path = tmp_path / "t.jinja"
    path.write_text(template, encoding="utf-8")
    with pytest.raises(checks.ConfigError) as refused:
        check_chat_template(str(path))
    assert str(refused.value) == f"chat_template {path}: {cause}"
    real = cli._load

    def never_run(config):
        raise AssertionError("the command ran")

    monkeypatch.setattr(cli, "_load", lambda command: (real(command)[0], never_run))
    for name, command in COMMANDS.items():
        data = [] if name == "experiment" else ["--data", messages_file]
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, str(path), *data])
        assert exit_.value.code == 2, name
        assert capsys.readouterr().err == f"datalever {name}: error: chat_template {path}: {cause}\n"


def test_a_template_file_that_is_no_text_or_a_directory_is_one_line(tmp_path):
    """Once a UnicodeDecodeError traceback from the first rendering; a directory was "no such file"."""
    path = tmp_path / "t.jinja"
    path.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(checks.ConfigError) as refused:
        check_chat_template(str(path))
    assert str(refused.value).startswith(f"chat_template {path}: cannot read it as UTF-8 text ('utf-8' codec can't")
    with pytest.raises(checks.ConfigError, match=f"^chat_template {tmp_path}: a directory, not a template file$"):
        check_chat_template(str(tmp_path))


def test_a_template_that_needs_no_generation_prompt_is_accepted(toks, tmp_path):
    path = tmp_path / "inst.jinja"
    path.write_text(INST, encoding="utf-8")
    check_chat_template(str(path))
    ex = chat(("user", "What is 2 + 3?"), ("assistant", "#### 5"))
    tok = toks["plain"]
    encoded = Formatter(tok, str(path)).encode(ex, 512)
    prompt = tok("[INST] What is 2 + 3? [/INST]", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == prompt + tok(" #### 5", add_special_tokens=False)["input_ids"]
    assert encoded.n_prompt == len(prompt)


def test_the_tokenizers_own_template_is_checked_too(toks):
    tok = copy.deepcopy(toks["plain"])
    tok.chat_template = NO_GENERATION_PROMPT
    with pytest.raises(ValueError, match=r"^the tokenizer's chat template: writes no generation prompt: .*"):
        Formatter(tok, "auto")


def test_a_template_that_fails_on_an_example_names_it_in_one_line(toks, tmp_path):
    """A template that refuses a conversation it was not made for (a system turn, as Mistral's and Gemma's first
    templates did) once raised Jinja's TemplateError from inside the tokenizer; now one line names the example, the
    template's line and the cause."""
    path = tmp_path / "no-system.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}\n{{ raise_exception('System role not supported') }}"
        "\n{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}",
        encoding="utf-8",
    )
    formatter = Formatter(toks["plain"], str(path))  # a user turn and an answer render
    formatter.encode(SINGLE, 512)
    with pytest.raises(ValueError) as refused:
        formatter.encode(MULTI, 512)
    assert str(refused.value) == (
        f"chat_template {path} fails on example {MULTI.id}: line 2: rendering a conversation fails: System role not "
        "supported (TemplateError)"
    )
