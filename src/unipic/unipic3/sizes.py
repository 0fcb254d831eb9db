"""Image sizes of UniPic-3: the shared pixel budget, the vision-encoder sizes, the output size.

Upstream (`UniPic-3/qwen_image_edit*/pipeline_qwenimage_edit.py`, the start of `__call__`) scales
all input images of one prompt *together* so their areas sum to about 1024², snaps every side
to a multiple of 32, shows the vision encoder each image at 28/32 of that size (so the 14-px
patches merged 2×2 tile it exactly), and makes the output the first image's size unless a size
is given. The functions here are that arithmetic on (width, height) pairs and PIL images.

Two guards upstream lacks (it crashes instead): a side never rounds to 0 (at least 1 pixel
after the budget, at least 32 after the snap). They only change degenerate inputs such as a
4000×10 strip next to five large photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

BUDGET_AREA = 1024**2  # pixels shared by all inputs of one prompt (upstream: ratio = 1024 / sqrt(sum w*h))
SNAP = 32  # every budgeted side is rounded to the nearest multiple of this (upstream resize_to_multiple_of)
ENCODER_PATCH, SNAP_FOR_ENCODER = 28, 32  # vision encoder sees each budgeted image scaled by 28/32
OUTPUT_MULTIPLE = 16  # VAE factor 8 x 2x2 packing: the output is floored to this multiple
RESAMPLE = Image.Resampling.BICUBIC  # PIL's default for RGB `resize`, which upstream relies on


def budget_sizes(sizes: Sequence[tuple[int, int]], area: int = BUDGET_AREA) -> list[tuple[int, int]]:
    """(width, height) of each input after the shared budget and the snap to multiples of 32.

    Returns the sizes of both resizes' end result; `budget_images` performs the two resizes.
    """
    return [snap_size(size) for size in scaled_sizes(sizes, area)]


def scaled_sizes(sizes: Sequence[tuple[int, int]], area: int = BUDGET_AREA) -> list[tuple[int, int]]:
    """(width, height) after the first resize: every image scaled by sqrt(area / sum of areas)."""
    # Written as upstream writes it (1024 / total ** 0.5), so the float rounding is the same.
    ratio = math.sqrt(area) / sum(w * h for w, h in sizes) ** 0.5
    # Python's round (half to even), as upstream uses; never 0 (upstream would crash in PIL).
    return [(max(1, round(w * ratio)), max(1, round(h * ratio))) for w, h in sizes]


def snap_size(size: tuple[int, int], multiple: int = SNAP) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of `multiple` (never below `multiple`)."""
    return tuple(max(multiple, round(side / multiple) * multiple) for side in size)  # type: ignore[return-value]


def budget_images(images: Sequence[Image.Image], area: int = BUDGET_AREA) -> list[Image.Image]:
    """Resize RGB images as upstream does: to the shared budget, then again to multiples of 32.

    Two resizes rather than one, because upstream resamples twice and we want the same pixels.
    """
    first = scaled_sizes([im.size for im in images], area)
    resized = [im.resize(size, RESAMPLE) for im, size in zip(images, first)]
    return [im.resize(snap_size(im.size), RESAMPLE) for im in resized]


def encoder_size(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) the vision encoder sees: round(side * 28 / 32); exact for multiples of 32."""
    return tuple(round(side * ENCODER_PATCH / SNAP_FOR_ENCODER) for side in size)  # type: ignore[return-value]


def encoder_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The budgeted images resized by 28/32 for Qwen2.5-VL (the processor then runs with do_resize=False)."""
    return [im.resize(encoder_size(im.size), RESAMPLE) for im in images]


def output_size(budgeted: Sequence[tuple[int, int]], height: int | None = None,
                width: int | None = None) -> tuple[int, int]:
    """(width, height) of the output: the given size, else the first budgeted input's; floored to 16.

    Upstream's scripts always pass 1024×1024; its pipeline's own default is the first image's size.
    """
    if height is None or width is None:
        width, height = budgeted[0]
    return width // OUTPUT_MULTIPLE * OUTPUT_MULTIPLE, height // OUTPUT_MULTIPLE * OUTPUT_MULTIPLE


def token_grid(size: tuple[int, int], vae_scale_factor: int = 8) -> tuple[int, int, int]:
    """(frames, rows, cols) of packed latent tokens for an image of (width, height) pixels."""
    width, height = size
    patch = vae_scale_factor * 2  # 2x2 latent patches per token
    return (1, height // patch, width // patch)


def img_shapes(output: tuple[int, int], inputs: Sequence[tuple[int, int]],
               vae_scale_factor: int = 8) -> list[tuple[int, int, int]]:
    """The transformer's `img_shapes` for one sample: the target's token grid, then each input's."""
    return [token_grid(output, vae_scale_factor)] + [token_grid(size, vae_scale_factor) for size in inputs]
