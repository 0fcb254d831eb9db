"""Canonical text-to-image layouts (`data.world_layout: canonical`): valid, faithful, judged exactly."""

import re

import numpy as np
import pytest

from unipic.data.datasets import ShapesStream
from unipic.world.canonical import (
    DEFAULT_COLORS,
    canonical_scene,
    canonical_scene_for_record,
    random_colored_relation,
)
from unipic.world.examples import t2i_example
from unipic.world.geneval import all_records, evaluate_record
from unipic.world.judge import judge, matches_scene
from unipic.world.render import render_array
from unipic.world.scene import relation_holds
from unipic.world.spec import COLORS, HELD_OUT, SHAPES
from unipic.world.text import TAGS, canonical_caption, parse_description


def test_every_record_has_a_valid_scene_that_satisfies_it():
    for tag in TAGS:
        for record in all_records(tag, allow_held_out=True):
            scene = canonical_scene_for_record(record)
            scene.validate()
            ok, why = evaluate_record(record, scene.objects)
            assert ok, (record["prompt"], why)


def test_the_judge_reads_every_shape_and_color_in_every_slot_exactly():
    for n in (1, 2, 3, 4):
        for k, shape in enumerate(SHAPES):
            for j, color in enumerate(list(COLORS)[k % 3::3]):
                pairs = [(color, shape)] + [(c, s) for c, s in zip(list(COLORS)[j:], SHAPES[k + 1:] + SHAPES)][: n - 1]
                scene = canonical_scene(pairs)
                assert matches_scene(judge(render_array(scene, 128)), scene), pairs
    vertical = canonical_scene([("red", "star"), ("white", "cross")], vertical=True)
    assert matches_scene(judge(render_array(vertical, 128)), vertical)


def test_relations_and_order_follow_the_prompt():
    record = next(r for r in all_records("position") if r["prompt"] == "a photo of a star above a circle")
    star, circle = sorted(canonical_scene_for_record(record).objects, key=lambda o: o.shape != "star")
    assert star.cy < circle.cy and star.cx == circle.cx
    record = next(r for r in all_records("color_attr") if r["prompt"] == "a photo of a red star and a white cross")
    assert [o.pair for o in canonical_scene_for_record(record).left_to_right()] == [("red", "star"), ("white", "cross")]


def test_default_colors_avoid_held_out_pairs_and_cover_every_shape():
    assert set(DEFAULT_COLORS) == set(SHAPES)
    assert not any((color, shape) in HELD_OUT for shape, color in DEFAULT_COLORS.items())


def test_canonical_stream_is_deterministic_per_text_and_never_shows_held_out_pairs():
    seen: dict[str, tuple] = {}
    for i in range(300):
        example = t2i_example(5, i, layout="canonical")
        assert not example.scene.has_held_out()
        if example.kind == "caption":
            assert example.text == canonical_caption(example.scene)
            assert sorted(parse_description(example.text)) == sorted(o.pair for o in example.scene.objects)
        key = tuple(o.to_dict().items() for o in example.scene.objects)
        assert seen.setdefault(example.text, key) == key, example.text
    assert len(seen) > 100
    assert {t2i_example(5, i, layout="canonical").kind for i in range(100)} == {"template", "caption", "relation"}


def test_colored_relations_hold_in_their_scene():
    rng = np.random.default_rng(0)
    for _ in range(50):
        text, scene = random_colored_relation(rng)
        m = re.fullmatch(r"a photo of an? (\w+) (\w+) (left of|right of|above|below) an? (\w+) (\w+)", text)
        first = next(o for o in scene.objects if o.pair == (m.group(1), m.group(2)))
        second = next(o for o in scene.objects if o.pair == (m.group(4), m.group(5)))
        assert relation_holds(m.group(3), first, second), text


def test_random_layout_is_unchanged_and_bad_layouts_are_refused():
    assert t2i_example(5, 3) == t2i_example(5, 3, layout="random")
    with pytest.raises(ValueError, match="layout"):
        t2i_example(5, 3, layout="grid")
    with pytest.raises(ValueError, match="layout"):
        ShapesStream("t2i", layout="grid")
    with pytest.raises(ValueError, match="1 to 4"):
        canonical_scene([])


def test_canonical_stream_renders_the_canonical_scene():
    stream = ShapesStream("t2i", seed=2, size=128, layout="canonical")
    example = stream.example(0)
    expected = t2i_example(2, 0, layout="canonical")
    assert example["text"] == expected.text
    assert matches_scene(judge(example["image"]), expected.scene)
