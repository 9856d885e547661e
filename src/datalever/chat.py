"""Whether a chat template can work, found without a model: its Jinja compiles, and one exchange (a user turn, then
the assistant's answer) renders into something the loss and evaluation can use.

A template is rendered three times on that exchange: the user's turn with and without the generation prompt, and the
whole exchange. It must show both turns' text; the user's turn with the generation prompt must be where the whole
exchange begins (else the assistant's tokens cannot be told apart, `tokens.Formatter`); and where the assistant's
turn opens with a header ("<|assistant|>\\n"), the generation prompt must write it, or an evaluation prompt would end
before it. A template that ignores `add_generation_prompt` but needs nothing between the user's turn and the answer
(Llama 2's `[INST] ... [/INST]`) is fine.

`check_chat_template` runs these checks on a template file when a config is built (every command that takes
`--chat_template`), with placeholder special tokens; `tokens.Formatter` runs them again on the template in use, the
tokenizer's own included, with the tokenizer's tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

Turns = Sequence[tuple[str, str]]
Render = Callable[[Turns, bool], str]  # (turns, add_generation_prompt) -> text

# The exchange the checks render: texts no template writes on its own, so where they land is unambiguous.
QUESTION, ANSWER = "datalever-question-17", "datalever-answer-23"
EXCHANGE: tuple[tuple[str, str], ...] = (("user", QUESTION), ("assistant", ANSWER))

# What a template sees of a tokenizer without one at hand (apply_chat_template passes its special tokens).
PLACEHOLDER_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "sep_token": "<sep>",
    "cls_token": "<cls>",
    "mask_token": "<mask>",
    "additional_special_tokens": [],
}


def check_chat_template(value: str) -> None:
    """`auto`, `none`, or a template file that exists, compiles and renders an exchange usably (`template_problem`):
    a ConfigError naming the file, the line and the cause otherwise."""
    from datalever import checks

    if value in ("auto", "none"):
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise checks.ConfigError(f"chat_template {value}: a directory, not a template file")
    if not path.is_file():
        raise checks.ConfigError(f"chat_template must be auto, none or a template file; no such file: {value}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise checks.ConfigError(f"chat_template {value}: cannot read it as UTF-8 text ({e})") from None
    problem = template_problem(lambda turns, prompt: render_without_tokenizer(text, turns, prompt))
    if problem:
        raise checks.ConfigError(f"chat_template {value}: {problem}")


def render_without_tokenizer(template: str, turns: Turns, generation_prompt: bool) -> str:
    """The template's text for `turns`, as `apply_chat_template` renders it, with placeholder special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": role, "content": content} for role, content in turns]
    rendered, _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=generation_prompt, **PLACEHOLDER_TOKENS
    )
    return rendered[0]


def template_problem(render: Render) -> str | None:
    """What makes a template unusable, in one clause, or None: it does not compile, fails to render one exchange,
    leaves a turn out, renders the exchange's beginning otherwise once the answer follows, or writes no generation
    prompt where the assistant's turn opens with a header."""
    user = EXCHANGE[:1]
    try:
        prompt = render(user, True)
        bare = render(user, False)
        whole = render(EXCHANGE, False)
    except Exception as e:  # the template's own code: a syntax error, raise_exception(...), an undefined name
        return failure(e)
    if QUESTION not in prompt:
        return "renders no user turn: a user message's text is not in its output"
    if ANSWER not in whole:
        return "renders no assistant turn: an assistant message's text is not in its output"
    if not whole.startswith(prompt):
        same = len(os.path.commonprefix([prompt, whole]))
        return (
            "renders a conversation's beginning differently once the assistant's turn follows (with the generation "
            f"prompt: {_clip(prompt[same:])!r}; followed by the answer: {_clip(whole[same:])!r}), so the assistant's "
            "tokens cannot be told apart"
        )
    header = whole[len(prompt) : whole.index(ANSWER)]
    if prompt == bare and header.strip():
        return (
            f"writes no generation prompt: add_generation_prompt adds nothing, so an evaluation prompt would end "
            f"before the assistant's header {header!r}; make the template write it when add_generation_prompt is true"
        )
    return None


def failure(error: Exception) -> str:
    """A template's error as one clause: the line of the template (where Jinja knows it) and the cause."""
    import jinja2

    if isinstance(error, jinja2.TemplateSyntaxError):
        return f"line {error.lineno}: Jinja syntax error: {error.message}"
    line = template_line(error)
    where = f"line {line}: " if line else ""
    cause = " ".join(str(error).split()) or type(error).__name__
    return f"{where}rendering a conversation fails: {cause} ({type(error).__name__})"


def template_line(error: BaseException) -> int | None:
    """The template line being rendered when `error` was raised: Jinja rewrites its traceback so that the template's
    lines appear as frames of a file named <template>."""
    tb, line = error.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
