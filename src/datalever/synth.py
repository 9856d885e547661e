"""The embedded default dataset: short math word problems in GSM8K format, made offline.

    generate(n, seed)          -> records {question, answer, steps, digits, ops, level, kind}
    write_splits(out_dir)      -> train/validation/test JSONL files that share no problem
    variants(example, n, seed) -> new problems with the same kind, level and step count

Why synthetic: the pipeline needs a dataset that runs anywhere with no download, and whose
difficulty is known, so that "hard" clusters found from loss trajectories can be checked against
the truth. The mix is deliberately uneven (many easy, few hard) because that is the setting in
which simplicity bias shows: the hard tail is under-learned.

Each problem *kind* is one function that draws numbers, picks one of several wordings, and
writes the worked answer through `_Work.step`, which computes every result itself, so the
arithmetic an answer shows is right by construction. Texts are kept short for CPU training.
Everything random goes through one `random.Random`; nothing touches global state.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from datalever import checks, rundir
from datalever.examples import DEFAULT_TEMPLATES, LEVELS, Example, content_id

# Shares of easy, medium and hard problems: uneven (the hard tail is the smallest), with enough hard problems
# that the base model learns some of them late in training (issue 14; docs/results/testbed/).
MIX = (0.5, 0.3, 0.2)
SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------
# Word pools: names (with pronouns), objects, items with prices, synonyms. FEMALE, MALE and OBJECTS are
# public: pretrain.py's drills draw names and objects from them too.
# --------------------------------------------------------------------------------------------

FEMALE = [
    "Ava",
    "Mia",
    "Lena",
    "Sofia",
    "Nora",
    "Priya",
    "Hana",
    "Zoe",
    "Grace",
    "Maya",
    "Chloe",
    "Aisha",
    "Elena",
    "Ruth",
    "Ines",
    "Yuki",
    "Fatima",
    "Olga",
]
MALE = [
    "Ben",
    "Omar",
    "Leo",
    "Noah",
    "Ravi",
    "Kenji",
    "Lucas",
    "Ethan",
    "Diego",
    "Felix",
    "Tariq",
    "Jonas",
    "Marco",
    "Eli",
    "Sam",
    "Kwame",
    "Ivan",
    "Hugo",
]
OBJECTS = [
    "marbles",
    "stickers",
    "apples",
    "seashells",
    "baseball cards",
    "pencils",
    "stamps",
    "cookies",
    "books",
    "toy cars",
    "beads",
    "crayons",
    "strawberries",
    "postcards",
    "balloons",
    "eggs",
    "buttons",
    "comic books",
]
_CONTAINERS = ["box", "jar", "basket", "bag", "drawer", "crate", "bucket"]
_GAIN_PAST = ["bought", "found", "was given", "got", "received", "collected", "won"]
_LOSE_PAST = ["gave away", "lost", "sold", "traded away", "handed out", "donated"]
_CHEAP_ITEMS = [
    ("pen", "pens"),
    ("notebook", "notebooks"),
    ("sandwich", "sandwiches"),
    ("ticket", "tickets"),
    ("toy car", "toy cars"),
    ("mug", "mugs"),
    ("candle", "candles"),
    ("juice box", "juice boxes"),
    ("magazine", "magazines"),
]
_DEAR_ITEMS = [
    ("jacket", "jackets"),
    ("lamp", "lamps"),
    ("chair", "chairs"),
    ("bike", "bikes"),
    ("backpack", "backpacks"),
    ("tent", "tents"),
    ("guitar", "guitars"),
    ("printer", "printers"),
    ("rug", "rugs"),
]
_BAKED = [
    ("muffin", "muffins"),
    ("pie", "pies"),
    ("cake", "cakes"),
    ("bagel", "bagels"),
    ("croissant", "croissants"),
    ("cookie tin", "cookie tins"),
    ("loaf of bread", "loaves of bread"),
]
_PARTS = [
    (
        "legs",
        "farm",
        [("cows", 4), ("hens", 2), ("goats", 4), ("ducks", 2), ("spiders", 8), ("beetles", 6), ("horses", 4)],
    ),
    (
        "wheels",
        "parking lot",
        [("cars", 4), ("bikes", 2), ("tricycles", 3), ("trucks", 6), ("motorbikes", 2), ("vans", 4)],
    ),
]
_WORK = [
    ("pack", "boxes", "truck", "trucks"),
    ("bake", "loaves", "crate", "crates"),
    ("make", "candles", "carton", "cartons"),
    ("fill", "jars", "case", "cases"),
    ("sew", "shirts", "bundle", "bundles"),
    ("print", "posters", "package", "packages"),
]
_TOTAL = ["in total", "altogether", "in all"]
_FRACTIONS = [("half", 2), ("a third", 3), ("a quarter", 4)]
_FRACTION_WORDS = [word for word, _ in _FRACTIONS]
_GOALS = ["a laptop", "a trip", "a used car", "a new phone", "a bike", "a camera"]


def _people(rng: random.Random, k: int) -> list[dict[str, str]]:
    """k distinct people, each with the pronoun forms the templates use."""
    names = rng.sample([(n, "f") for n in FEMALE] + [(n, "m") for n in MALE], k)
    out = []
    for name, g in names:
        he, him, his = ("she", "her", "her") if g == "f" else ("he", "him", "his")
        out.append(
            {
                "name": name,
                "he": he,
                "He": he.capitalize(),
                "him": him,
                "his": his,
                "His": his.capitalize(),
                "himself": him + "self" if g == "f" else "himself",
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Worked answers
# --------------------------------------------------------------------------------------------


class _Work:
    """The step lines of an answer. Every result is computed here, never typed into a template,
    so the arithmetic an answer shows is right by construction."""

    def __init__(self, ctx: dict) -> None:
        self.ctx = ctx  # names for the sentences ({name}, {he}, {obj}, ...)
        self.lines: list[str] = []

    def step(self, sentence: str, *tokens: int | str) -> int:
        """tokens = a, op, b[, op, c], evaluated left to right (so a chain uses only * and /);
        the sentence's "{}" becomes "a op b = c". Results must be non-negative integers."""
        ops = tokens[1::2]
        if len(ops) > 1 and not set(ops) <= {"*", "/"}:
            raise ValueError(f"mixed-precedence chain {tokens}")
        value = Fraction(tokens[0])
        for op, b in zip(ops, tokens[2::2]):
            value = {"+": value + b, "-": value - b, "*": value * b, "/": value / b}[op]
        if value.denominator != 1 or value < 0:
            raise ValueError(f"step {tokens} gives {value}, not a non-negative integer")
        expr = " ".join(str(t) for t in tokens) + f" = {int(value)}"
        self.lines.append(_fill(sentence.replace("{}", "\x00"), self.ctx).replace("\x00", expr))
        return int(value)


def _fill(template: str, ctx: dict) -> str:
    """Fill a template; a leading lower-case letter (a pronoun opening a sentence) is capitalized."""
    text = template.format(**ctx)
    return text[:1].upper() + text[1:]


class _Problem:
    def __init__(self, kind: str, question: str, work: _Work, result: int) -> None:
        self.kind, self.question, self.work, self.result = kind, question, work, result

    @property
    def answer(self) -> str:
        return "\n".join(self.work.lines) + f"\n#### {self.result}"

    @property
    def key(self) -> tuple:
        """Same kind and same numbers (fractions given in words included) = same problem, however it is worded:
        splits and variants compare keys, so a paraphrase never counts as a new problem."""
        return _key(self.kind, self.question)

    def record(self, level: str) -> dict:
        lines = "\n".join(self.work.lines)
        ops = [o for o in "+-*/" if f" {o} " in lines]
        return {
            "question": self.question,
            "answer": self.answer,
            "steps": len(self.work.lines),
            "digits": len(str(max(_ints(self.question + " " + lines)))),
            "ops": ",".join(ops),
            "level": level,
            "kind": self.kind,
        }


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _key(kind: str, question: str) -> tuple:
    """A problem's identity: its kind and its numbers, the fractions given in words included (or "half" and "a
    third" of the same numbers would count as one problem, and a kind's problem space would look smaller)."""
    words = [word for word in _FRACTION_WORDS if re.search(rf"\b{word}\b", question)]
    return (kind, tuple(sorted(_ints(question))), tuple(words))


def _problem(rng: random.Random, templates: list[str], ctx: dict) -> tuple[str, _Work]:
    """Pick one wording; returns the question and an empty _Work sharing the context."""
    return _fill(rng.choice(templates), ctx), _Work(ctx)


# --------------------------------------------------------------------------------------------
# Easy kinds: 1-2 steps, numbers below 100, + and -
# --------------------------------------------------------------------------------------------


def _add_more(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    ctx = dict(
        p,
        a=rng.randint(5, 60),
        b=rng.randint(2, 40),
        obj=rng.choice(OBJECTS),
        box=rng.choice(_CONTAINERS),
        gain=rng.choice(_GAIN_PAST),
        total=rng.choice(_TOTAL),
    )
    q, line = rng.choice(
        [  # each wording with the step sentence that fits it
            (
                "{name} had {a} {obj}. Then {he} {gain} {b} more {obj}. How many {obj} does {name} have now?",
                "{name} has {} {obj} now.",
            ),
            (
                "There are {a} {obj} in a {box}. {name} puts {b} more {obj} in it. How many {obj} are in the {box} "
                "now?",
                "The {box} has {} {obj}.",
            ),
            (
                "{name} {gain} {b} {obj} today. Before that, {he} already had {a}. How many {obj} does {he} have "
                "{total}?",
                "{he} has {} {obj}.",
            ),
            (
                "How many {obj} does {name} have if {he} started with {a} {obj} and then {gain} {b} more?",
                "{name} has {} {obj}.",
            ),
        ]
    )
    w = _Work(ctx)
    c = w.step(line, ctx["a"], "+", ctx["b"])
    return _Problem("add_more", _fill(q, ctx), w, c)


def _take_away(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    a = rng.randint(10, 90)
    ctx = dict(
        p,
        a=a,
        b=rng.randint(2, a - 3),
        obj=rng.choice(OBJECTS),
        box=rng.choice(_CONTAINERS),
        lose=rng.choice(_LOSE_PAST),
    )
    templates = [
        (
            "{name} had {a} {obj}. {He} {lose} {b} of them. How many {obj} does {name} have left?",
            "{name} has {} {obj} left.",
        ),
        (
            "A {box} held {a} {obj}. {name} took {b} of them out. How many {obj} are still in the {box}?",
            "The {box} still has {} {obj}.",
        ),
        (
            "{name} needs {a} {obj} for a school project and already has {b}. How many more {obj} does {he} need?",
            "{he} needs {} more {obj}.",
        ),
        (
            "If {name} started with {a} {obj} and {lose} {b}, how many {obj} does {he} have now?",
            "{he} has {} {obj} now.",
        ),
    ]
    q, line = rng.choice(templates)  # each wording with the step sentence that fits it
    w = _Work(ctx)
    c = w.step(line, ctx["a"], "-", ctx["b"])
    return _Problem("take_away", _fill(q, ctx), w, c)


def _add_then_sub(rng: random.Random) -> _Problem:
    p, p2 = _people(rng, 2)
    a, b = rng.randint(5, 50), rng.randint(2, 30)
    ctx = dict(
        p,
        a=a,
        b=b,
        c=rng.randint(2, a + b - 2),
        obj=rng.choice(OBJECTS),
        box=rng.choice(_CONTAINERS),
        gain=rng.choice(_GAIN_PAST),
        lose=rng.choice(_LOSE_PAST),
        other=p2["name"],
    )
    q, w = _problem(
        rng,
        [
            "{name} had {a} {obj}. {He} {gain} {b} more and then {lose} {c}. How many {obj} does {he} have now?",
            "A {box} has {a} {obj}. {name} adds {b} {obj}, and later {other} takes {c} out. How many {obj} are in "
            "the {box} at the end?",
            "{name} started the day with {a} {obj}. In the morning {he} {gain} {b}. In the afternoon {he} {lose} "
            "{c}. How many {obj} are left?",
            "How many {obj} does {name} have after {he} {gain} {b} {obj} and {lose} {c}, if {he} began with {a}?",
        ],
        ctx,
    )
    x = w.step("First there are {} {obj}.", ctx["a"], "+", ctx["b"])
    y = w.step("Then there are {} {obj} left.", x, "-", ctx["c"])
    return _Problem("add_then_sub", q, w, y)


def _compare(rng: random.Random) -> _Problem:
    p, p2 = _people(rng, 2)
    b = rng.randint(3, 60)
    ctx = dict(A=p["name"], B=p2["name"], a=b + rng.randint(2, 40), b=b, obj=rng.choice(OBJECTS))
    q, w = _problem(
        rng,
        [
            "{A} has {a} {obj} and {B} has {b} {obj}. How many more {obj} does {A} have than {B}?",
            "{B} collected {b} {obj}. {A} collected {a}. How many fewer {obj} did {B} collect than {A}?",
            "How many more {obj} does {A} have than {B}, if {A} has {a} {obj} and {B} has {b}?",
            "{A} and {B} count their {obj}. {A} has {a} and {B} has {b}. What is the difference?",
        ],
        ctx,
    )
    c = w.step("{A} has {} more {obj} than {B}.", ctx["a"], "-", ctx["b"])
    return _Problem("compare", q, w, c)


def _two_people_total(rng: random.Random) -> _Problem:
    p, p2 = _people(rng, 2)
    a, more = rng.randint(8, 60), rng.random() < 0.6
    ctx = dict(
        A=p["name"],
        B=p2["name"],
        a=a,
        d=rng.randint(2, 30) if more else rng.randint(2, a - 2),
        obj=rng.choice(OBJECTS),
        total=rng.choice(_TOTAL),
        rel="more" if more else "fewer",
    )
    q, w = _problem(
        rng,
        [
            "{A} has {a} {obj}. {B} has {d} {rel} {obj} than {A}. How many {obj} do they have {total}?",
            "{B} has {d} {rel} {obj} than {A}, who has {a}. How many {obj} do {A} and {B} have together?",
            "{A} picked {a} {obj}. {B} picked {d} {rel} than {A}. How many {obj} did the two of them pick {total}?",
        ],
        ctx,
    )
    b = w.step("{B} has {} {obj}.", ctx["a"], "+" if more else "-", ctx["d"])
    t = w.step("Together they have {} {obj}.", ctx["a"], "+", b)
    return _Problem("two_people_total", q, w, t)


# --------------------------------------------------------------------------------------------
# Medium kinds: 2-3 steps, multiplication and exact division with small numbers
# --------------------------------------------------------------------------------------------


def _packs_plus(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    ctx = dict(
        p,
        n=rng.randint(2, 12),
        k=rng.randint(3, 15),
        e=rng.randint(1, 25),
        obj=rng.choice(OBJECTS),
        box=rng.choice(_CONTAINERS),
        total=rng.choice(_TOTAL),
    )
    q, w = _problem(
        rng,
        [
            "{name} buys {n} packs of {obj} with {k} {obj} in each pack. {He} already had {e} {obj}. How many {obj} "
            "does {he} have now?",
            "A store has {n} boxes of {obj}, each holding {k}, plus {e} loose {obj} on a shelf. How many {obj} does "
            "the store have?",
            "{name} has {e} {obj} and gets {n} more bags of them. Each bag has {k} {obj}. How many {obj} does {name} "
            "have {total}?",
        ],
        ctx,
    )
    x = w.step("The packs hold {} {obj}.", ctx["n"], "*", ctx["k"])
    t = w.step("In all there are {} {obj}.", x, "+", ctx["e"])
    return _Problem("packs_plus", q, w, t)


def _share_after(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    f, each, c = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 15)
    ctx = dict(p, a=f * each + c, c=c, f=f, obj=rng.choice(OBJECTS), box=rng.choice(_CONTAINERS))
    q, w = _problem(
        rng,
        [
            "{name} has {a} {obj}. {He} keeps {c} for {himself} and shares the rest equally among {f} friends. How "
            "many {obj} does each friend get?",
            "There are {a} {obj} in a {box}. {name} takes out {c}, then splits the rest equally into {f} bags. How "
            "many {obj} go in each bag?",
            "How many {obj} does each of {f} friends get if {name} gives away {c} of {his} {a} {obj} first and "
            "shares the rest equally among them?",
        ],
        ctx,
    )
    r = w.step("{} {obj} are shared.", ctx["a"], "-", c)
    e = w.step("Each share is {} {obj}.", r, "/", f)
    return _Problem("share_after", q, w, e)


def _shopping(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    (i1, i1s), (i2, i2s) = rng.sample(_CHEAP_ITEMS, 2)
    ctx = dict(
        p,
        i1=i1,
        i1s=i1s,
        i2=i2,
        i2s=i2s,
        p1=rng.randint(2, 20),
        p2=rng.randint(2, 20),
        n1=rng.randint(2, 9),
        n2=rng.randint(2, 9),
    )
    q, w = _problem(
        rng,
        [
            "A {i1} costs ${p1} and a {i2} costs ${p2}. {name} buys {n1} {i1s} and {n2} {i2s}. How much does {he} "
            "spend?",
            "{name} buys {n1} {i1s} at ${p1} each and {n2} {i2s} at ${p2} each. How many dollars does {name} spend "
            "in all?",
            "How much does {name} pay for {n1} {i1s} and {n2} {i2s}, if {i1s} cost ${p1} each and {i2s} cost ${p2} "
            "each?",
        ],
        ctx,
    )
    x = w.step("The {i1s} cost {} dollars.", ctx["n1"], "*", ctx["p1"])
    y = w.step("The {i2s} cost {} dollars.", ctx["n2"], "*", ctx["p2"])
    t = w.step("{name} spends {} dollars.", x, "+", y)
    return _Problem("shopping", q, w, t)


def _change_left(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    item, items = rng.choice(_CHEAP_ITEMS)
    n, price = rng.randint(2, 9), rng.randint(2, 15)
    ctx = dict(p, items=items, n=n, price=price, m=n * price + rng.randint(1, 40))
    q, w = _problem(
        rng,
        [
            "{name} has ${m}. {He} buys {n} {items} that cost ${price} each. How much money does {he} have left?",
            "{name} went to the store with ${m} and bought {n} {items} for ${price} each. How many dollars did {he} "
            "bring home?",
            "{n} {items} cost ${price} each. If {name} pays for them out of {his} ${m}, how much money is left?",
        ],
        ctx,
    )
    x = w.step("The {items} cost {} dollars.", n, "*", price)
    y = w.step("{name} has {} dollars left.", ctx["m"], "-", x)
    return _Problem("change_left", q, w, y)


def _count_parts(rng: random.Random) -> _Problem:
    part, place, things = rng.choice(_PARTS)
    (t1, l1), (t2, l2) = rng.sample(things, 2)
    ctx = dict(
        part=part,
        place=place,
        t1=t1,
        t2=t2,
        l1=l1,
        l2=l2,
        n1=rng.randint(2, 30),
        n2=rng.randint(2, 30),
        total=rng.choice(_TOTAL),
    )
    q, w = _problem(
        rng,
        [
            "A {place} has {n1} {t1} and {n2} {t2}. Each of the {t1} has {l1} {part} and each of the {t2} has {l2}. "
            "How many {part} are there {total}?",
            "There are {n2} {t2} with {l2} {part} each and {n1} {t1} with {l1} {part} each at the {place}. How many "
            "{part} are there?",
            "How many {part} are there {total} if a {place} has {n1} {t1} with {l1} {part} each and {n2} {t2} with "
            "{l2} {part} each?",
        ],
        ctx,
    )
    x = w.step("The {t1} have {} {part}.", ctx["n1"], "*", l1)
    y = w.step("The {t2} have {} {part}.", ctx["n2"], "*", l2)
    t = w.step("There are {} {part}.", x, "+", y)
    return _Problem("count_parts", q, w, t)


# --------------------------------------------------------------------------------------------
# Hard kinds: 4-5 steps (about half of three kinds take an optional 5th), numbers mostly below
# a few hundred, percentages, fractions, rates. Hard means a longer chain of the operations the
# easier tiers teach, kept small enough that a 1M-parameter model can learn it late in training
# (issue 14: with 4-7 steps and 3-4-digit numbers it stayed at 0-3% in every arm, so it could not
# show whether upsampling helps; docs/results/testbed/ has the measurements behind this tier).
# --------------------------------------------------------------------------------------------


def _discount(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    item, items = rng.choice(_DEAR_ITEMS)
    price, pct, n = 10 * rng.randint(1, 10), rng.choice([10, 20, 50]), rng.randint(2, 5)
    cost = n * (price - price * pct // 100)  # price is a multiple of 10, pct of 10: exact
    ship = rng.choice([0, rng.randint(2, 20)])  # the optional 5th step
    ctx = dict(
        p,
        item=item,
        items=items,
        price=price,
        pct=pct,
        n=n,
        ship=ship,
        budget=cost + ship + 10 * rng.randint(1, 10),
        sc=f" and pays ${ship} for shipping" if ship else "",
        sc2=f" and paying ${ship} for shipping" if ship else "",
        ss=f" Shipping costs ${ship}." if ship else "",
    )
    q, w = _problem(
        rng,
        [
            "A {item} usually costs ${price}, but this week it is {pct}% off. {name} buys {n} of them{sc}. If {he} "
            "had ${budget}, how much money does {he} have left?",
            "{name} has ${budget}. {He} buys {n} {items} that normally cost ${price} each, with {pct}% off each "
            "one.{ss} How much money remains?",
            "A store takes {pct}% off its ${price} {items}. How much will {name} have left from ${budget} after "
            "buying {n} {items}{sc2}?",
        ],
        ctx,
    )
    off = w.step("The discount is {} dollars.", price, "*", pct, "/", 100)
    sale = w.step("One {item} costs {} dollars.", price, "-", off)
    total = w.step("{n} {items} cost {} dollars.", n, "*", sale)
    if ship:
        total = w.step("With shipping: {} dollars.", total, "+", ship)
    left = w.step("{name} has {} dollars left.", ctx["budget"], "-", total)
    return _Problem("discount", q, w, left)


def _team_rate(rng: random.Random) -> _Problem:
    a, b = _people(rng, 2)
    verb, things, box, boxes = rng.choice(_WORK)
    sell = rng.random() < 0.5  # the optional 5th step
    while True:  # draw until the output fills whole containers
        ra, rb = rng.randint(2, 12), rng.randint(2, 12)
        h, d, k = rng.randint(2, 6), rng.randint(2, 5), rng.choice([2, 4, 5, 10])
        if (ra + rb) * h * d % k == 0:
            break
    ctx = dict(
        verb=verb,
        things=things,
        box=box,
        boxes=boxes,
        h=h,
        d=d,
        k=k,
        e=rng.randint(2, 15),
        A=a["name"],
        B=b["name"],
        a=ra,
        b=rb,
    )
    who = "{A} can {verb} {a} {things} an hour and {B} can {verb} {b}"
    ask = "Each {box} sells for ${e}. How much money do they make?" if sell else "How many {boxes} do they fill?"
    q, w = _problem(
        rng,
        [
            who + ". They work together {h} hours a day for {d} days and pack the {things} in {boxes} of {k}. " + ask,
            "The {things} go in {boxes} of {k}. " + who + ", working {h} hours a day for {d} days. " + ask,
        ],
        ctx,
    )
    r = w.step("Together: {} {things} an hour.", ra, "+", rb)
    x = w.step("Per day: {} {things}.", r, "*", h)
    y = w.step("In {d} days: {} {things}.", x, "*", d)
    z = w.step("That fills {} {boxes}.", y, "/", k)
    if sell:
        z = w.step("They make {} dollars.", z, "*", ctx["e"])
    return _Problem("team_rate", q, w, z)


def _percent_chain(rng: random.Random) -> _Problem:
    a, b, c = _people(rng, 3)
    while True:  # B's count must split evenly into C's fraction
        n, pct = 10 * rng.randint(1, 30), rng.choice([10, 20, 30, 50])
        frac, div = rng.choice(_FRACTIONS)
        if (n + n * pct // 100) % div == 0:
            break
    ctx = dict(
        A=a["name"],
        B=b["name"],
        C=c["name"],
        n=n,
        pct=pct,
        frac=frac,
        obj=rng.choice(OBJECTS),
        total=rng.choice(_TOTAL),
    )
    q, w = _problem(
        rng,
        [
            "{A} has {n} {obj}. {B} has {pct}% more {obj} than {A}. {C} has {frac} as many {obj} as {B}. How many "
            "{obj} do {B} and {C} have {total}?",
            "{C} has {frac} as many {obj} as {B}, and {B} has {pct}% more than {A}. If {A} has {n} {obj}, how many "
            "{obj} do {B} and {C} have {total}?",
            "{A} collected {n} {obj}. {B} collected {pct}% more than {A}, and {C} collected {frac} as many as {B}. "
            "How many {obj} did {B} and {C} collect {total}?",
        ],
        ctx,
    )
    x = w.step("{B} has {} more than {A}.", n, "*", pct, "/", 100)
    bv = w.step("{B} has {} {obj}.", n, "+", x)
    cv = w.step("{C} has {} {obj}.", bv, "/", div)
    t = w.step("{B} and {C} have {} {obj}.", bv, "+", cv)
    return _Problem("percent_chain", q, w, t)


def _savings(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    while True:  # something must be left to save
        wage, h, d, rent = rng.randint(2, 10), rng.randint(2, 5), rng.randint(2, 5), 10 * rng.randint(1, 5)
        if wage * h * d - rent >= 20:
            break
    saved, weeks = wage * h * d - rent, rng.randint(2, 6)
    have = rng.choice([0, 10 * rng.randint(1, 20)])  # the optional 5th step
    ctx = dict(
        p,
        wage=wage,
        h=h,
        d=d,
        rent=rent,
        goal_cost=have + weeks * saved,
        have=have,
        goal=rng.choice(_GOALS),
        hs=f" {p['He']} has already saved ${have}." if have else "",
    )
    q, w = _problem(
        rng,
        [
            "{name} earns ${wage} an hour and works {h} hours a day, {d} days a week. Each week {he} spends "
            "${rent} on rent.{hs} How many weeks until {he} has ${goal_cost}?",
            "{name} wants ${goal_cost} for {goal}. {He} works {d} days a week, {h} hours a day, at ${wage} an hour. "
            "Each week rent is ${rent}.{hs} How many weeks does {he} need?",
        ],
        ctx,
    )
    x = w.step("Per day: {} dollars.", wage, "*", h)
    y = w.step("Per week: {} dollars.", x, "*", d)
    s = w.step("Saved per week: {} dollars.", y, "-", rent)
    need = ctx["goal_cost"]
    if have:
        need = w.step("Still needed: {} dollars.", need, "-", have)
    n = w.step("Weeks: {}.", need, "/", s)
    return _Problem("savings", q, w, n)


def _bakery(rng: random.Random) -> _Problem:
    (p,) = _people(rng, 1)
    (_, i1s), (_, i2s) = rng.sample(_BAKED, 2)
    n1, n2, p1, p2 = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 9)
    ctx = dict(p, i1s=i1s, i2s=i2s, n1=n1, n2=n2, p1=p1, p2=p2, days=rng.randint(2, 5))
    q, w = _problem(
        rng,
        [
            "A bakery sells {n1} {i1s} at ${p1} each and {n2} {i2s} at ${p2} each every day. How much "
            "money does it take in over {days} days?",
            "Each day {name}'s stand sells {n1} {i1s} for ${p1} each and {n2} {i2s} for ${p2} each. How much "
            "money does {he} take in over {days} days?",
            "How much money does a cafe take in over {days} days if it sells {n1} {i1s} "
            "at ${p1} and {n2} {i2s} at ${p2} daily?",
        ],
        ctx,
    )
    x = w.step("{i1s}: {} dollars.", n1, "*", p1)
    y = w.step("{i2s}: {} dollars.", n2, "*", p2)
    s = w.step("Daily sales: {} dollars.", x, "+", y)
    t = w.step("In {days} days: {} dollars.", s, "*", ctx["days"])
    return _Problem("bakery", q, w, t)


KINDS: dict[str, dict[str, Callable[[random.Random], _Problem]]] = {
    "easy": {
        "add_more": _add_more,
        "take_away": _take_away,
        "add_then_sub": _add_then_sub,
        "compare": _compare,
        "two_people_total": _two_people_total,
    },
    "medium": {
        "packs_plus": _packs_plus,
        "share_after": _share_after,
        "shopping": _shopping,
        "change_left": _change_left,
        "count_parts": _count_parts,
    },
    "hard": {
        "discount": _discount,
        "team_rate": _team_rate,
        "percent_chain": _percent_chain,
        "savings": _savings,
        "bakery": _bakery,
    },
}
LEVEL_OF = {kind: level for level, kinds in KINDS.items() for kind in kinds}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def generate(n: int, seed: int, *, mix: tuple[float, float, float] = MIX) -> list[dict]:
    """n distinct problems, deterministic in `seed`; `mix` = shares of easy, medium, hard,
    met exactly up to rounding. Records: question, answer, steps, digits, ops, level, kind."""
    return _generate(n, random.Random(seed), mix, seen=set())


def write_splits(
    out_dir: str,
    *,
    n_train: int = 2000,
    n_val: int = 300,
    n_test: int = 500,
    seed: int = 0,
    mix: tuple[float, float, float] = MIX,
) -> dict[str, str]:
    """Write train/validation/test JSONL files atomically; no problem (same kind and numbers,
    whatever the wording) is in two splits. Returns {split: path}."""
    rng, seen, paths = random.Random(seed), set(), {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        records = _generate(n, rng, mix, seen)  # `seen` is shared: that is what keeps splits apart
        paths[split] = str(rundir.DataDir(out_dir).file(split))
        rundir.atomic_write_text(paths[split], "".join(json.dumps(r) + "\n" for r in records))
    return paths


def variants(example: Example, n: int = 1, seed: int = 0, *, template: str | None = None) -> list[Example]:
    """Variational problem synthesis: n new problems with the same kind, level and number of
    steps as `example` (a synth problem, loaded with its meta), but new names, numbers and
    wording. The prompt uses `template` (default: the GSM8K one) and the id is the content id a
    GSM8K loader would give the same question and answer."""
    kind, steps = example.meta.get("kind"), example.meta.get("steps")
    if kind not in LEVEL_OF or steps is None:
        raise ValueError(
            f"example {example.id}: variants need meta 'kind' (one of {sorted(LEVEL_OF)}) "
            f"and 'steps', as synth files record; got meta {example.meta}"
        )
    level, make = LEVEL_OF[kind], KINDS[LEVEL_OF[kind]][kind]
    rng = random.Random(f"variants:{seed}:{example.id}")  # differs per parent, repeatable per seed
    seen = {_key(kind, example.prompt)}  # the parent's own numbers are not new
    out: list[Example] = []
    for _ in range(1000 * n):
        if len(out) == n:
            return out
        prob = make(rng)
        if len(prob.work.lines) != int(steps) or prob.key in seen:
            continue
        seen.add(prob.key)
        out.append(_to_example(prob.record(level), template, example))
    raise RuntimeError(f"could not make {n} distinct variants of {kind} with {steps} steps")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _generate(n: int, rng: random.Random, mix, seen: set) -> list[dict]:
    levels = [lv for lv, k in zip(LEVELS, _level_counts(n, mix)) for _ in range(k)]
    rng.shuffle(levels)  # interleave levels, so any prefix of the list has the mix too
    records = []
    for level in levels:
        records.append(_new_problem(rng, level, seen).record(level))
    return records


def _check_mix(mix) -> None:
    if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
        raise checks.ConfigError(f"mix must be three non-negative shares (easy, medium, hard) summing to 1, got {mix}")


def _level_counts(n: int, mix) -> list[int]:
    """Exact counts by largest remainder, so the proportions hold for small n too."""
    _check_mix(mix)
    raw = [n * m for m in mix]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _new_problem(rng: random.Random, level: str, seen: set) -> _Problem:
    """A problem of this level not seen before (same kind and numbers, fractions in words included = seen)."""
    kinds = list(KINDS[level].values())
    for _ in range(1000):
        prob = rng.choice(kinds)(rng)
        if prob.key not in seen:
            seen.add(prob.key)
            return prob
    raise ValueError(
        f"cannot find a new {level} problem after 1000 tries; "
        f"the {level} problem space is nearly used up, ask for fewer problems"
    )


def _to_example(record: dict, template: str | None, parent: Example) -> Example:
    prompt = (template or DEFAULT_TEMPLATES["gsm8k"]).format(question=record["question"])
    meta = {k: v for k, v in record.items() if k not in ("question", "answer")}
    meta.update(origin="synth", parent=parent.id)
    return Example(
        id=content_id(record["question"], record["answer"]),
        prompt=prompt,
        response=record["answer"],
        source=parent.source,
        meta=meta,
    )


# ----------------------------------------------------------------------------- the command


@dataclass
class SynthConfig:
    """Generate math word problems in GSM8K format (question; worked answer ending `#### N`)."""

    out: str = "runs/demo/data"
    """Directory for train.jsonl, validation.jsonl and test.jsonl."""
    n_train: int = 2000
    """Training problems."""
    n_val: int = 300
    """Validation problems (for choosing hyperparameters)."""
    n_test: int = 500
    """Test problems (for the final numbers only)."""
    seed: int = 0
    """Generator seed: the same seed gives the same files."""
    mix: tuple[float, float, float] = MIX
    """Shares of easy, medium and hard problems."""

    def __post_init__(self) -> None:
        checks.positive("n_train", self.n_train)
        checks.non_negative("n_val", self.n_val)
        checks.non_negative("n_test", self.n_test)
        _check_mix(tuple(self.mix))


def run_synth(cfg: SynthConfig) -> str:
    paths = write_splits(
        cfg.out, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed, mix=tuple(cfg.mix)
    )
    rundir.write_yaml(rundir.provenance_files(cfg.out, "synth")[0], cfg)
    return "\n".join(f"{split}: {path}" for split, path in paths.items())
