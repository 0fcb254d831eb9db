"""The six shapes as point-membership tests in box coordinates (docs/world.md §3).

Box coordinates run from (0, 0) at the box's top-left to (1, 1) at its bottom-right, y down.
The renderer samples these tests on a supersampled grid and the judge samples them at pixel
centres, so both read the one definition below.
"""

from __future__ import annotations

import math

import numpy as np

from unipic.world.spec import SHAPES


def _star_polygon() -> np.ndarray:
    """Five-pointed star: first point straight up, outer radius 0.5, inner 0.25, centre (0.5, 0.5)."""
    points = []
    for k in range(10):
        angle = math.radians(-90.0 + 36.0 * k)  # even k: outer points, odd k: inner points
        radius = 0.5 if k % 2 == 0 else 0.25
        points.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
    return np.array(points, dtype=np.float64)


STAR_POLYGON = _star_polygon()


def _in_polygon(poly: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over the points."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        crosses = (b > v) != (d > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = a + (v - b) * (c - a) / (d - b)
        inside ^= crosses & (u < x_at)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask: which points (u, v), in box coordinates, lie inside `shape`.

    Args:
        shape: one of `SHAPES`.
        u, v: arrays of box coordinates (broadcastable to one shape), x and y.

    Returns:
        A boolean array of the broadcast shape.
    """
    in_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return in_box
    if shape == "triangle":  # apex (0.5, 0), base (0, 1)-(1, 1)
        return in_box & (np.abs(u - 0.5) <= 0.5 * v)
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    if shape == "star":
        return _in_polygon(STAR_POLYGON, u, v)
    if shape == "cross":  # union of the bars x in [1/3, 2/3] and y in [1/3, 2/3]
        bar_x = (u >= 1 / 3) & (u <= 2 / 3)
        bar_y = (v >= 1 / 3) & (v <= 2 / 3)
        return in_box & (bar_x | bar_y)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _extent(shape: str) -> tuple[float, float, float, float]:
    if shape == "star":
        xs, ys = STAR_POLYGON[:, 0], STAR_POLYGON[:, 1]
        return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    return 0.0, 0.0, 1.0, 1.0


# Tight bounding box of each shape inside its box (its outline box), (u0, v0, u1, v1). Only the
# star is smaller than its box (0.951 wide, 0.905 tall), which is why the judge's centre of a star
# sits above its box centre. The judge fits each template by this box (docs/world.md §8 step 3),
# and `Detection.to_object` uses it to recover the box from a component.
SHAPE_EXTENT: dict[str, tuple[float, float, float, float]] = {s: _extent(s) for s in SHAPES}
