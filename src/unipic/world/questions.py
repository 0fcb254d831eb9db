"""Understanding questions about scenes and how answers are scored (docs/world.md §9).

| kind | question | answer |
| caption | `Describe the image.` | the canonical caption |
| count | `How many {shapes} are there?` | `zero` ... `four` |
| color | `What color is the {shape}?` (the shape occurs once) | a color |
| shape | `What shape is the {color} object?` (the color occurs once) | a shape |
| relation | `Is the {shape1} {rel} the {shape2}?` (each occurs once; rel or its opposite holds) | yes/no |

Answers are compared after lower-casing and stripping a final period. Captions score twice:
as a multiset of (color, shape) pairs and strictly (the pairs in the canonical order).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unipic.world.scene import Scene, relation_holds
from unipic.world.spec import OPPOSITE, PLURALS, REL_SAFETY, REL_T, RELATIONS, SHAPES, SINGULARS
from unipic.world.text import NUMBER_WORDS, canonical_caption, join_list, named_pairs, normalize, noun_phrase

QUESTION_KINDS = ("caption", "count", "color", "shape", "relation")
CAPTION_QUESTION = "Describe the image."


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str


def caption_question(scene: Scene) -> Question:
    return Question("caption", CAPTION_QUESTION, canonical_caption(scene))


def count_question(scene: Scene, shape: str) -> Question:
    return Question("count", f"How many {PLURALS[shape]} are there?", NUMBER_WORDS[scene.count(shape)])


def color_questions(scene: Scene) -> list[Question]:
    return [
        Question("color", f"What color is the {o.shape}?", o.color)
        for o in scene.objects
        if scene.count(o.shape) == 1
    ]


def shape_questions(scene: Scene) -> list[Question]:
    return [
        Question("shape", f"What shape is the {o.color} object?", o.shape)
        for o in scene.objects
        if len(scene.with_color(o.color)) == 1
    ]


def relation_questions(scene: Scene, margin: float = REL_T + REL_SAFETY) -> list[Question]:
    """All valid relation questions: both shapes occur once and rel or its opposite holds with
    `margin` (the generators add REL_SAFETY to docs/world.md's t so the judge agrees)."""
    unique = [o for o in scene.objects if scene.count(o.shape) == 1]
    out = []
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for rel in RELATIONS:
                yes = relation_holds(rel, a, b, margin)
                if yes or relation_holds(OPPOSITE[rel], a, b, margin):
                    out.append(Question("relation", f"Is the {a.shape} {rel} the {b.shape}?", "yes" if yes else "no"))
    return out


def sample_question(rng: np.random.Generator, scene: Scene, kind: str) -> Question | None:
    """One random question of `kind` about `scene`, or None when the scene allows none.

    Count questions ask about a shape in the scene half of the time, else about any shape (so
    `zero` occurs). Relation questions are balanced between `yes` and `no`.
    """
    if kind == "caption":
        return caption_question(scene)
    if kind == "count":
        pool = [o.shape for o in scene.objects] if rng.random() < 0.5 else list(SHAPES)
        return count_question(scene, pool[int(rng.integers(len(pool)))])
    if kind == "color":
        options = color_questions(scene)
    elif kind == "shape":
        options = shape_questions(scene)
    elif kind == "relation":
        options = relation_questions(scene)
        want = "yes" if rng.random() < 0.5 else "no"
        options = [q for q in options if q.answer == want] or options
    else:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(QUESTION_KINDS)}")
    return options[int(rng.integers(len(options)))] if options else None


def score_answer(question: Question, prediction: str) -> dict:
    """Score a prediction: {"correct": bool} plus, for captions, "multiset" and "strict".

    For a caption, `correct` is the multiset score: the (color, shape) pairs the prediction names
    equal the scene's as a multiset. `strict` also requires them in the canonical order.
    """
    pred = normalize(prediction)
    if question.kind != "caption":
        return {"correct": pred == normalize(question.answer)}
    want = named_pairs(question.answer)
    got = named_pairs(pred)
    multiset = Counter(got) == Counter(want)
    return {"correct": multiset, "multiset": multiset, "strict": multiset and got == want}


_QUESTION_PATTERNS = [
    ("caption", re.compile(r"describe the image")),
    ("count", re.compile(r"how many (\w+) are there\?")),
    ("color", re.compile(r"what color is the (\w+)\?")),
    ("shape", re.compile(r"what shape is the (\w+) object\?")),
    ("relation", re.compile(r"is the (\w+) (left of|right of|above|below) the (\w+)\?")),
]


def _parse_question(question: str) -> tuple[str, re.Match] | None:
    """(kind, match of its pattern) for one of the five question forms, or None."""
    text = normalize(question)
    for kind, pattern in _QUESTION_PATTERNS:
        m = pattern.fullmatch(text)
        if m is not None:
            return kind, m
    return None


def is_world_question(question: str) -> bool:
    """Whether `question` is one of the five question forms of docs/world.md §9."""
    return _parse_question(question) is not None


def answer_question(objects: Sequence, question: str) -> str | None:
    """The correct answer to one of the five question forms about `objects` (scene objects or
    judge detections: anything with color, shape, cx, cy), or None when the question is not one
    of the forms or does not apply (e.g. its shape does not occur exactly once)."""
    parsed = _parse_question(question)
    if parsed is None:
        return None
    kind, m = parsed
    if kind == "caption":
        ordered = sorted(objects, key=lambda o: (o.cx, o.cy))
        return join_list([noun_phrase(o.color, o.shape) for o in ordered])
    if kind == "count":
        shape = SINGULARS.get(m.group(1))
        if shape is None:
            return None
        n = sum(o.shape == shape for o in objects)
        return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    if kind == "color":
        found = [o for o in objects if o.shape == m.group(1)]
        return found[0].color if len(found) == 1 else None
    if kind == "shape":
        found = [o for o in objects if o.color == m.group(1)]
        return found[0].shape if len(found) == 1 else None
    a = [o for o in objects if o.shape == m.group(1)]
    b = [o for o in objects if o.shape == m.group(3)]
    if len(a) != 1 or len(b) != 1:
        return None
    return "yes" if relation_holds(m.group(2), a[0], b[0]) else "no"


def named_objects(scene: Scene, question: Question) -> list:
    """The objects a question points at, the ones its answer has to look at: every object of the
    named shape (count; none for a count of zero), the one of the named shape (color), the one of
    the named color (shape), both named shapes in the question's order (relation); none for a caption."""
    parsed = _parse_question(question.question)
    if parsed is None or parsed[0] == "caption":
        return []
    kind, m = parsed
    if kind == "shape":
        return [o for o in scene.objects if o.color == m.group(1)]
    if kind == "relation":
        return [o for shape in (m.group(1), m.group(3)) for o in scene.objects if o.shape == shape]
    shape = SINGULARS.get(m.group(1)) if kind == "count" else m.group(1)
    return [o for o in scene.objects if o.shape == shape]


def relation_order(scene: Scene, question: Question) -> tuple[bool, bool] | None:
    """For a relation question: whether its first named shape's centre lies left of, and above,
    its second's; None for other questions (or when either shape is not there exactly once)."""
    parsed = _parse_question(question.question)
    if parsed is None or parsed[0] != "relation":
        return None
    pair = named_objects(scene, question)
    if len(pair) != 2:
        return None
    first, second = pair
    return first.cx < second.cx, first.cy < second.cy
