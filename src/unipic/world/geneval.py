"""GenEval-format prompt metadata for the Shapes world: building, checking, sampling scenes.

A metadata record is GenEval's: `{"tag", "include": [{"class", "count", "color"?,
"position"?: [relation, index]}], "exclude"?: [{"class", "count"}], "prompt"}` with shape names
as classes. docs/world.md's rules (GenEval's own):

- an `include` entry needs at least `count` objects of its class (and color, when given);
- an `exclude` entry needs fewer than `count` objects of its class (any color, as GenEval);
- `position: [rel, j]` needs every object of the entry's class to stand `rel` of every object of
  entry j's class (classes only, colors ignored, as GenEval does), with threshold t = 0.0625*S.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Sequence
from itertools import permutations

import numpy as np

from unipic.world.scene import Scene, WorldObject, colors_for, layout, relation_holds, rng_for
from unipic.world.spec import (
    ALL_PAIRS,
    COLORS,
    HELD_OUT,
    MAX_OBJECTS,
    REL_SAFETY,
    REL_T,
    RELATIONS,
    SHAPES,
    TRAIN_PAIRS,
)
from unipic.world.text import (
    TAGS,
    noun_phrase,
    parse_template,
    prompt_color_attr,
    prompt_colors,
    prompt_counting,
    prompt_position,
    prompt_single_object,
    prompt_two_object,
)

# ---------------------------------------------------------------------------------------------
# Building records
# ---------------------------------------------------------------------------------------------


def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    return record


def single_object(shape: str) -> dict:
    return _record("single_object", [{"class": shape, "count": 1}], prompt_single_object(shape))


def two_object(shape1: str, shape2: str) -> dict:
    include = [{"class": shape1, "count": 1}, {"class": shape2, "count": 1}]
    return _record("two_object", include, prompt_two_object(shape1, shape2))


def counting(shape: str, n: int) -> dict:
    exclude = [{"class": shape, "count": n + 1}]
    return _record("counting", [{"class": shape, "count": n}], prompt_counting(shape, n), exclude)


def colors(color: str, shape: str) -> dict:
    return _record("colors", [{"class": shape, "count": 1, "color": color}], prompt_colors(color, shape))


def position(shape1: str, relation: str, shape2: str) -> dict:
    # GenEval lists the reference object first: "a dog right of a teddy bear" is
    # [teddy bear, dog with position ["right of", 0]].
    include = [{"class": shape2, "count": 1}, {"class": shape1, "count": 1, "position": [relation, 0]}]
    return _record("position", include, prompt_position(shape1, relation, shape2))


def colored_position(color1: str, shape1: str, relation: str, color2: str, shape2: str) -> dict:
    """A position record whose two objects also have named colours (not a ShapesEval category)."""
    record = position(shape1, relation, shape2)
    record["include"][0]["color"] = color2  # the reference object comes first (see `position`)
    record["include"][1]["color"] = color1
    record["prompt"] = f"a photo of {noun_phrase(color1, shape1)} {relation} {noun_phrase(color2, shape2)}"
    return record


def color_attr(color1: str, shape1: str, color2: str, shape2: str) -> dict:
    include = [{"class": shape1, "count": 1, "color": color1}, {"class": shape2, "count": 1, "color": color2}]
    return _record("color_attr", include, prompt_color_attr(color1, shape1, color2, shape2))


def all_records(tag: str, allow_held_out: bool = True) -> list[dict]:
    """Every distinct prompt of a category, in a fixed order (held-out pairs optional)."""
    return copy.deepcopy(list(_records(tag, allow_held_out)))


@functools.lru_cache(maxsize=None)
def _records(tag: str, allow_held_out: bool) -> tuple[dict, ...]:
    return tuple(_build_records(tag, allow_held_out))


def _build_records(tag: str, allow_held_out: bool) -> list[dict]:
    pairs = ALL_PAIRS if allow_held_out else TRAIN_PAIRS
    if tag == "single_object":
        return [single_object(s) for s in SHAPES]
    if tag == "two_object":
        return [two_object(a, b) for a, b in permutations(SHAPES, 2)]
    if tag == "counting":
        return [counting(s, n) for s in SHAPES for n in (2, 3, 4)]
    if tag == "colors":
        return [colors(c, s) for c, s in pairs]
    if tag == "position":
        return [position(a, r, b) for a, b in permutations(SHAPES, 2) for r in RELATIONS]
    if tag == "color_attr":
        return [color_attr(c1, s1, c2, s2) for (c1, s1) in pairs for (c2, s2) in pairs if s1 != s2]
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")


def random_record(rng: np.random.Generator, tag: str, allow_held_out: bool) -> dict:
    """One prompt of category `tag`, drawn uniformly from its distinct prompts."""
    records = _records(tag, allow_held_out)
    return copy.deepcopy(records[int(rng.integers(len(records)))])


def shapes_eval_metadata(n_per_category: int, seed: int = 0) -> list[dict]:
    """The ShapesEval prompt set: `n_per_category` prompts of each of the six categories.

    Each category's distinct prompts are shuffled with the seed; when more are asked for than
    exist (single_object has 6), whole shuffled copies repeat, so coverage stays balanced.
    Held-out pairs appear (colors, color_attr) and are scored as their own slice.
    """
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    out = []
    for k, tag in enumerate(TAGS):
        rng = rng_for(seed, 900 + k)
        records = all_records(tag)
        chosen: list[dict] = []
        while len(chosen) < n_per_category:
            order = rng.permutation(len(records))
            chosen += [records[i] for i in order[: n_per_category - len(chosen)]]
        out += chosen
    return out


# ---------------------------------------------------------------------------------------------
# Checking records and judging found objects against them
# ---------------------------------------------------------------------------------------------


def validate_record(record: object, where: str = "metadata") -> dict:
    """Check one GenEval metadata record's structure; raise ValueError naming the problem."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("tag", "prompt", "include"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (GenEval records have tag, include, prompt)")
    if not isinstance(record["prompt"], str) or not isinstance(record["include"], list):
        raise ValueError(f"{where}: 'prompt' must be a string and 'include' a list")
    entries = [("include", e) for e in record["include"]] + [("exclude", e) for e in record.get("exclude", [])]
    for i, (kind, entry) in enumerate(entries):
        if not isinstance(entry, dict) or "class" not in entry or "count" not in entry:
            raise ValueError(f"{where}: every {kind} entry needs 'class' and 'count', got {entry!r}")
        if not isinstance(entry["count"], int) or entry["count"] < 0:
            raise ValueError(f"{where}: {kind} count must be a non-negative integer, got {entry['count']!r}")
        if "color" in entry and entry["color"] not in COLORS:
            raise ValueError(f"{where}: unknown color {entry['color']!r}; expected one of {', '.join(COLORS)}")
        if "position" in entry:
            pos = entry["position"]
            ok = isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
            if not ok or not 0 <= pos[1] < len(record["include"]):
                raise ValueError(f"{where}: bad position {pos!r}; expected [relation, include index]")
    return record


def is_shapes_record(record: dict) -> bool:
    """True when every class the record names is a Shapes-world shape (judgeable here)."""
    entries = record["include"] + record.get("exclude", [])
    return all(e["class"] in SHAPES for e in entries)


def names_held_out(record: dict) -> bool:
    """True when the record names a held-out color–shape pair (the held-out slice)."""
    return any((e.get("color"), e["class"]) in HELD_OUT for e in record["include"] + record.get("exclude", []))


def _matching(objects: Sequence, entry: dict) -> list:
    return [o for o in objects if o.shape == entry["class"] and o.color == entry.get("color", o.color)]


def evaluate_record(record: dict, objects: Sequence) -> tuple[bool, str]:
    """Judge found objects (anything with color, shape, cx, cy) against a metadata record.

    Returns:
        (correct, reason): the reason lists every failed requirement, empty when correct.
    """
    reasons = []
    includes = record["include"]
    for entry in includes:
        found = _matching(objects, entry)
        what = entry["class"] if "color" not in entry else f"{entry['color']} {entry['class']}"
        if len(found) < entry["count"]:
            reasons.append(f"expected {what}>={entry['count']}, found {len(found)}")
        if "position" in entry:
            rel, j = entry["position"]
            mine = [o for o in objects if o.shape == entry["class"]]
            targets = [o for o in objects if o.shape == includes[j]["class"]]
            if not targets:
                reasons.append(f"no {includes[j]['class']} for {entry['class']} to be {rel}")
            elif any(not relation_holds(rel, a, b) for a in mine for b in targets):
                reasons.append(f"expected every {entry['class']} {rel} every {includes[j]['class']}")
    for entry in record.get("exclude", []):
        found = [o for o in objects if o.shape == entry["class"]]  # GenEval counts the class, any color
        if len(found) >= entry["count"]:
            reasons.append(f"expected {entry['class']}<{entry['count']}, found {len(found)}")
    return not reasons, "; ".join(reasons)


# ---------------------------------------------------------------------------------------------
# Scenes that satisfy a record (for training and for the oracle)
# ---------------------------------------------------------------------------------------------


def scene_for_record(
    rng: np.random.Generator,
    record: dict,
    allow_held_out: bool = False,
    distractors: int = 0,
) -> Scene:
    """A valid scene that satisfies a Shapes metadata record exactly.

    Each include entry gets exactly `count` objects of its class (its color, or a random allowed
    one); positions hold with margin t + REL_SAFETY so the judge reads them unambiguously.
    `distractors` extra objects (shapes the record does not name) are added when room allows.
    """
    groups: list[int] = []
    pairs: list[tuple[str, str]] = []
    for g, entry in enumerate(record["include"]):
        shape = entry["class"]
        for _ in range(entry["count"]):
            color = entry.get("color") or _random_color(rng, shape, allow_held_out)
            pairs.append((color, shape))
            groups.append(g)
    named = {e["class"] for e in record["include"]}
    others = [s for s in SHAPES if s not in named]
    for _ in range(min(distractors, MAX_OBJECTS - len(pairs))):
        shape = others[int(rng.integers(len(others)))]
        pairs.append((_random_color(rng, shape, allow_held_out), shape))
        groups.append(-1)
    # Objects of referenced entries must be placed before the objects positioned against them.
    order = sorted(range(len(pairs)), key=lambda i: (groups[i] < 0, _depends(record, groups[i])))
    pairs_in_order = [pairs[i] for i in order]
    groups_in_order = [groups[i] for i in order]
    constraints: dict[int, Callable] = {}
    for k, g in enumerate(groups_in_order):
        if g >= 0 and "position" in record["include"][g]:
            rel, j = record["include"][g]["position"]
            constraints[k] = _relation_constraint(rel, [m for m, gg in enumerate(groups_in_order) if gg == j])
    return layout(rng, pairs_in_order, constraints)


def _depends(record: dict, g: int) -> int:
    return 1 if g >= 0 and "position" in record["include"][g] else 0


def _random_color(rng: np.random.Generator, shape: str, allow_held_out: bool) -> str:
    options = colors_for(shape, allow_held_out)
    return options[int(rng.integers(len(options)))]


def _relation_constraint(rel: str, target_indices: list[int]) -> Callable:
    def factory(placed: list[WorldObject]):
        targets = [placed[i] for i in target_indices if i < len(placed)]

        def where(cx: float, cy: float) -> bool:
            probe = WorldObject("red", "circle", cx, cy, 0.2)
            return all(relation_holds(rel, probe, t, REL_T + REL_SAFETY) for t in targets)

        return where

    return factory


def load_metadata_lines(lines: Sequence[str], source: str = "metadata") -> list[dict]:
    """Parse GenEval metadata JSONL lines (blank lines skipped) with validation."""
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} line {n}: not valid JSON ({err.msg})") from None
        records.append(validate_record(record, f"{source} line {n}"))
    if not records:
        raise ValueError(f"{source}: no metadata records found")
    return records


def record_for_prompt(prompt: str) -> dict | None:
    """The metadata record of a template prompt (see `text.parse_template`), or None."""
    f = parse_template(prompt)
    if f is None:
        return None
    tag = f["tag"]
    if tag == "single_object":
        return single_object(f["shape"])
    if tag == "two_object":
        return two_object(f["shape1"], f["shape2"])
    if tag == "counting":
        return counting(f["shape"], f["count"])
    if tag == "colors":
        return colors(f["color"], f["shape"])
    if tag == "position":
        return position(f["shape1"], f["relation"], f["shape2"])
    return color_attr(f["color1"], f["shape1"], f["color2"], f["shape2"])
