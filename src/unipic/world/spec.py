"""Constants of the Shapes world, transcribed from docs/world.md (the normative spec).

Every length is a fraction of the canvas side `S`, so the world renders and is judged at any
size. Nothing in this module depends on numpy or PIL; `geometry.py` holds the shape tests.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Canvas and palette
# ---------------------------------------------------------------------------------------------

DEFAULT_SIZE = 128  # the default canvas side S
MIN_EVAL_SIZE = 128  # the judge is exact on ground-truth renders only for S >= 128 (docs/world.md)
BACKGROUND = (128, 128, 128)

# The ten GenEval colors, in the table's order (the order breaks nearest-color ties).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (245, 120, 180),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# The six shapes, in the table's order (the order breaks IoU ties in the judge).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}
SINGULARS: dict[str, str] = {plural: shape for shape, plural in PLURALS.items()}

# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

MIN_BOX = 0.16  # smallest box side s / S
MAX_BOX = 0.28  # largest box side s / S
MARGIN = 0.03  # boxes lie inside the canvas with this margin
GAP = 0.03  # any two boxes are separated by at least this gap
MIN_OBJECTS = 1
MAX_OBJECTS = 4

# Held-out color–shape pairs: never in any training image, caption, question or edit target.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("pink", "star"),
        ("green", "triangle"),
        ("brown", "cross"),
        ("white", "diamond"),
        ("yellow", "square"),
        ("blue", "circle"),
        ("orange", "star"),
        ("purple", "square"),
    }
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

# ---------------------------------------------------------------------------------------------
# Relations, judge and edits
# ---------------------------------------------------------------------------------------------

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REL_T = 0.0625  # relation threshold t / S

BG_DISTANCE = 40  # a pixel within this RGB distance of the background is background
MIN_COMPONENT = 0.08  # components smaller than (MIN_COMPONENT * S)^2 pixels are noise
MIN_IOU = 0.5  # a component whose best shape IoU is below this is not an object

EDIT_KINDS: tuple[str, ...] = ("recolor", "remove", "add", "replace", "move")
DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
MOVE_MIN = 0.15  # a moved object's centre moves at least this far in the named direction
EDIT_TOL = 0.05  # untouched (and recolored / replaced) objects stay within this of their old centre

# ---------------------------------------------------------------------------------------------
# Generator safety margins (ours, not docs/world.md's)
# ---------------------------------------------------------------------------------------------
# The judge measures a centre as the centre of the component's bounding box. For a star that is
# up to 0.048*s (<= 0.0134*S) above its box centre, and pixel quantisation adds up to 0.5 px, so
# whenever a generator *asserts* a relation or a move it keeps this much extra margin, so that the
# judge (ours or an independent one) reads the ground-truth render the same way.
REL_SAFETY = 0.03  # generated relations hold with margin REL_T + REL_SAFETY (box centres)
MOVE_SAFETY = 0.03  # generated moves go at least MOVE_MIN + MOVE_SAFETY
CAPTION_SEP = 0.02  # scenes captioned left to right keep centres this far apart in x
