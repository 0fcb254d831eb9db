"""Canonical layouts: one fixed scene per text-to-image prompt, for small models' training data.

docs/world.md leaves place, size and (for most templates) color free. For a model as small as the
embedded one that freedom is the limit: each token's distribution becomes many-moded and the
sampler's per-token draws fall between the modes (research/shapes-model-notebook.md, issue 9). With
`data.world_layout: canonical` text-to-image training pairs each prompt with one scene instead:

- every object has side 0.25·S, on the 1/128 lattice (the judge reads each shape exactly);
- one object stands in the centre; two stand side by side (the first named on the left), or one
  above the other for `above` / `below`; three stand in a row; four stand in a 2 × 2 grid;
- an object whose color the text leaves free takes its shape's `DEFAULT_COLORS` entry (none is a
  held-out pair).

Every canonical scene is a valid world scene and satisfies its prompt's record, so the judge
reads a faithful drawing of it as correct. Besides the templates, the canonical stream has the
canonical caption of 1-4 random objects and `a photo of a {color} {shape} {relation} a {color}
{shape}` (the README's first prompt is of that form). Evaluation is unchanged.
"""

from __future__ import annotations

import numpy as np

from unipic.world.scene import Scene, WorldObject, allowed_pairs
from unipic.world.spec import MAX_OBJECTS, RELATIONS
from unipic.world.text import noun_phrase

CANONICAL_SIZE = 0.25  # 32 px at S = 128: whole pixels at every multiple of 128
DEFAULT_COLORS = {
    "circle": "red",
    "square": "green",
    "triangle": "blue",
    "diamond": "orange",
    "star": "yellow",
    "cross": "purple",
}
# Box centres (fractions of S) for n objects, in the canonical caption's order (left to right,
# ties top to bottom), so a caption's k-th object stands in slot k.
SLOTS = {
    1: ((0.5, 0.5),),
    2: ((0.3125, 0.5), (0.6875, 0.5)),
    3: ((0.1875, 0.5), (0.5, 0.5), (0.8125, 0.5)),
    4: ((0.3125, 0.3125), (0.3125, 0.6875), (0.6875, 0.3125), (0.6875, 0.6875)),
}
VERTICAL_PAIR = ((0.5, 0.3125), (0.5, 0.6875))  # top, bottom


def canonical_scene(pairs: list[tuple[str, str]], vertical: bool = False) -> Scene:
    """(color, shape) pairs placed in their canonical slots, in order (`vertical`: two, top first)."""
    if not 1 <= len(pairs) <= MAX_OBJECTS:
        raise ValueError(f"a canonical scene holds 1 to {MAX_OBJECTS} objects, got {len(pairs)}")
    if vertical and len(pairs) != 2:
        raise ValueError("only a pair of objects can stand one above the other")
    slots = VERTICAL_PAIR if vertical else SLOTS[len(pairs)]
    objects = [WorldObject(color, shape, cx, cy, CANONICAL_SIZE) for (color, shape), (cx, cy) in zip(pairs, slots)]
    scene = Scene(tuple(objects))
    scene.validate()
    return scene


def related_scene(subject: tuple[str, str], relation: str, reference: tuple[str, str]) -> Scene:
    """The canonical scene in which `subject` stands `relation` (left of, right of, above, below) `reference`."""
    ordered = [subject, reference] if relation in ("left of", "above") else [reference, subject]
    return canonical_scene(ordered, vertical=relation in ("above", "below"))


def canonical_scene_for_record(record: dict) -> Scene:
    """The canonical scene of a Shapes GenEval record (any of the six templates)."""
    include = record["include"]
    tag = record["tag"]

    def pair(entry: dict) -> tuple[str, str]:
        return (entry.get("color") or DEFAULT_COLORS[entry["class"]], entry["class"])

    if tag == "position":
        reference, subject = include  # GenEval lists the reference object first
        return related_scene(pair(subject), subject["position"][0], pair(reference))
    pairs = [pair(entry) for entry in include for _ in range(entry["count"])]
    return canonical_scene(pairs)


def random_colored_relation(rng: np.random.Generator, allow_held_out: bool = False) -> tuple[str, Scene]:
    """`a photo of a {color1} {shape1} {relation} a {color2} {shape2}` and its canonical scene."""
    pairs = allowed_pairs(allow_held_out)
    first = pairs[int(rng.integers(len(pairs)))]
    others = [p for p in pairs if p[1] != first[1]]
    second = others[int(rng.integers(len(others)))]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    text = f"a photo of {noun_phrase(*first)} {relation} {noun_phrase(*second)}"
    return text, related_scene(first, relation, second)


def random_canonical_caption_scene(rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """1 to 4 random allowed (color, shape) pairs in their canonical slots (text: the caption)."""
    pairs = allowed_pairs(allow_held_out)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    chosen = [pairs[int(rng.integers(len(pairs)))] for _ in range(n)]
    return canonical_scene(chosen)


__all__ = [
    "CANONICAL_SIZE",
    "DEFAULT_COLORS",
    "SLOTS",
    "canonical_scene",
    "canonical_scene_for_record",
    "random_canonical_caption_scene",
    "random_colored_relation",
    "related_scene",
]
