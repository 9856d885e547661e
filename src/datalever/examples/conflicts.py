"""Conflicting labels: examples of one source that ask the same question but give different final answers (a GSM8K
file whose two rows share a question, answered 7 and 8). Training on both teaches neither, and an evaluation grades
against whichever it reads; every loader counts them, and a stage warns about them (`on_conflict: warn`, the
default) or refuses the data (`on_conflict: error`).

"The same question" is the prompt as the leakage check compares prompts (`overlap.normalize_prompt`): the question
out of a default template, case and spacing folded. Within one source the template is the same for every row, so
this differs from the exact text only for copies that were re-cased or respaced: the same question to a reader.

"A different answer" is a different final answer as an evaluation reads the gold answer (`answers.find_answer`:
`####`, "the answer is", `\\boxed{}`, a response that is one expression, else its last value), compared as a value
(`1,234` = `1234`, `2.5` = `5/2` = `\\frac{5}{2}`; other expressions as text without spaces; math-verify is not
run while loading). A solution reworded around the same answer is no conflict; a response with no answer to read is
compared as its text, case and spacing folded.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from datalever.answers import exact_value, find_answer
from datalever.examples.base import DataError, Example
from datalever.examples.formats import place_numbers
from datalever.examples.overlap import clip, normalize_prompt, prompt_core

log = logging.getLogger(__name__)

ON_CONFLICT = ("warn", "error")  # the option's values; loaders also take "ignore" (`data check` reports them itself)
_REPORTED: set[tuple] = set()  # conflicts already warned about in this process (an experiment reads a file many times)


@dataclass(frozen=True)
class Conflict:
    """One question asked with different final answers: the examples' places in the source ("line 3"), in order, and
    the distinct answers, as first given."""

    prompt: str
    answers: tuple[str, ...]
    places: tuple[str, ...]
    key: tuple = ()  # the folded prompt and the answers' values: what a warning was already given for


@dataclass(frozen=True)
class Conflicts:
    """The conflicting labels of one source (`groups` empty: none)."""

    source: str
    groups: tuple[Conflict, ...] = ()

    @property
    def n_examples(self) -> int:
        """Examples whose prompt another example answers otherwise."""
        return sum(len(g.places) for g in self.groups)

    def describe(self) -> str:
        """One clause: "data.jsonl: 2 examples (1 prompt) share a prompt but not its final answer: lines 1 and 2
        ('Tom has 3 apples...': 7 vs 8)"."""
        return f"{self.source}: {self.summary()}"

    def summary(self, shown: int = 3) -> str:
        """describe() without the source's name; "none" when there are none."""
        if not self.groups:
            return "none"
        named = ", ".join(
            f"{_places(g.places)} ({clip(g.prompt, 40)!r}: {' vs '.join(clip(a, 20) for a in g.answers)})"
            for g in self.groups[:shown]
        )
        more = f", and {len(self.groups) - shown} more" if len(self.groups) > shown else ""
        prompts = f"{len(self.groups)} prompt{'s' if len(self.groups) != 1 else ''}"
        return f"{self.n_examples} examples ({prompts}) share a prompt but not its final answer: {named}{more}"


def find_conflicts(source: str, examples: Sequence[Example], places: Sequence[str]) -> Conflicts:
    """The prompts of `examples` (at `places` in `source`) asked with more than one final answer, in file order."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_prompt[normalize_prompt(ex.prompt)].append(i)
    groups = []
    for folded, rows in by_prompt.items():
        if len(rows) < 2:
            continue
        answers: dict[object, str] = {}  # value -> the answer as first written
        for i in rows:
            value, written = final_answer(examples[i].response)
            answers.setdefault(value, written)
        if len(answers) > 1:
            key = (folded, frozenset(answers))
            prompt = prompt_core(examples[rows[0]].prompt).strip()
            groups.append(Conflict(prompt, tuple(answers.values()), tuple(places[i] for i in rows), key))
    return Conflicts(source, tuple(groups))


def final_answer(response: str) -> tuple[object, str]:
    """A response's final answer as something to compare (an exact value, else text without spaces) and as written;
    a response with no answer to read, as its folded text."""
    answer = find_answer(response).answer
    if answer is None:
        text = " ".join(response.casefold().split())
        return ("text", text), text
    value: Fraction | None = exact_value(answer)
    return (("value", value) if value is not None else ("text", re.sub(r"\s+", "", answer))), answer


def check_conflicts(conflicts: Conflicts, on_conflict: str) -> None:
    """Refuse the source's conflicting labels (`error`), or say so in one line (`warn`: once a process for the same
    conflicts), or neither (`ignore`)."""
    if not conflicts.groups or on_conflict == "ignore":
        return
    if on_conflict == "error":
        raise DataError(
            f"{conflicts.describe()}; correct or remove them, or set on_conflict warn to use the data as it is"
        )
    new = {g.key for g in conflicts.groups} - _REPORTED
    if new:
        _REPORTED.update(new)
        log.warning(
            "warning: %s; no model can be right on both (on_conflict error refuses such data)", conflicts.describe()
        )


def _places(places: Sequence[str], most: int = 4) -> str:
    """ "lines 1 and 2" from ("line 1", "line 2"); "lines 1, 4, 6, 9, ... (12 in all)" for many."""
    unit = places[0].split()[0] + "s"
    if len(places) > most:
        return f"{unit} {', '.join(p.split()[-1] for p in places[:most])}, ... ({len(places)} in all)"
    return f"{unit} {place_numbers(list(places), list(range(len(places))))}"
