"""Instruction-based edits of scenes (docs/world.md §10): generating source/target pairs,
parsing and applying instructions, and judging an edited image.

| kind | instruction | expected result |
| recolor | `Change the color of the {shape} to {color}.` | that object takes the new color |
| remove | `Remove the {shape}.` | that object is gone |
| add | `Add a {color} {shape}.` | a new object of that color and shape, anywhere free |
| replace | `Replace the {shape} with a {color} {shape2}.` | the new object, in the same box |
| move | `Move the {shape} to the {left,right,top,bottom}.` | centre moves >= 0.15*S that way |

The edited `the {shape}` occurs exactly once in the source. Choices docs/world.md leaves open, made
here: a removal needs at least two source objects (a scene holds at least one), a replacement
changes the shape (a same-shape replacement is a recolor), and a generated move keeps the
perpendicular coordinate and goes at least MOVE_MIN + MOVE_SAFETY.

Placement (training data only; the judge accepts any valid result): "random" draws an added
object's box and a move's distance at random; "fixed" makes both a function of the source scene
(`fixed_add_box`, the shortest valid move), so that the target of an add or a move is one image
rather than a spread of them, as the canonical layout does for text-to-image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unipic.world.geometry import SHAPE_EXTENT
from unipic.world.judge import perfect_matching
from unipic.world.scene import (
    LATTICE,
    Scene,
    WorldObject,
    colors_for,
    fits,
    lattice_corners,
    lattice_object,
    place_object,
    sample_scene,
)
from unipic.world.spec import (
    COLOR_NAMES,
    DIRECTIONS,
    EDIT_KINDS,
    EDIT_TOL,
    HELD_OUT,
    MARGIN,
    MAX_OBJECTS,
    MOVE_MIN,
    MOVE_SAFETY,
    SHAPES,
)
from unipic.world.text import normalize, noun_phrase

_DIR_VECTORS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
PLACEMENTS = ("random", "fixed")
FIXED_ADD_SIZE = 0.25  # box side of an added object under fixed placement (the canonical layout's)


@dataclass(frozen=True)
class Edit:
    """One edit: the instruction and everything needed to check its result."""

    kind: str
    instruction: str
    source: Scene
    target: Scene
    index: int | None  # edited object's index in source (None for add)
    new_index: int | None  # edited / added object's index in target (None for remove)
    direction: str | None = None  # for move

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "instruction": self.instruction,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
            "index": self.index,
            "new_index": self.new_index,
            "direction": self.direction,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Edit:
        return cls(
            d["kind"], d["instruction"], Scene.from_dict(d["source"]), Scene.from_dict(d["target"]),
            d["index"], d["new_index"], d.get("direction"),
        )


def instruction_text(kind: str, **f: str) -> str:
    """The instruction sentence for an edit kind (docs/world.md's wording)."""
    if kind == "recolor":
        return f"Change the color of the {f['shape']} to {f['color']}."
    if kind == "remove":
        return f"Remove the {f['shape']}."
    if kind == "add":
        return f"Add {noun_phrase(f['color'], f['shape'])}."
    if kind == "replace":
        return f"Replace the {f['shape']} with {noun_phrase(f['color'], f['shape2'])}."
    if kind == "move":
        return f"Move the {f['shape']} to the {f['direction']}."
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")


_C = "(" + "|".join(COLOR_NAMES) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_INSTRUCTIONS = [
    ("recolor", re.compile(rf"change the color of the {_S} to {_C}")),
    ("remove", re.compile(rf"remove the {_S}")),
    ("add", re.compile(rf"add (?:a|an) {_C} {_S}")),
    ("replace", re.compile(rf"replace the {_S} with (?:a|an) {_C} {_S}")),
    ("move", re.compile(rf"move the {_S} to the (left|right|top|bottom)")),
]


def parse_instruction(text: str) -> dict | None:
    """Parse an instruction into {"kind", ...fields}, or None if it is not one of the five."""
    body = normalize(text)
    for kind, pattern in _INSTRUCTIONS:
        m = pattern.fullmatch(body)
        if m is None:
            continue
        g = m.groups()
        if kind == "recolor":
            return {"kind": kind, "shape": g[0], "color": g[1]}
        if kind == "remove":
            return {"kind": kind, "shape": g[0]}
        if kind == "add":
            return {"kind": kind, "color": g[0], "shape": g[1]}
        if kind == "replace":
            return {"kind": kind, "shape": g[0], "color": g[1], "shape2": g[2]}
        return {"kind": kind, "shape": g[0], "direction": g[1]}
    return None


# ---------------------------------------------------------------------------------------------
# Applying an instruction to a scene (generators and the oracle)
# ---------------------------------------------------------------------------------------------


def fixed_add_box(color: str, shape: str, others: Sequence[WorldObject]) -> WorldObject | None:
    """Fixed placement of an added object: side FIXED_ADD_SIZE, the first top-left corner on the
    lattice, scanning rows from the top and each row from the left, where it fits among `others`."""
    side = round(FIXED_ADD_SIZE * LATTICE)
    corners = lattice_corners(side)
    for y0 in corners:
        for x0 in corners:
            candidate = lattice_object(color, shape, x0, y0, side)
            if fits(candidate, others):
                return candidate
    return None


def _move_target(
    rng: np.random.Generator, obj: WorldObject, others: Sequence[WorldObject], direction: str, tries: int = 200,
    placement: str = "random",
) -> WorldObject | None:
    """A new position for `obj` at least MOVE_MIN + MOVE_SAFETY towards `direction`, keeping the
    perpendicular coordinate, inside the canvas and clear of the others. A box on the 1/128
    lattice stays on it. "fixed" placement: the shortest such move (lattice steps outward)."""
    dx, dy = _DIR_VECTORS[direction]
    need = MOVE_MIN + MOVE_SAFETY
    half = obj.size / 2
    lo, hi = MARGIN + half, 1 - MARGIN - half
    here = obj.cx if dx else obj.cy
    lo, hi = (lo, here - need) if dx + dy < 0 else (here + need, hi)
    snap = _on_lattice(obj)
    if placement == "fixed":
        step = 1 / LATTICE if dx + dy > 0 else -1 / LATTICE
        value = here + (need if dx + dy > 0 else -need)
        if snap:
            corner = (value - half) * LATTICE  # round outward, so the move is never shorter than `need`
            value = (math.ceil(corner - 1e-9) if dx + dy > 0 else math.floor(corner + 1e-9)) / LATTICE + half
        while lo - 1e-9 <= value <= hi + 1e-9:
            moved = obj.moved(value, obj.cy) if dx else obj.moved(obj.cx, value)
            if fits(moved, others):
                return moved
            value += step
        return None
    for _ in range(tries):
        value = float(rng.uniform(lo, hi)) if lo <= hi else math.nan
        if snap and value == value:
            value = round((value - half) * LATTICE) / LATTICE + half  # keep the corner on the lattice
        if not lo - 1e-9 <= value <= hi + 1e-9:  # also rejects NaN (no room at all)
            if lo > hi:
                return None
            continue
        moved = obj.moved(value, obj.cy) if dx else obj.moved(obj.cx, value)
        if fits(moved, others):
            return moved
    return None


def _on_lattice(obj: WorldObject) -> bool:
    corners = ((obj.cx - obj.size / 2) * LATTICE, (obj.cy - obj.size / 2) * LATTICE, obj.size * LATTICE)
    return all(abs(v - round(v)) < 1e-6 for v in corners)


def apply_instruction(rng: np.random.Generator, scene: Scene, instruction: str, placement: str = "random") -> Edit | None:
    """Apply an instruction to a scene. None when it does not parse, its `the {shape}` does not
    occur exactly once, or there is no room (add / move); `placement`: see the module's docstring."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    parsed = parse_instruction(instruction)
    if parsed is None:
        return None
    kind = parsed["kind"]
    if kind == "add":
        if len(scene) >= MAX_OBJECTS:
            return None
        if placement == "fixed":
            new = fixed_add_box(parsed["color"], parsed["shape"], scene.objects)
        else:
            new = place_object(rng, parsed["color"], parsed["shape"], scene.objects, tries=2000)
        if new is None:
            return None
        return Edit(kind, instruction, scene, scene.add(new), None, len(scene))
    matches = [i for i, o in enumerate(scene.objects) if o.shape == parsed["shape"]]
    if len(matches) != 1:
        return None
    i = matches[0]
    obj = scene.objects[i]
    if kind == "recolor":
        return Edit(kind, instruction, scene, scene.replace(i, obj.recolored(parsed["color"])), i, i)
    if kind == "remove":
        if len(scene) < 2:
            return None
        return Edit(kind, instruction, scene, scene.replace(i, None), i, None)
    if kind == "replace":
        new = WorldObject(parsed["color"], parsed["shape2"], obj.cx, obj.cy, obj.size)
        return Edit(kind, instruction, scene, scene.replace(i, new), i, i)
    others = [o for j, o in enumerate(scene.objects) if j != i]
    moved = _move_target(rng, obj, others, parsed["direction"], placement=placement)
    if moved is None:
        return None
    return Edit(kind, instruction, scene, scene.replace(i, moved), i, i, parsed["direction"])


def sample_edit(rng: np.random.Generator, kind: str, allow_held_out: bool = False, tries: int = 100,
                placement: str = "random") -> Edit:
    """A random edit of `kind` on a random source scene.

    With `allow_held_out=False` (training) neither the source nor the target holds a held-out
    pair, so no instruction names one either. `placement`: see the module's docstring.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {', '.join(EDIT_KINDS)}")
    for _ in range(tries):
        n = int(rng.integers(2 if kind == "remove" else 1, (3 if kind == "add" else 4) + 1))
        source = sample_scene(rng, n, allow_held_out)
        unique = [o for o in source.objects if source.count(o.shape) == 1]
        obj = unique[int(rng.integers(len(unique)))] if unique else None
        if kind == "add":
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            options = colors_for(shape, allow_held_out)
            instruction = instruction_text(kind, color=options[int(rng.integers(len(options)))], shape=shape)
        elif obj is None:
            continue
        elif kind == "recolor":
            options = [c for c in colors_for(obj.shape, allow_held_out) if c != obj.color]
            instruction = instruction_text(kind, shape=obj.shape, color=options[int(rng.integers(len(options)))])
        elif kind == "remove":
            instruction = instruction_text(kind, shape=obj.shape)
        elif kind == "replace":
            shape2 = [s for s in SHAPES if s != obj.shape][int(rng.integers(len(SHAPES) - 1))]
            options = colors_for(shape2, allow_held_out)
            color = options[int(rng.integers(len(options)))]
            instruction = instruction_text(kind, shape=obj.shape, color=color, shape2=shape2)
        else:
            direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
            instruction = instruction_text(kind, shape=obj.shape, direction=direction)
        edit = apply_instruction(rng, source, instruction, placement)
        if edit is not None and (allow_held_out or not edit.target.has_held_out()):
            return edit
    raise RuntimeError(f"could not generate a {kind} edit in {tries} tries")


# ---------------------------------------------------------------------------------------------
# Judging an edited image
# ---------------------------------------------------------------------------------------------


def visual_centre(obj: WorldObject) -> tuple[float, float]:
    """Where the judge will see an object's centre: the centre of its shape's tight box
    (the box centre, except for stars, whose tips leave the bottom of the box empty)."""
    u0, v0, u1, v1 = SHAPE_EXTENT[obj.shape]
    x0, y0 = obj.cx - obj.size / 2, obj.cy - obj.size / 2
    return x0 + (u0 + u1) / 2 * obj.size, y0 + (v0 + v1) / 2 * obj.size


def near_centre(obj, centre: tuple[float, float]) -> bool:
    """Whether a found object's centre lies within 0.05*S (`EDIT_TOL`) of `centre`."""
    return math.hypot(obj.cx - centre[0], obj.cy - centre[1]) <= EDIT_TOL


def moved_far_enough(edit: Edit, obj) -> bool:
    """Whether a found object's centre lies at least 0.15*S (`MOVE_MIN`) beyond the moved object's
    old centre in the move's direction."""
    (ox, oy), (dx, dy) = visual_centre(edit.source.objects[edit.index]), _DIR_VECTORS[edit.direction]
    return (obj.cx - ox) * dx + (obj.cy - oy) * dy >= MOVE_MIN


def edit_succeeded(edit: Edit, found: Sequence) -> tuple[bool, str]:
    """docs/world.md's success rule for the judge's objects `found` in the edited image.

    Same multiset of (color, shape) as the expected target; every untouched object within
    0.05*S of its old centre; recolored and replaced objects within 0.05*S of the old centre;
    a moved object's centre at least 0.15*S further in its direction; an added one anywhere.
    Old centres are where the judge sees them in the source render (`visual_centre`).
    """
    expected = edit.target.objects

    def ok(i: int, j: int) -> bool:
        e, f = expected[i], found[j]
        if e.pair != f.pair:
            return False
        if i == edit.new_index and edit.kind == "add":
            return True
        if i == edit.new_index and edit.kind == "move":
            return moved_far_enough(edit, f)
        return near_centre(f, visual_centre(e))

    if sorted(e.pair for e in expected) != sorted(f.pair for f in found):
        want = ", ".join(f"{c} {s}" for c, s in sorted(e.pair for e in expected))
        got = ", ".join(f"{c} {s}" for c, s in sorted(f.pair for f in found))
        return False, f"expected objects [{want}], found [{got}]"
    if perfect_matching(len(expected), len(found), ok) is None:
        return False, "objects are not where the instruction leaves them"
    return True, ""


def edit_has_held_out(edit: Edit) -> bool:
    """True when the source or the target holds a held-out pair (the held-out slice)."""
    return any(p in HELD_OUT for p in edit.target.pairs + edit.source.pairs)
