"""The Shapes judge: find the objects in an image exactly as docs/world.md §8
says, with no learned detector.

1. A pixel within RGB distance 40 of the background is background; every other pixel takes the
   nearest palette color (Euclidean, ties to the earlier color in the table).
2. Connected components (8-connectivity) of each color class; components with fewer than
   (0.08*S)^2 pixels are noise.
3. Each of the six shapes is scaled uniformly and centred so that its own outline box (the tight
   box of its outline: the star's is 0.951 x 0.905 of its unit box, every other shape fills its
   box) has the component's box centre and fills the component's box along the side where the
   ratio is larger. It is sampled at pixel centres on a window holding both it and the
   component's box (its pixels outside the component's box count in the union), and the
   component's shape is the one with the highest IoU with the component's pixels (ties to the
   earlier shape). Below IoU 0.5 the component is not an object.
4. The object's color is the component's class and its centre the centre of its bounding box.

Pixel (row r, column c) covers [c, c+1] x [r, r+1]; centres and boxes are reported as
fractions of the side S. The judge is vectorised with numpy and `scipy.ndimage.label`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from unipic.world.geometry import SHAPE_EXTENT, shape_mask
from unipic.world.scene import Scene, WorldObject
from unipic.world.spec import (
    BACKGROUND,
    BG_DISTANCE,
    COLOR_NAMES,
    COLORS,
    MAX_BOX,
    MIN_BOX,
    MIN_COMPONENT,
    MIN_IOU,
    SHAPES,
)

_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.int32)  # (10, 3)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


@dataclass(frozen=True)
class Detection:
    """An object found by the judge. Coordinates are fractions of the image side S."""

    color: str
    shape: str
    cx: float  # centre of the component's bounding box
    cy: float
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1) of the component's pixels
    iou: float  # IoU of the best shape
    pixels: int  # component size in pixels

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    def to_object(self) -> WorldObject:
        """The scene object whose render this component most likely is (box recovered from the
        shape's tight extent inside its box; the size is clamped to the valid range)."""
        u0, v0, u1, v1 = SHAPE_EXTENT[self.shape]
        x0, y0, x1, y1 = self.bbox
        side = 0.5 * ((x1 - x0) / (u1 - u0) + (y1 - y0) / (v1 - v0))
        side = min(max(side, MIN_BOX), MAX_BOX)
        # The box is placed so that the shape's tight extent is centred on the component's box.
        cx = (x0 + x1) / 2 + (1 - u0 - u1) * side / 2
        cy = (y0 + y1) / 2 + (1 - v0 - v1) * side / 2
        return WorldObject(self.color, self.shape, cx, cy, side)

    def to_dict(self) -> dict:
        return {
            "color": self.color,
            "shape": self.shape,
            "cx": round(self.cx, 4),
            "cy": round(self.cy, 4),
            "bbox": [round(v, 4) for v in self.bbox],
            "iou": round(self.iou, 4),
            "pixels": self.pixels,
        }


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"the judge needs an RGB image (H, W, 3), got an array of shape {array.shape}")
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"the Shapes judge needs a square image, got {array.shape[1]}x{array.shape[0]}")
    return array


def color_classes(array: np.ndarray) -> np.ndarray:
    """Per-pixel color class: index into COLOR_NAMES, or -1 for background. (H, W) int8."""
    pixels = array.reshape(-1, 3).astype(np.int32)
    bg_dist2 = ((pixels - np.asarray(BACKGROUND, dtype=np.int32)) ** 2).sum(axis=1)
    foreground = bg_dist2 > BG_DISTANCE**2
    classes = np.full(pixels.shape[0], -1, dtype=np.int8)
    fg_pixels = pixels[foreground]
    if fg_pixels.size:
        dist2 = ((fg_pixels[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(axis=2)  # (N, 10)
        classes[foreground] = np.argmin(dist2, axis=1)  # argmin keeps the first of equals
    return classes.reshape(array.shape[:2])


def shape_ious(component: np.ndarray, r0: int, c0: int) -> np.ndarray:
    """IoU of a component with each of the six shapes (in `SHAPES` order), docs/world.md §8 step 3.

    Args:
        component: boolean crop of the component's bounding box.
        r0, c0: the crop's top-left pixel in the image. The template is not clipped to the
            canvas: the window holds all of it, as the rule says.
    """
    h, w = component.shape
    centre_x, centre_y = c0 + w / 2, r0 + h / 2
    ious = np.empty(len(SHAPES))
    for index, shape in enumerate(SHAPES):
        u0, v0, u1, v1 = SHAPE_EXTENT[shape]
        scale = max(w / (u1 - u0), h / (v1 - v0))  # unit-box side in pixels
        bx0 = centre_x - scale * (u0 + u1) / 2  # unit box's top-left, outline box centred
        by0 = centre_y - scale * (v0 + v1) / 2
        # A window holding the template's outline box and the component's box.
        gc0 = min(c0, math.floor(bx0 + scale * u0))
        gc1 = max(c0 + w, math.ceil(bx0 + scale * u1))
        gr0 = min(r0, math.floor(by0 + scale * v0))
        gr1 = max(r0 + h, math.ceil(by0 + scale * v1))
        window = np.zeros((gr1 - gr0, gc1 - gc0), dtype=bool)
        window[r0 - gr0 : r0 - gr0 + h, c0 - gc0 : c0 - gc0 + w] = component
        u = (np.arange(gc0, gc1) + 0.5 - bx0) / scale  # pixel centres in unit-box coordinates
        v = (np.arange(gr0, gr1) + 0.5 - by0) / scale
        mask = shape_mask(shape, u[None, :], v[:, None])  # (rows, cols)
        ious[index] = (mask & window).sum() / max(int((mask | window).sum()), 1)
    return ious


def _classify_component(component: np.ndarray, r0: int, c0: int) -> tuple[int, float]:
    """Best shape index and its IoU (ties go to the earlier shape in `SHAPES`)."""
    ious = shape_ious(component, r0, c0)
    best = int(np.argmax(ious))  # first of equals
    return best, float(ious[best])


def judge(image: Image.Image | np.ndarray) -> list[Detection]:
    """Find the objects in a square RGB image, left to right (by cx, ties by cy).

    Args:
        image: a PIL image (converted to RGB) or a uint8 array (S, S, 3).

    Returns:
        The detections, as fractions of S.

    Raises:
        ValueError: when the image is not square RGB.
    """
    array = _as_array(image)
    size = array.shape[0]
    classes = color_classes(array)
    min_pixels = (MIN_COMPONENT * size) ** 2
    found: list[Detection] = []
    for color_index in np.unique(classes):
        if color_index < 0:
            continue
        labels, n = ndimage.label(classes == color_index, structure=_EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        big = np.nonzero(sizes[1:] >= min_pixels)[0] + 1
        if big.size == 0:
            continue
        boxes = ndimage.find_objects(labels)
        for label in big:
            rows, cols = boxes[label - 1]
            component = labels[rows, cols] == label
            shape_index, iou = _classify_component(component, rows.start, cols.start)
            if iou < MIN_IOU:
                continue
            x0, y0, x1, y1 = cols.start / size, rows.start / size, cols.stop / size, rows.stop / size
            found.append(
                Detection(
                    color=COLOR_NAMES[int(color_index)],
                    shape=SHAPES[shape_index],
                    cx=(x0 + x1) / 2,
                    cy=(y0 + y1) / 2,
                    bbox=(x0, y0, x1, y1),
                    iou=iou,
                    pixels=int(sizes[label]),
                )
            )
    found.sort(key=lambda d: (d.cx, d.cy))
    return found


def judge_scene(image: Image.Image | np.ndarray) -> Scene:
    """The judge's reading of an image as a scene (boxes recovered from the detections)."""
    return Scene(tuple(d.to_object() for d in judge(image)))


# ---------------------------------------------------------------------------------------------
# Matching found objects against expected ones
# ---------------------------------------------------------------------------------------------


def perfect_matching(n_expected: int, n_found: int, ok: Callable[[int, int], bool]) -> list[int] | None:
    """A one-to-one assignment expected i -> found j with ok(i, j) for all i, covering all found.

    Returns the list of found indices per expected object, or None when none exists. Scenes hold
    at most a handful of objects, so plain backtracking is fast.
    """
    if n_expected != n_found:
        return None
    allowed = [[j for j in range(n_found) if ok(i, j)] for i in range(n_expected)]
    order = sorted(range(n_expected), key=lambda i: len(allowed[i]))
    assignment: dict[int, int] = {}
    used: set[int] = set()

    def search(k: int) -> bool:
        if k == len(order):
            return True
        i = order[k]
        for j in allowed[i]:
            if j not in used:
                used.add(j)
                assignment[i] = j
                if search(k + 1):
                    return True
                used.discard(j)
        return False

    return [assignment[i] for i in range(n_expected)] if search(0) else None


def matches_scene(found: Sequence[Detection], scene: Scene, tolerance: float = 0.02) -> bool:
    """True when the detections are exactly the scene: same (color, shape) multiset and a
    one-to-one matching whose centres agree within `tolerance` (fraction of S).

    The default tolerance covers the star's bounding-box centre (up to 0.0134*S above its box
    centre) plus half a pixel of quantisation.
    """
    expected = scene.objects

    def ok(i: int, j: int) -> bool:
        e, f = expected[i], found[j]
        return e.pair == f.pair and abs(e.cx - f.cx) <= tolerance and abs(e.cy - f.cy) <= tolerance

    return perfect_matching(len(expected), len(found), ok) is not None
