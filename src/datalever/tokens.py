"""From examples to token ids: the prompt/response boundary, chat templates, truncation, padding and batching.

An example becomes text segments, each with or without loss (`Formatter.segments`): plainly, prompt then
response then EOS; through a chat template, the rendered conversation with the loss on every assistant turn.
Each segment is tokenized on its own, so the loss boundaries are exact, and the prompt a model is evaluated on
is the very prefix it was trained on.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from datalever.chat import check_chat_template as check_chat_template  # the configs' check, imported from here
from datalever.chat import failure, template_problem
from datalever.examples import PLAIN_ASSISTANT, Example, plain_turn

IGNORE = -100  # label of a position that carries no loss (prompt and padding)


@dataclass(frozen=True)
class Encoded:
    """One example as token ids: `input_ids[:n_prompt]` is the prompt, the rest the response."""

    id: str
    input_ids: list[int]
    n_prompt: int
    n_response_full: int  # tokens after the prompt before truncation (a conversation's later user turns too)
    # [start, end) spans after the prompt that carry no loss: a conversation's later user turns, and what a chat
    # template writes after an end-of-turn token
    masked: tuple[tuple[int, int], ...] = ()

    @property
    def n_response(self) -> int:
        """Response tokens that carry loss (the first token needs a prompt token before it)."""
        n = len(self.input_ids)
        return n - max(self.n_prompt, 1) - sum(max(0, min(end, n) - start) for start, end in self.masked if start < n)

    @property
    def fully_truncated(self) -> bool:
        """The maximum length cut the whole response away: no loss can be computed."""
        return self.n_response <= 0

    @property
    def full_length(self) -> int:
        """Prompt plus response tokens before truncation: the max_length that keeps this example whole."""
        return self.n_prompt + self.n_response_full

    @property
    def loss_end(self) -> int:
        """The max_length that keeps every token that carries loss: the full length, less what a chat template
        writes after the final end-of-turn token (masked)."""
        end = self.full_length
        for start, stop in sorted(self.masked, reverse=True):
            if stop == end:
                end = start
        return end

    @property
    def n_cut(self) -> int:
        """Response tokens the maximum length cut away (0: the example is whole; a prompt cut too counts only
        its response). Only tokens that carry loss count: a conversation's user turns cut with them do not."""
        n = len(self.input_ids)
        cut_masked = sum(end - max(start, n) for start, end in self.masked if end > n)
        return min(self.full_length - n, self.n_response_full) - cut_masked


@dataclass(frozen=True)
class Truncation:
    """How many examples lost response tokens to max_length: a loss over a cut response describes
    another target than the example's, so a run says so when it is more than a few."""

    n_examples: int
    n_cut: int  # examples that lost some of their response
    n_cut_whole: int  # of those, examples that lost all of it (flagged, no loss)
    max_length: int
    needed_length: int  # the max_length that keeps every example's loss-carrying tokens

    @classmethod
    def of(cls, encoded: Sequence[Encoded], max_length: int) -> Truncation:
        return cls(
            n_examples=len(encoded),
            n_cut=sum(e.n_cut > 0 for e in encoded),
            n_cut_whole=sum(e.fully_truncated for e in encoded),
            max_length=max_length,
            needed_length=max((e.loss_end for e in encoded), default=0),
        )

    def warning(self, limit: float = 0.01) -> str | None:
        """One line when more than `limit` of the examples lost response tokens, else None."""
        if self.n_cut <= limit * self.n_examples:
            return None
        return (
            f"{self.n_cut} of {self.n_examples} examples ({self.n_cut / self.n_examples:.1%}) lose response tokens "
            f"to max_length={self.max_length} ({self.n_cut_whole} lose all of it); "
            f"max_length={self.needed_length} keeps every example's answer whole"
        )


def chat_template_text(tokenizer, chat_template: str) -> str | None:
    """The Jinja template the option names (None: plain text)."""
    if chat_template == "none":
        return None
    if chat_template == "auto":
        template = getattr(tokenizer, "chat_template", None) or None
        # A tokenizer with several named templates: the one apply_chat_template picks by default.
        return tokenizer.get_chat_template() if isinstance(template, dict) else template
    return Path(chat_template).expanduser().read_text(encoding="utf-8")


Segment = tuple[str, bool]  # text, and whether its tokens carry loss


class TemplateFailed(Exception):
    """Rendering through the chat template raised (the cause is the template's error)."""


class Formatter:
    """How examples become token ids under one tokenizer: plainly, or through a chat template."""

    def __init__(self, tokenizer, chat_template: str = "none"):
        self.tokenizer = tokenizer
        self.template = chat_template_text(tokenizer, chat_template)
        self._option = chat_template
        problem = self.template is not None and template_problem(self._apply)
        if problem:  # a file was checked with placeholder tokens already; the tokenizer's own template is seen here
            raise ValueError(f"{self._name()}: {problem}; use --chat_template none or another template FILE")

    def _name(self) -> str:
        return "the tokenizer's chat template" if self._option == "auto" else f"chat_template {self._option}"

    def describe(self) -> str:
        return "chat template" if self.template else "plain text"

    # ----------------------------------------------------------------- segments

    def segments(self, ex: Example) -> list[Segment]:
        """The example as text segments; the last one that carries loss is the final assistant turn (with EOS when
        plain), followed under a template by what the template writes after its end-of-turn token."""
        if self.template is not None:
            try:
                return self._chat_segments(conversation(ex))
            except TemplateFailed as e:
                raise ValueError(f"{self._name()} fails on example {ex.id}: {failure(e.__cause__)}") from e.__cause__
        if ex.messages is None:
            return [(ex.prompt, False), (ex.response, True)]
        return _plain_segments(ex.messages)

    def _render(self, turns: Sequence[tuple[str, str]], *, generation_prompt: bool) -> str:
        try:
            return self._apply(turns, generation_prompt)
        except Exception as e:  # the template's own code (raise_exception on a system turn, ...): not a traceback
            raise TemplateFailed() from e

    def _apply(self, turns: Sequence[tuple[str, str]], generation_prompt: bool) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chat_segments(self, turns: Sequence[tuple[str, str]]) -> list[Segment]:
        """Render growing prefixes of the conversation: each assistant turn is the text its own rendering adds to
        the rendering of what came before it with the generation prompt (the assistant header)."""
        segments: list[Segment] = []
        done = ""
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self._render(turns[:i], generation_prompt=True)
            after = self._render(turns[: i + 1], generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise ValueError(
                    "the chat template renders a conversation's beginning differently once more turns follow, so "
                    "the assistant's tokens cannot be told apart; use --chat_template none or another template FILE"
                )
            turn = after[len(before) :]
            # What follows the end-of-turn token (Qwen's and Gemma's newline) is never generated: evaluation stops
            # at that token, so the newline carries no loss (as TRL's assistant-only templates leave it out).
            end, answer = self._closing_text, turn
            if end and end in turn and not turn.rsplit(end, 1)[1].strip():
                answer = turn[: turn.rindex(end) + len(end)]
            segments += [(before[len(done) :], False), (answer, True), (turn[len(answer) :], False)]
            done = after
        return segments

    # ----------------------------------------------------------------- token ids

    def _token_segments(self, ex: Example) -> list[tuple[list[int], bool]]:
        ids = []
        for j, (text, loss) in enumerate(_merged(self.segments(ex))):
            # Plain text: the tokenizer's own special tokens (a BOS) before the first segment. A chat template
            # writes its own (as apply_chat_template tokenizes), so a tokenizer's BOS would be a second one.
            special = self.template is None and j == 0
            ids.append((list(self.tokenizer(text, add_special_tokens=special)["input_ids"]), loss))
        if self.template is None:
            ids[-1] = (ids[-1][0] + [self.tokenizer.eos_token_id], True)  # the model learns to stop
        return ids

    def encode(self, ex: Example, max_length: int) -> Encoded:
        """Token ids cut from the right to max_length; loss on the response segments only."""
        pieces = self._token_segments(ex)
        n_prompt = len(pieces[0][0]) if not pieces[0][1] else 0
        masked, position = [], 0
        for piece, loss in pieces:
            if not loss and position >= n_prompt and position > 0:
                masked.append((position, position + len(piece)))
            position += len(piece)
        ids = [t for piece, _ in pieces for t in piece]
        return Encoded(ex.id, ids[:max_length], n_prompt, len(ids) - n_prompt, tuple(masked))

    def prompt_ids(self, ex: Example) -> list[int]:
        """What the model is given at evaluation: the tokens before the final assistant turn, exactly as in
        training (with a chat template, they end with the assistant header)."""
        pieces = self._token_segments(ex)
        final = max(j for j, (_, loss) in enumerate(pieces) if loss)
        return [t for piece, _ in pieces[:final] for t in piece]

    def stop_ids(self) -> list[int]:
        """Token ids that end an assistant turn besides EOS: with a chat template, the special token it closes
        a turn with (<|eot_id|>, <|im_end|>), when that is one token."""
        end = self._closing_token
        return [end] if end is not None else []

    @functools.cached_property
    def _closing_token(self) -> int | None:
        """The special token the template closes an assistant turn with; None for plain text or a template that
        closes turns with plain text (a newline may be part of an answer)."""
        if self.template is None:
            return None
        user = (("user", "x"),)
        before = self._render(user, generation_prompt=True)
        closing = self._render((*user, ("assistant", "y")), generation_prompt=False)[len(before) :]
        # After the content's first "y": the closing text may hold a "y" of its own (<|end_of_reply|>).
        tail = closing[closing.index("y") + 1 :].strip()
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        return ids[0] if ids and ids[0] in _special_ids(self.tokenizer) else None

    @functools.cached_property
    def _closing_text(self) -> str | None:
        """The end-of-turn token's text, where the loss stops; None where it does not stop there: no such token, or
        one that swallows the whitespace after it (rstrip: Phi-3's <|end|>), whose tokens would then differ."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).get(self._closing_token)
        return None if added is None or added.rstrip else added.content


def _special_ids(tokenizer) -> set[int]:
    """The named special tokens and every added token marked special: a base model's tokenizer (Llama 3's) has its
    chat tokens (<|eot_id|>) only among the added tokens, where all_special_ids does not look."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def conversation(ex: Example) -> tuple[tuple[str, str], ...]:
    """The example as turns: its messages, or its prompt as the user's turn and its response as the assistant's."""
    return ex.messages if ex.messages is not None else (("user", ex.prompt), ("assistant", ex.response))


def _plain_segments(turns: Sequence[tuple[str, str]]) -> list[Segment]:
    segments: list[Segment] = []
    for i, (role, content) in enumerate(turns):
        if role == "assistant":
            last = i == len(turns) - 1
            segments += [(PLAIN_ASSISTANT, False), (content if last else content + "\n", True)]
        else:
            segments.append((plain_turn(role, content), False))
    return segments


def _merged(segments: list[Segment]) -> list[Segment]:
    """Neighbouring segments of the same kind as one (tokenized together, as the text reads); empty ones that carry
    no loss dropped (an empty answer stays: in plain text its EOS carries the loss)."""
    out: list[Segment] = []
    for text, loss in segments:
        if not text and not loss:
            continue
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
        else:
            out.append((text, loss))
    return out


def encode_example(tokenizer, ex: Example, max_length: int) -> Encoded:
    """Plain text: prompt and response tokenized separately (so the boundary is exact), EOS added, cut from the
    right. The prompt keeps the tokenizer's own special tokens (e.g. a BOS); EOS teaches the model to stop."""
    return Formatter(tokenizer).encode(ex, max_length)


FIELDS = ("input_ids", "attention_mask", "labels")  # the planes of `pack`, in order


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels are the input ids on response positions and IGNORE elsewhere.

    Three n x width int64 tensors, views of one `pack` buffer (each contiguous).
    """
    return unpack(pack(batch, pad_id))


def pack(batch: Sequence[Encoded], pad_id: int, *, pin_memory: bool = False) -> torch.Tensor:
    """The batch as one 3 x n x width int64 tensor (planes in `FIELDS` order), padded with numpy.

    One buffer, so a device gets the batch in one host-to-device copy; `pin_memory` (CUDA only)
    allocates it page-locked, so that copy can run asynchronously (`non_blocking=True`). Why numpy:
    one conversion of all the ids and whole-array masks, where a tensor per example and Python
    padding took ~4.5x the host time (~255 vs ~55 ms per million tokens with the engine's other host
    steps, benchmarks/loss_engine.py on 2 CPU threads), ~70 of the ~110 ms of a 2,048-example H200 run.
    """
    lengths = np.fromiter((len(e.input_ids) for e in batch), dtype=np.int64, count=len(batch))
    starts = np.fromiter((max(e.n_prompt, 1) for e in batch), dtype=np.int64, count=len(batch))
    out = torch.empty((3, len(batch), int(lengths.max())), dtype=torch.long, pin_memory=pin_memory)
    input_ids, attention_mask, labels = out.numpy()
    cols = np.arange(input_ids.shape[1])
    real = cols < lengths[:, None]
    input_ids.fill(pad_id)
    # A boolean mask assigns in row-major order: row by row, each row's tokens left-aligned.
    input_ids[real] = np.fromiter(
        itertools.chain.from_iterable(e.input_ids for e in batch), dtype=np.int64, count=int(lengths.sum())
    )
    np.copyto(attention_mask, real)
    labels.fill(IGNORE)
    np.copyto(labels, input_ids, where=real & (cols >= starts[:, None]))
    for row, e in enumerate(batch):
        for start, end in e.masked:  # a conversation's turns between its assistant turns
            labels[row, start:end] = IGNORE
    return out


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token carries loss, as flat indices into the n x (width - 1) grid of predictions
    (row-major: the order a boolean mask selects them in). Computed on the host, where the labels are built, and sent
    with the batch, so the loss needs no device-to-host synchronisation to find them (`ResponseLoss`)."""
    keep = labels[:, 1:].numpy() != IGNORE
    return torch.from_numpy(np.flatnonzero(keep))


def unpack(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """`pack`'s buffer (on any device) as collate's dict of views."""
    return dict(zip(FIELDS, packed.unbind(0)))


def token_budget_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) stays within `token_budget`.

    Indices are sorted by length (longest first, so an out-of-memory shows up at once), which is
    the length bucketing: rows in a batch have similar lengths, so little compute goes to padding.
    A single row longer than the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (new_width * (len(current) + 1) > token_budget or full):
            batches.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches
