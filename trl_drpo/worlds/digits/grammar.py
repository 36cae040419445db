"""The digit world's captions: a small grammar with GenEval's six categories, and its train/test split.

Every caption names digits (0-9), optionally colours (red, green, blue, yellow), a count (two, three) or a spatial
relation (left of, right of, above, below). The test split holds the caption *combinations* that pretraining never
sees: some digit/colour pairs, some pairs of digits (for two objects and positions), some count/digit pairs and some
single digits. Every atom (each digit, colour, count and relation) still appears in training in other combinations.
"""

from __future__ import annotations

import itertools
import re
from typing import Any


CATEGORIES = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
"""GenEval's six categories, under GenEval's names."""

DIGITS = tuple(range(10))
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.85, 0.2),
    "blue": (0.25, 0.45, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
"""Colour names and their RGB values in [0, 1]."""
COUNT_WORDS = {2: "two", 3: "three"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
SPLITS = ("train", "test")

_COLOR_NAMES = tuple(COLORS)


def held_out_color_pair(digit: int, color: str) -> bool:
    """Whether the caption pair "<color> <digit>" is test-only: each digit has one (its index modulo 4)."""
    return _COLOR_NAMES[digit % len(_COLOR_NAMES)] == color


def held_out_digit_pair(a: int, b: int) -> bool:
    """Whether two different digits named together ("a 1 and a 4", "a 2 above a 3") are test-only: 9 of the 45
    unordered pairs (those whose sum is a multiple of 5)."""
    return a != b and (a + b) % 5 == 0


def held_out_single(digit: int) -> bool:
    """Whether "a <digit>" alone is test-only (2, 5 and 8)."""
    return digit % 3 == 2


def held_out_count(count: int, digit: int) -> bool:
    """Whether "<count> <digit>s" is test-only (7 of the 20 count/digit pairs)."""
    return (count + digit) % 3 == 0


def _item(prompt: str, category: str, objects: list[dict[str, Any]], relation: str | None, test: bool):
    return {
        "prompt": prompt,
        "category": category,
        "objects": objects,
        "relation": relation,
        "split": "test" if test else "train",
    }


def _all_items() -> list[dict[str, Any]]:
    items = []
    for d in DIGITS:
        items.append(_item(f"a {d}", "single_object", [{"digit": d, "color": None}], None, held_out_single(d)))
    for d, c in itertools.product(DIGITS, _COLOR_NAMES):
        items.append(_item(f"a {c} {d}", "colors", [{"digit": d, "color": c}], None, held_out_color_pair(d, c)))
    for a, b in itertools.permutations(DIGITS, 2):
        objects = [{"digit": a, "color": None}, {"digit": b, "color": None}]
        items.append(_item(f"a {a} and a {b}", "two_object", objects, None, held_out_digit_pair(a, b)))
    for n, d in itertools.product(COUNT_WORDS, DIGITS):
        objects = [{"digit": d, "color": None}] * n
        items.append(_item(f"{COUNT_WORDS[n]} {d}s", "counting", objects, None, held_out_count(n, d)))
    for (a, b), relation in itertools.product(itertools.permutations(DIGITS, 2), RELATIONS):
        objects = [{"digit": a, "color": None}, {"digit": b, "color": None}]
        items.append(_item(f"a {a} {relation} a {b}", "position", objects, relation, held_out_digit_pair(a, b)))
    for (a, b), (ca, cb) in itertools.product(
        itertools.permutations(DIGITS, 2), itertools.permutations(_COLOR_NAMES, 2)
    ):
        objects = [{"digit": a, "color": ca}, {"digit": b, "color": cb}]
        test = held_out_color_pair(a, ca) or held_out_color_pair(b, cb)
        items.append(_item(f"a {ca} {a} and a {cb} {b}", "color_attr", objects, None, test))
    return items


_ITEMS = _all_items()


def prompts(split: str = "train", category: str | None = None) -> list[dict[str, Any]]:
    """All captions of a split, in a fixed order, as dicts.

    Args:
        split: "train" (what pretraining and DrPO train on) or "test" (held-out combinations, for evaluation).
        category: one of `CATEGORIES` to keep only that category, or None for all.

    Returns:
        A list of dicts with keys "prompt" (str), "category" (str), "objects" (list of {"digit": int,
        "color": str or None}, one per glyph the caption asks for), "relation" (str or None) and "split".

    Raises:
        ValueError: for an unknown split or category.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"Unknown category {category!r}; expected one of {CATEGORIES}.")
    return [
        dict(item, objects=[dict(o) for o in item["objects"]])
        for item in _ITEMS
        if item["split"] == split and (category is None or item["category"] == category)
    ]


def balanced_prompts(split: str, per_category: int) -> list[dict[str, Any]]:
    """Exactly `per_category` captions of each category (in `CATEGORIES` order), so that every category weighs the
    same in training or evaluation: the category's captions in their fixed order, evenly spread when it has more
    than `per_category`, repeated in turn when it has fewer."""
    chosen = []
    for category in CATEGORIES:
        items = prompts(split, category)
        items = items[:: max(1, len(items) // per_category)]
        chosen.extend(items[j % len(items)] for j in range(per_category))
    return chosen


_DIGIT = r"(\d)"
_COLOR = "(" + "|".join(_COLOR_NAMES) + ")"
_PATTERNS = [
    ("single_object", re.compile(rf"an? {_DIGIT}")),
    ("colors", re.compile(rf"an? {_COLOR} {_DIGIT}")),
    ("two_object", re.compile(rf"an? {_DIGIT} and an? {_DIGIT}")),
    ("counting", re.compile(rf"({'|'.join(COUNT_WORDS.values())}) {_DIGIT}'?s")),
    ("position", re.compile(rf"an? {_DIGIT} ({'|'.join(RELATIONS)}) an? {_DIGIT}")),
    ("color_attr", re.compile(rf"an? {_COLOR} {_DIGIT} and an? {_COLOR} {_DIGIT}")),
]
_COUNTS = {word: n for n, word in COUNT_WORDS.items()}


def parse(prompt: str) -> dict[str, Any]:
    """The structure of a caption of this grammar (case and surrounding whitespace are ignored).

    Returns:
        A dict like the items of `prompts` (without "split").

    Raises:
        ValueError: if the caption is not in the grammar, with the caption and an example of each category.
    """
    text = " ".join(str(prompt).lower().split()).rstrip(".")
    for category, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        g = match.groups()
        if category == "single_object":
            objects, relation = [{"digit": int(g[0]), "color": None}], None
        elif category == "colors":
            objects, relation = [{"digit": int(g[1]), "color": g[0]}], None
        elif category == "two_object":
            objects, relation = [{"digit": int(g[0]), "color": None}, {"digit": int(g[1]), "color": None}], None
        elif category == "counting":
            objects, relation = [{"digit": int(g[1]), "color": None}] * _COUNTS[g[0]], None
        elif category == "position":
            objects, relation = [{"digit": int(g[0]), "color": None}, {"digit": int(g[2]), "color": None}], g[1]
        else:
            objects, relation = [{"digit": int(g[1]), "color": g[0]}, {"digit": int(g[3]), "color": g[2]}], None
        return {"prompt": prompt, "category": category, "objects": [dict(o) for o in objects], "relation": relation}
    examples = "; ".join(f'"{prompts("train", c)[0]["prompt"]}"' for c in CATEGORIES)
    raise ValueError(f"Caption {prompt!r} is not in the digit world's grammar. Captions look like: {examples}.")
