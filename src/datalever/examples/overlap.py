"""Leakage between splits: the examples one split shares with another, by content id or by prompt once its
template, case and spacing are folded away; and the DataError (or warning) a stage raises for them."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from datalever.examples.base import DataError, Example
from datalever.examples.formats import DEFAULT_TEMPLATES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlap:
    """The examples of split `second` that also occur in split `first` (e.g. test examples in train).

    same_id: as many share a content id (the same raw question and answer); same_prompt: as many more
    have another id but the same prompt once case and whitespace are folded (a copy with a reworded
    answer, a changed source, or different spacing). Each example of `second` counts once.
    samples: a few of them, as (id, prompt)."""

    first: str
    second: str
    size: int  # examples in `second`
    same_id: int
    same_prompt: int
    samples: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return self.same_id + self.same_prompt

    def describe(self) -> str:
        """One clause: "test shares 3 of 10 examples with train (2 same id, 1 same prompt), e.g. ..."."""
        shown = ", ".join(f"{i} {clip(prompt, 50)!r}" for i, prompt in self.samples)
        return (
            f"{self.second} shares {self.count} of {self.size} examples with {self.first} "
            f"({self.same_id} same id, {self.same_prompt} same prompt up to case and spacing), e.g. {shown}"
        )

    def to_dict(self) -> dict[str, Any]:
        """For a report: the fields, the total, and the samples as lists."""
        return {
            "first": self.first,
            "second": self.second,
            "size": self.size,
            "count": self.count,
            "same_id": self.same_id,
            "same_prompt": self.same_prompt,
            "samples": [list(s) for s in self.samples],
        }


def normalize_prompt(prompt: str) -> str:
    """The prompt's own text (out of a default template: the question, not "Question: ...\\nAnswer:") with case
    and whitespace folded: what a copy keeps when it is reworded, respaced or asked in another format (a GSM8K
    test question copied into Alpaca-format training data)."""
    return " ".join(prompt_core(prompt).casefold().split())


def _template_pattern(template: str) -> re.Pattern | None:
    """A default template with one field as a regex capturing that field's text (None for "{prompt}")."""
    parts = re.split(r"\{\w+\}", template)
    if len(parts) != 2 or not (parts[0] or parts[1]):
        return None
    return re.compile(re.escape(parts[0]) + "(.*)" + re.escape(parts[1]), re.DOTALL)


_CORE_PATTERNS = [p for p in map(_template_pattern, DEFAULT_TEMPLATES.values()) if p is not None]


def prompt_core(prompt: str) -> str:
    """The field a default template wrapped ("Question: X\\nAnswer:\\n" -> "X"), else the prompt as it is."""
    for pattern in _CORE_PATTERNS:
        match = pattern.fullmatch(prompt)
        if match:
            return match.group(1)
    return prompt


def find_overlap(named_sets: Mapping[str, Sequence[Example]], *, max_samples: int = 3) -> list[Overlap]:
    """Every pair of splits, in the mapping's order (train/validation, train/test, validation/test),
    whose second split holds examples of the first, by content id or by normalized prompt.
    Pairs that share nothing are left out, so an empty list means the splits are disjoint."""
    names = list(named_sets)
    overlaps = []
    for i, first in enumerate(names):
        ids = {ex.id for ex in named_sets[first]}
        prompts = {normalize_prompt(ex.prompt) for ex in named_sets[first]}
        for second in names[i + 1 :]:
            found = _overlap_of(first, second, ids, prompts, named_sets[second], max_samples)
            if found.count:
                overlaps.append(found)
    return overlaps


def _overlap_of(
    first: str, second: str, ids: set[str], prompts: set[str], examples: Sequence[Example], max_samples: int
) -> Overlap:
    same_id = same_prompt = 0
    samples = []
    for ex in examples:
        if ex.id in ids:
            same_id += 1
        elif normalize_prompt(ex.prompt) in prompts:
            same_prompt += 1
        else:
            continue
        if len(samples) < max_samples:
            samples.append((ex.id, ex.prompt))
    return Overlap(first, second, len(examples), same_id, same_prompt, tuple(samples))


def overlap_error(overlaps: list[Overlap]) -> DataError:
    """find_overlap's non-empty result as one DataError, for the caller to raise."""
    if not overlaps:
        raise ValueError("overlap_error needs at least one overlap; find_overlap found none")
    total = sum(o.count for o in overlaps)
    return DataError(
        f"splits overlap ({total} shared examples): "
        + "; ".join(o.describe() for o in overlaps)
        + ". Shared examples make validation and test scores measure memory; de-duplicate the splits, "
        "or set allow_overlap to proceed anyway"
    )


def check_overlap(named_sets: Mapping[str, Sequence[Example]], *, allow_overlap: bool = False) -> list[Overlap]:
    """find_overlap, raising overlap_error's DataError unless allow_overlap (then a warning).
    Returns the overlaps (empty when the splits are disjoint) for the caller's report."""
    overlaps = find_overlap(named_sets)
    if overlaps and not allow_overlap:
        raise overlap_error(overlaps)
    for o in overlaps:
        log.warning("allow_overlap: %s", o.describe())
    return overlaps


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
