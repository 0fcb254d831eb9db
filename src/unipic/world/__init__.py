"""The Shapes world (docs/world.md): an exactly specified image world for training and judging tiny
UniPic models without a learned detector.

- `spec`: the constants (palette, shapes, sizes, held-out pairs, thresholds).
- `scene`: `Scene` / `WorldObject` and seeded sampling of valid layouts.
- `render`: `render(scene, size)` to a PIL image at any size.
- `judge`: `judge(image)` finds the objects exactly as docs/world.md says.
- `text`: captions, the six GenEval-analogue templates, training descriptions, parsing.
- `geneval`: GenEval-format metadata records and their rules.
- `questions`, `edits`: understanding questions and instruction edits.
- `examples`: seeded example generators for the three tasks (training and evaluation).

The names re-exported here are functions and classes: `unipic.world.judge` and
`unipic.world.render` below are the functions, so import module internals with
`from unipic.world.judge import shape_ious` rather than `import unipic.world.judge as m`.
"""

from unipic.world.edits import Edit, apply_instruction, edit_succeeded, parse_instruction, sample_edit
from unipic.world.examples import (
    TASKS,
    I2TExample,
    T2IExample,
    edit_eval_set,
    edit_example,
    i2t_eval_set,
    i2t_example,
    make_example,
    t2i_example,
)
from unipic.world.geneval import evaluate_record, scene_for_record, shapes_eval_metadata
from unipic.world.judge import Detection, judge, judge_scene, matches_scene
from unipic.world.questions import QUESTION_KINDS, Question, score_answer
from unipic.world.render import render
from unipic.world.scene import Scene, WorldObject, rng_for, sample_scene
from unipic.world.spec import COLORS, EDIT_KINDS, HELD_OUT, SHAPES
from unipic.world.text import TAGS, canonical_caption, parse_template

__all__ = [
    "COLORS",
    "EDIT_KINDS",
    "HELD_OUT",
    "QUESTION_KINDS",
    "SHAPES",
    "TAGS",
    "TASKS",
    "Detection",
    "Edit",
    "I2TExample",
    "Question",
    "Scene",
    "T2IExample",
    "WorldObject",
    "apply_instruction",
    "canonical_caption",
    "edit_eval_set",
    "edit_example",
    "edit_succeeded",
    "evaluate_record",
    "i2t_eval_set",
    "i2t_example",
    "judge",
    "judge_scene",
    "make_example",
    "matches_scene",
    "parse_instruction",
    "parse_template",
    "render",
    "rng_for",
    "sample_edit",
    "sample_scene",
    "scene_for_record",
    "score_answer",
    "shapes_eval_metadata",
    "t2i_example",
]
