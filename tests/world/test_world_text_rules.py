"""Spec details: rendering, captions and templates, GenEval rules, relations, answer scoring
and edit success, each against a hand-built case."""

from __future__ import annotations

import numpy as np
import pytest

from unipic.world.edits import Edit, apply_instruction, edit_succeeded, parse_instruction
from unipic.world.geneval import (
    color_attr,
    colors,
    counting,
    evaluate_record,
    position,
    record_for_prompt,
    single_object,
    two_object,
)
from unipic.world.judge import judge
from unipic.world.questions import Question, score_answer
from unipic.world.render import render
from unipic.world.scene import Scene, WorldObject, relation_holds, rng_for, sample_scene
from unipic.world.spec import BACKGROUND, COLORS
from unipic.world.text import canonical_caption, parse_template

Obj = WorldObject


def test_render_colors_background_and_any_size():
    scene = Scene((Obj("orange", "square", 0.5, 0.5, 0.25),))
    for size in (64, 128, 256):
        array = np.asarray(render(scene, size))
        assert array.shape == (size, size, 3)
        assert tuple(array[0, 0]) == BACKGROUND
        assert tuple(array[size // 2, size // 2]) == COLORS["orange"]
        assert (np.all(array == COLORS["orange"], axis=2)).sum() == pytest.approx((0.25 * size) ** 2, rel=0.02)


def test_shape_geometry():
    size = 256
    for shape, centre_inside, corner_inside in [("circle", True, False), ("square", True, True),
                                                ("triangle", True, False), ("diamond", True, False),
                                                ("star", True, False), ("cross", True, False)]:
        array = np.asarray(render(Scene((Obj("red", shape, 0.5, 0.5, 0.25),)), size))
        painted = np.all(array == COLORS["red"], axis=2)
        lo = int(size * 0.375)  # box top-left pixel
        assert painted[size // 2, size // 2] == centre_inside, shape
        assert painted[lo + 1, lo + 1] == corner_inside, shape
    tri = np.all(np.asarray(render(Scene((Obj("red", "triangle", 0.5, 0.5, 0.25),)), size)) == COLORS["red"], axis=2)
    rows = np.nonzero(tri.any(axis=1))[0]
    assert tri[rows[0]].sum() < tri[rows[-1]].sum()  # apex up


def test_canonical_caption_and_articles():
    scene = Scene((Obj("white", "cross", 0.8, 0.5, 0.2), Obj("red", "circle", 0.2, 0.5, 0.2),
                   Obj("orange", "star", 0.5, 0.2, 0.2)))
    assert canonical_caption(scene) == "a red circle, an orange star and a white cross"
    assert canonical_caption(Scene((Obj("blue", "star", 0.5, 0.5, 0.2),))) == "a blue star"
    tie = Scene((Obj("red", "circle", 0.5, 0.8, 0.2), Obj("blue", "star", 0.5, 0.2, 0.2)))
    assert canonical_caption(tie) == "a blue star and a red circle"  # ties in cx: by cy


def test_templates_and_metadata_match_geneval_format():
    assert single_object("star") == {"tag": "single_object", "include": [{"class": "star", "count": 1}],
                                     "prompt": "a photo of a star"}
    assert counting("cross", 3) == {"tag": "counting", "include": [{"class": "cross", "count": 3}],
                                    "exclude": [{"class": "cross", "count": 4}], "prompt": "a photo of three crosses"}
    assert colors("orange", "circle")["prompt"] == "a photo of an orange circle"
    assert position("star", "right of", "cross") == {
        "tag": "position",
        "include": [{"class": "cross", "count": 1}, {"class": "star", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a star right of a cross"}
    assert two_object("circle", "square")["prompt"] == "a photo of a circle and a square"
    assert color_attr("red", "circle", "orange", "star")["prompt"] == "a photo of a red circle and an orange star"
    for record in (single_object("star"), counting("cross", 3), colors("orange", "circle"),
                   position("star", "right of", "cross"), two_object("circle", "square"),
                   color_attr("red", "circle", "orange", "star")):
        assert record_for_prompt(record["prompt"]) == record
    assert parse_template("a photo of a circle and a circle") is None  # shapes must differ
    assert parse_template("a photo of a bench") is None


def test_geneval_rules():
    a = Obj("red", "circle", 0.2, 0.5, 0.2)
    b = Obj("blue", "star", 0.6, 0.5, 0.2)
    assert evaluate_record(position("circle", "left of", "star"), [a, b])[0]
    assert not evaluate_record(position("circle", "right of", "star"), [a, b])[0]
    assert not evaluate_record(position("circle", "above", "star"), [a, b])[0]
    # Every pair must hold: a second circle right of the star breaks it.
    assert not evaluate_record(position("circle", "left of", "star"), [a, b, Obj("red", "circle", 0.9, 0.2, 0.1)])[0]
    # Counting: at least n (include) and fewer than n+1 (exclude).
    two = [Obj("red", "cross", 0.2, 0.2, 0.2), Obj("red", "cross", 0.6, 0.6, 0.2)]
    assert evaluate_record(counting("cross", 2), two)[0]
    assert not evaluate_record(counting("cross", 3), two)[0]
    assert not evaluate_record(counting("cross", 2), two + [Obj("red", "cross", 0.8, 0.2, 0.2)])[0]
    # Colors: the object of that shape must have that color; extra objects are fine.
    assert evaluate_record(colors("blue", "star"), [a, b])[0]
    assert not evaluate_record(colors("red", "star"), [a, b])[0]
    assert evaluate_record(color_attr("red", "circle", "blue", "star"), [a, b])[0]
    assert not evaluate_record(color_attr("blue", "circle", "red", "star"), [a, b])[0]


def test_relation_threshold_is_strict():
    a, b = Obj("red", "circle", 0.3, 0.5, 0.2), Obj("red", "star", 0.3 + 0.0625, 0.5, 0.2)
    assert not relation_holds("left of", a, b)  # exactly t apart: not left of
    assert relation_holds("left of", a, Obj("red", "star", 0.3 + 0.0626, 0.5, 0.2))
    assert relation_holds("above", Obj("red", "star", 0.5, 0.2, 0.2), Obj("red", "star", 0.5, 0.3, 0.2))


def test_answer_scoring():
    q = Question("color", "What color is the star?", "blue")
    assert score_answer(q, " Blue. ")["correct"] and not score_answer(q, "red")["correct"]
    cap = Question("caption", "Describe the image.", "a red circle, a blue star and a red circle")
    assert score_answer(cap, "A red circle, a blue star and a red circle.") == {"correct": True, "multiset": True,
                                                                                 "strict": True}
    assert score_answer(cap, "two red circles and a blue star") == {"correct": True, "multiset": True,
                                                                     "strict": False}
    assert not score_answer(cap, "a red circle and a blue star")["correct"]


def test_edit_parsing_and_success_rules():
    assert parse_instruction("Replace the star with an orange cross.") == {
        "kind": "replace", "shape": "star", "color": "orange", "shape2": "cross"}
    source = Scene((Obj("red", "circle", 0.35, 0.5, 0.2), Obj("blue", "star", 0.75, 0.5, 0.2)))
    move = apply_instruction(rng_for(0, 1), source, "Move the circle to the right.")
    assert move is None  # the star blocks every position far enough right
    move = apply_instruction(rng_for(0, 1), source, "Move the circle to the bottom.")
    assert move.target.objects[0].cy >= 0.5 + 0.15
    ok, _ = edit_succeeded(move, judge(render(move.target)))
    assert ok
    short = Scene((Obj("red", "circle", 0.35, 0.6, 0.2), source.objects[1]))  # moved only 0.1
    assert not edit_succeeded(move, judge(render(short)))[0]
    # Untouched objects must stay within 0.05*S.
    recolor = apply_instruction(rng_for(0, 2), source, "Change the color of the star to green.")
    drifted = Scene((Obj("red", "circle", 0.35 + 0.06, 0.5, 0.2), Obj("green", "star", 0.75, 0.5, 0.2)))
    assert edit_succeeded(recolor, judge(render(recolor.target)))[0]
    assert not edit_succeeded(recolor, judge(render(drifted)))[0]
    # The edited shape must occur exactly once.
    twice = Scene((Obj("red", "circle", 0.25, 0.5, 0.2), Obj("blue", "circle", 0.75, 0.5, 0.2)))
    assert apply_instruction(rng_for(0, 3), twice, "Remove the circle.") is None
    assert isinstance(Edit.from_dict(recolor.to_dict()), Edit)


def test_sample_scene_respects_spec():
    for i in range(300):
        scene = sample_scene(rng_for(9, i), allow_held_out=True)
        scene.validate()
    with pytest.raises(ValueError, match="gap"):
        Scene((Obj("red", "circle", 0.3, 0.3, 0.2), Obj("red", "circle", 0.51, 0.3, 0.2))).validate()
