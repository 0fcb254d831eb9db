"""Seeded example generators for the three tasks, training and evaluation.

Example `index` of a task is a pure function of `(seed, index)` (its own `numpy` generator from
`rng_for(seed, task, index)`), so datasets can be sharded, resumed and exported in any order.
Nothing here renders: callers render `scene` / `source` / `target` at the size they need.

Training generators never produce a held-out color–shape pair (images, captions, questions,
edit sources and targets); evaluation generators (`train=False`) draw from all 60 pairs.

Text-to-image training text mixes (see `T2I_MIX`):
- 45% `template`: one of the six GenEval-analogue templates (category uniform), paired with a
  scene holding exactly the objects it names (positions with a clear margin);
- 45% `description`: a full description of a random 1-4 object scene (`text.describe`: canonical
  caption, grouped counts, relations, orders, paraphrased prefixes);
- 10% `partial`: a template prompt with 1-2 extra objects of shapes it does not name, so the
  text is still exactly true of the image but does not describe every object.

With `layout="canonical"` (`unipic.world.canonical`) text-to-image training pairs each text with
one fixed scene instead (`CANONICAL_T2I_MIX`): 70% a template prompt, 20% the canonical caption of
1-4 random objects, 10% two colored objects in a relation. Understanding and editing examples do
not depend on the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unipic.world.canonical import (
    canonical_scene_for_record,
    random_canonical_caption_scene,
    random_colored_relation,
)
from unipic.world.edits import Edit, sample_edit
from unipic.world.geneval import random_record, scene_for_record
from unipic.world.questions import QUESTION_KINDS, Question, sample_question
from unipic.world.scene import Scene, rng_for, sample_scene
from unipic.world.spec import CAPTION_SEP, EDIT_KINDS
from unipic.world.text import TAGS, canonical_caption, describe

TASKS = ("t2i", "i2t", "edit")
_TASK_KEYS = {"t2i": 1, "i2t": 2, "edit": 3}
_EVAL_KEY = 1000  # evaluation streams use disjoint generator keys
T2I_MIX = (("template", 0.45), ("description", 0.45), ("partial", 0.10))
CANONICAL_T2I_MIX = (("template", 0.7), ("caption", 0.2), ("relation", 0.1))
LAYOUTS = ("random", "canonical")


@dataclass(frozen=True)
class T2IExample:
    text: str
    scene: Scene
    kind: str  # template / description / partial
    form: str  # the GenEval tag (template, partial) or the description form


@dataclass(frozen=True)
class I2TExample:
    scene: Scene
    question: Question


def _rng(task: str, seed: int, index: int, train: bool):
    if index < 0:
        raise ValueError(f"example index must be >= 0, got {index}")
    return rng_for(seed, _TASK_KEYS[task] + (0 if train else _EVAL_KEY), index)


def t2i_example(seed: int, index: int, train: bool = True, layout: str = "random") -> T2IExample:
    """Text-to-image example `index` of the stream `seed` (text + scene to render)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    rng = _rng("t2i", seed, index, train)
    allow = not train
    mix = CANONICAL_T2I_MIX if layout == "canonical" else T2I_MIX
    u, kind = float(rng.random()), mix[-1][0]
    for name, weight in mix:
        if u < weight:
            kind = name
            break
        u -= weight
    if kind == "description":
        scene = sample_scene(rng, allow_held_out=allow)
        text, form = describe(scene, rng)
        return T2IExample(text, scene, kind, form)
    if kind == "caption":
        scene = random_canonical_caption_scene(rng, allow_held_out=allow)
        return T2IExample(canonical_caption(scene), scene, kind, "caption")
    if kind == "relation":
        text, scene = random_colored_relation(rng, allow_held_out=allow)
        return T2IExample(text, scene, kind, "relation")
    tag = TAGS[int(rng.integers(len(TAGS)))]
    record = random_record(rng, tag, allow_held_out=allow)
    if layout == "canonical":
        return T2IExample(record["prompt"], canonical_scene_for_record(record), kind, tag)
    extra = int(rng.integers(1, 3)) if kind == "partial" else 0
    scene = scene_for_record(rng, record, allow_held_out=allow, distractors=extra)
    return T2IExample(record["prompt"], scene, kind, tag)


def _caption_ready(scene: Scene) -> bool:
    """Left-to-right order is visually unambiguous: centres at least CAPTION_SEP apart in x."""
    xs = sorted(o.cx for o in scene.objects)
    return all(b - a >= CAPTION_SEP for a, b in zip(xs, xs[1:]))


def i2t_example(seed: int, index: int, train: bool = True, kind: str | None = None,
                kinds: Sequence[str] = QUESTION_KINDS) -> I2TExample:
    """Image-to-text example `index`: a scene and one question (kind uniform over `kinds` unless given)."""
    rng = _rng("i2t", seed, index, train)
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    elif kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(QUESTION_KINDS)}")
    for _ in range(200):
        n = int(rng.integers(2, 5)) if kind == "relation" else None
        scene = sample_scene(rng, n, allow_held_out=not train)
        if kind == "caption" and not _caption_ready(scene):
            continue
        question = sample_question(rng, scene, kind)
        if question is not None:
            return I2TExample(scene, question)
    raise RuntimeError(f"could not generate a {kind} question")  # pragma: no cover


def extra_questions(seed: int, index: int, scene: Scene, first: Question, count: int,
                    kinds: Sequence[str] = QUESTION_KINDS) -> list[Question]:
    """Up to `count` further questions about understanding example `index`'s scene, none repeating
    `first` or each other (kinds uniform over `kinds`; a pure function of (seed, index))."""
    rng = rng_for(seed, _TASK_KEYS["i2t"], index, 1)  # a stream apart from the example's own
    asked, out = {first.question}, []
    for _ in range(8 * count):
        if len(out) == count:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "caption" and not _caption_ready(scene):
            continue  # its left-to-right order would be ambiguous
        question = sample_question(rng, scene, kind)
        if question is not None and question.question not in asked:
            asked.add(question.question)
            out.append(question)
    return out


def edit_example(seed: int, index: int, train: bool = True, kind: str | None = None,
                 kinds: Sequence[str] = EDIT_KINDS, placement: str = "random") -> Edit:
    """Editing example `index`: source scene, instruction, target scene (kind uniform over `kinds`
    unless given; `placement` of added and moved objects: `unipic.world.edits`)."""
    rng = _rng("edit", seed, index, train)
    if kind is None:
        kind = kinds[int(rng.integers(len(kinds)))]
    return sample_edit(rng, kind, allow_held_out=not train, placement=placement)


def make_example(task: str, seed: int, index: int, train: bool = True, layout: str = "random",
                 question_kinds: Sequence[str] = QUESTION_KINDS, edit_kinds: Sequence[str] = EDIT_KINDS,
                 edit_placement: str = "random"):
    """Dispatch to `t2i_example`, `i2t_example` or `edit_example` (`layout`: text-to-image only;
    `question_kinds`: image-to-text only; `edit_kinds`, `edit_placement`: editing only)."""
    if task == "t2i":
        return t2i_example(seed, index, train, layout)
    if task == "i2t":
        return i2t_example(seed, index, train, kinds=question_kinds)
    if task == "edit":
        return edit_example(seed, index, train, kinds=edit_kinds, placement=edit_placement)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def i2t_eval_set(n_per_kind: int, seed: int = 0) -> list[I2TExample]:
    """`n_per_kind` evaluation questions of each of the five kinds (held-out pairs may occur)."""
    return [
        i2t_example(seed, k * n_per_kind + j, train=False, kind=kind)
        for k, kind in enumerate(QUESTION_KINDS)
        for j in range(n_per_kind)
    ]


def edit_eval_set(n_per_kind: int, seed: int = 0) -> list[Edit]:
    """`n_per_kind` evaluation edits of each of the five kinds (held-out pairs may occur)."""
    return [
        edit_example(seed, k * n_per_kind + j, train=False, kind=kind)
        for k, kind in enumerate(EDIT_KINDS)
        for j in range(n_per_kind)
    ]
