"""Language of the Shapes world: noun phrases, canonical captions, the six GenEval-analogue
prompt templates, richer training descriptions, and parsing of template prompts.

Text is lower case with no final period, like GenEval's prompts. Counts are words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from unipic.world.scene import Scene, WorldObject, relation_holds
from unipic.world.spec import (
    COLOR_NAMES,
    OPPOSITE,
    PLURALS,
    REL_SAFETY,
    REL_T,
    RELATIONS,
    SHAPES,
    SINGULARS,
)

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
WORD_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def article(word: str) -> str:
    """`a` or `an` as English requires before `word` (all our words follow the vowel-letter rule)."""
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def noun_phrase(color: str | None, shape: str) -> str:
    """`a red circle`, `an orange star`, or `a circle` when color is None."""
    return with_article(shape if color is None else f"{color} {shape}")


def join_list(items: Sequence[str]) -> str:
    """`x`, `x and y`, `x, y and z`: the canonical caption's list style."""
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def counted(n: int, color: str | None, shape: str) -> str:
    """`a red circle` for 1, `two red circles` for 2 (counts as words)."""
    if n == 1:
        return noun_phrase(color, shape)
    words = PLURALS[shape] if color is None else f"{color} {PLURALS[shape]}"
    return f"{NUMBER_WORDS[n]} {words}"


def canonical_caption(scene: Scene) -> str:
    """Objects left to right (by cx, ties by cy) as `a {color} {shape}`, joined by `, ` and a
    final ` and ` (docs/world.md): e.g. `a red circle, a blue star and a white cross`."""
    return join_list([noun_phrase(o.color, o.shape) for o in scene.left_to_right()])


def normalize(text: str) -> str:
    """Lower-case, trim, drop one final period (how docs/world.md compares answers)."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


# ---------------------------------------------------------------------------------------------
# GenEval-analogue templates (docs/world.md's table, verbatim)
# ---------------------------------------------------------------------------------------------


def prompt_single_object(shape: str) -> str:
    return f"a photo of {noun_phrase(None, shape)}"


def prompt_two_object(shape1: str, shape2: str) -> str:
    return f"a photo of {noun_phrase(None, shape1)} and {noun_phrase(None, shape2)}"


def prompt_counting(shape: str, n: int) -> str:
    return f"a photo of {NUMBER_WORDS[n]} {PLURALS[shape]}"


def prompt_colors(color: str, shape: str) -> str:
    return f"a photo of {noun_phrase(color, shape)}"


def prompt_position(shape1: str, relation: str, shape2: str) -> str:
    return f"a photo of {noun_phrase(None, shape1)} {relation} {noun_phrase(None, shape2)}"


def prompt_color_attr(color1: str, shape1: str, color2: str, shape2: str) -> str:
    return f"a photo of {noun_phrase(color1, shape1)} and {noun_phrase(color2, shape2)}"


_ART = r"(?:a|an)"
_SHAPE = "(" + "|".join(SHAPES) + ")"
_PLURAL = "(" + "|".join(PLURALS.values()) + ")"
_COLOR = "(" + "|".join(COLOR_NAMES) + ")"
_REL = "(" + "|".join(RELATIONS) + ")"
_TEMPLATE_PATTERNS = [
    ("position", re.compile(rf"a photo of {_ART} {_SHAPE} {_REL} {_ART} {_SHAPE}")),
    ("color_attr", re.compile(rf"a photo of {_ART} {_COLOR} {_SHAPE} and {_ART} {_COLOR} {_SHAPE}")),
    ("two_object", re.compile(rf"a photo of {_ART} {_SHAPE} and {_ART} {_SHAPE}")),
    ("counting", re.compile(rf"a photo of (two|three|four) {_PLURAL}")),
    ("colors", re.compile(rf"a photo of {_ART} {_COLOR} {_SHAPE}")),
    ("single_object", re.compile(rf"a photo of {_ART} {_SHAPE}")),
]


def parse_template(prompt: str) -> dict | None:
    """Parse one of the six template prompts into its fields, or None if it is not one.

    Returns e.g. `{"tag": "position", "shape1": "star", "relation": "above", "shape2": "cross"}`.
    Case and a final period are ignored; the shapes of two-object prompts must differ.
    """
    text = normalize(prompt)
    for tag, pattern in _TEMPLATE_PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if tag == "single_object":
            return {"tag": tag, "shape": g[0]}
        if tag == "colors":
            return {"tag": tag, "color": g[0], "shape": g[1]}
        if tag == "counting":
            return {"tag": tag, "shape": SINGULARS[g[1]], "count": WORD_NUMBERS[g[0]]}
        if tag == "two_object" and g[0] != g[1]:
            return {"tag": tag, "shape1": g[0], "shape2": g[1]}
        if tag == "position" and g[0] != g[2]:
            return {"tag": tag, "shape1": g[0], "relation": g[1], "shape2": g[2]}
        if tag == "color_attr" and g[1] != g[3]:
            return {"tag": tag, "color1": g[0], "shape1": g[1], "color2": g[2], "shape2": g[3]}
    return None


_COLORED_POSITION = re.compile(rf"(?:a photo of )?{_ART} {_COLOR} {_SHAPE} {_REL} {_ART} {_COLOR} {_SHAPE}")


def parse_colored_position(prompt: str) -> dict | None:
    """Parse `a photo of a {color} {shape} {relation} a {color} {shape}` (the README's example
    prompt: position and colour binding at once), or None. The two shapes must differ."""
    m = _COLORED_POSITION.fullmatch(normalize(prompt))
    if m is None or m.group(2) == m.group(5):
        return None
    color1, shape1, relation, color2, shape2 = m.groups()
    return {"color1": color1, "shape1": shape1, "relation": relation, "color2": color2, "shape2": shape2}


_ANY_PAIR = re.compile(
    rf"\b(?:(a|an|one|two|three|four)\s+)?{_COLOR}\s+({'|'.join(SHAPES + tuple(PLURALS.values()))})\b"
)


def parse_description(text: str) -> list[tuple[str, str]] | None:
    """Parse a full scene description that lists objects as `a {color} {shape}` phrases.

    Accepts the canonical caption with an optional `a photo of ` prefix. Returns the (color,
    shape) pairs in order, or None when the text is something else.
    """
    body = normalize(text)
    if body.startswith("a photo of "):
        body = body[len("a photo of ") :]
    phrases = [p.strip() for p in re.split(r",|\band\b", body) if p.strip()]
    pairs = []
    for phrase in phrases:
        m = re.fullmatch(rf"{_ART} {_COLOR} {_SHAPE}", phrase)
        if m is None:
            return None
        pairs.append((m.group(1), m.group(2)))
    return pairs or None


def named_pairs(text: str) -> list[tuple[str, str]]:
    """Every `{color} {shape}` pair the text names, in order, repeated by its count word
    (`two red circles` names (red, circle) twice). Scores captions as multisets and checks that
    training text never names a held-out pair."""
    out = []
    for m in _ANY_PAIR.finditer(text.lower()):
        number, color, shape = m.groups()
        n = WORD_NUMBERS.get(number or "one", 1) if number not in ("a", "an") else 1
        out += [(color, SINGULARS.get(shape, shape))] * n
    return out


# ---------------------------------------------------------------------------------------------
# Richer training descriptions (every form describes every object of the scene)
# ---------------------------------------------------------------------------------------------

_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ")
_REL_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


def _groups(objects: Sequence[WorldObject]) -> list[tuple[int, str, str]]:
    """Identical (color, shape) objects grouped in first-appearance order: (count, color, shape)."""
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[o.pair] = counts.get(o.pair, 0) + 1
    return [(n, c, s) for (c, s), n in counts.items()]


def _grouped_phrase(objects: Sequence[WorldObject]) -> tuple[str, bool]:
    """The grouped list and whether its first item is plural (`there are two ...`)."""
    groups = _groups(objects)
    return join_list([counted(n, c, s) for n, c, s in groups]), groups[0][0] > 1


def clear_relation(a: WorldObject, b: WorldObject, rng: np.random.Generator) -> str | None:
    """A relation that holds between a and b with the generators' safety margin, or None."""
    held = [r for r in RELATIONS if relation_holds(r, a, b, REL_T + REL_SAFETY)]
    return None if not held else held[int(rng.integers(len(held)))]


def describe(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A random full description of `scene` for text-to-image training.

    Forms (uniform over the ones that apply): canonical caption; prefixed caption; grouped counts
    (`two red circles and a blue star`); `there is/are ...`; shuffled order; shape-count summary
    (`three shapes: ...`); a spatial relation between two objects (2-object scenes with a clear
    relation); `from left to right: ...` / `from top to bottom: ...` orders.

    Returns:
        (text, form name).
    """
    objs = list(scene.objects)
    ordered = scene.left_to_right()
    forms = ["caption", "prefixed", "grouped", "there", "shuffled", "summary", "left_to_right"]
    relation = None
    if len(objs) == 2:
        relation = clear_relation(objs[0], objs[1], rng)
        if relation is not None:
            forms += ["relation", "relation"]
    by_y = sorted(objs, key=lambda o: o.cy)
    if len(objs) >= 2 and all(b.cy - a.cy > REL_T for a, b in zip(by_y, by_y[1:])):
        forms.append("top_to_bottom")
    form = forms[int(rng.integers(len(forms)))]
    phrases = [noun_phrase(o.color, o.shape) for o in ordered]
    if form == "caption":
        text = join_list(phrases)
    elif form == "prefixed":
        text = _PREFIXES[1 + int(rng.integers(len(_PREFIXES) - 1))] + join_list(phrases)
    elif form == "grouped":
        text = _PREFIXES[int(rng.integers(len(_PREFIXES)))] + _grouped_phrase(ordered)[0]
    elif form == "there":
        phrase, plural = _grouped_phrase(ordered)
        text = ("there are " if plural else "there is ") + phrase
    elif form == "shuffled":
        order = rng.permutation(len(objs))
        text = join_list([noun_phrase(objs[i].color, objs[i].shape) for i in order])
    elif form == "summary":
        noun = "shape" if len(objs) == 1 else "shapes"
        text = f"{NUMBER_WORDS[len(objs)]} {noun}: " + join_list(phrases)
    elif form == "left_to_right":
        text = ("from left to right: " if len(objs) > 1 else "") + join_list(phrases)
    elif form == "top_to_bottom":
        text = "from top to bottom: " + join_list([noun_phrase(o.color, o.shape) for o in by_y])
    else:  # relation between the two objects, in either order
        a, b = objs
        if rng.random() < 0.5:
            a, b, relation = b, a, OPPOSITE[relation]
        words = _REL_WORDS[relation]
        text = f"{noun_phrase(a.color, a.shape)} {words[int(rng.integers(len(words)))]} {noun_phrase(b.color, b.shape)}"
    if rng.random() < 0.1:
        text += " on a gray background"
    return text, form
