"""Render Shapes-world scenes to RGB images at any size S.

Each pixel's color is the background blended with the object color by the fraction of the pixel
the shape covers, estimated on a `supersample` x `supersample` grid of sub-pixel samples (a box
filter after supersampling). Objects never overlap, so per-object blending is exact. Shapes come
from `geometry.shape_mask`, the same tests the judge renders its templates with.

The default is `supersample=1`: each pixel takes the object's color when its centre lies in the
shape, which is exactly how the judge samples its shape templates, so hard edges on the 1/128
lattice keep every shape at least 0.05 IoU clear of the runner-up (checked exhaustively in the
tests). docs/world.md allows anti-aliased edges too: `supersample=4` gives smoother pictures that
the judge still reads right at every size in [0.16, 0.28]·S (tested at S = 128 and 256, also
under a 0.7 px blur).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from unipic.world.geometry import shape_mask
from unipic.world.scene import Scene, WorldObject
from unipic.world.spec import BACKGROUND, COLORS, DEFAULT_SIZE


def coverage(obj: WorldObject, size: int, supersample: int = 1) -> tuple[slice, slice, np.ndarray]:
    """Fraction of each pixel covered by `obj` on a canvas of side `size`.

    Returns:
        (rows, cols, alpha): the pixel window the box touches and its coverage in [0, 1],
        shape (rows, cols).
    """
    x0, y0, x1, y1 = (c * size for c in obj.box)
    side = obj.size * size
    c0, c1 = max(0, math.floor(x0)), min(size, math.ceil(x1))
    r0, r1 = max(0, math.floor(y0)), min(size, math.ceil(y1))
    offsets = (np.arange(supersample) + 0.5) / supersample  # sub-pixel sample positions
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).ravel()
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).ravel()
    inside = shape_mask(obj.shape, ((xs - x0) / side)[None, :], ((ys - y0) / side)[:, None])
    h, w = r1 - r0, c1 - c0
    alpha = inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))
    return slice(r0, r1), slice(c0, c1), alpha


def render_array(scene: Scene, size: int = DEFAULT_SIZE, supersample: int = 1) -> np.ndarray:
    """Render `scene` to a float32 array (size, size, 3) with values in [0, 255]."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        rows, cols, alpha = coverage(obj, size, supersample)
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        region = canvas[rows, cols]
        canvas[rows, cols] = region + alpha[..., None].astype(np.float32) * (color - region)
    return canvas


def render(scene: Scene, size: int = DEFAULT_SIZE, supersample: int = 1) -> Image.Image:
    """Render `scene` to an RGB PIL image of side `size`.

    Args:
        scene: the scene (coordinates are fractions of the side, so any size works).
        size: canvas side S in pixels (evaluation uses S >= 128).
        supersample: sub-pixel samples per axis; 1 (default) gives hard edges sampled at pixel
            centres, larger values anti-alias.
    """
    array = render_array(scene, size, supersample)
    return Image.fromarray(np.rint(array).astype(np.uint8))
