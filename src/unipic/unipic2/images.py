"""Input-image handling shared by the UniPic-2 pipelines: mode conversion, sizes, resizing.

Upstream crashes on RGBA or greyscale inputs, asserts bare on size mismatches, and its
longer-edge resize can round the short side to 0 (spec §10.3, §10.10). These helpers fix that.
Edit sources are resized straight to the output size by default, as upstream's editing scripts
do; centre-cropping to the output's aspect ratio first is an option (`resize_input`).
"""

from __future__ import annotations

from PIL import Image

from unipic.api import UserError
from unipic.checks import INPUT_RESIZE_MODES, check_choice
from unipic.checks import check_size as check_side
from unipic.images import to_rgb  # noqa: F401  (re-exported: the UniPic-2 pipelines composite onto white)

# Negative prompt of the upstream editing scripts (spec §3), used as the default for edits.
EDIT_NEGATIVE_PROMPT = (
    "blurry, low quality, low resolution, distorted, deformed, broken content, missing parts, damaged details, "
    "artifacts, glitch, noise, pixelated, grainy, compression artifacts, bad composition, wrong proportion, "
    "incomplete editing, unfinished, unedited areas."
)


def check_size(height: int, width: int, *, multiple: int, max_side: int, what: str = "image") -> None:
    """Raise `UserError` unless height and width are positive multiples of `multiple` and <= `max_side`."""
    for name, value in (("height", height), ("width", width)):
        # The one size rule of the package (unipic.checks), at this family's multiple.
        check_side(value, name, multiple)
        if value > max_side:
            raise UserError(f"{what} {name}={value} exceeds the model's maximum {max_side}; use a smaller size")


def round_to_multiple(value: float, multiple: int) -> int:
    """Round to the nearest multiple of `multiple`, never below `multiple` (upstream could reach 0)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def longer_edge_size(width: int, height: int, longer_edge: int, multiple: int = 32) -> tuple[int, int]:
    """Output (width, height) for the "fix the longer edge" rule of the upstream editing scripts.

    The longer side becomes `longer_edge`, the shorter side keeps the aspect ratio; both are
    rounded to the nearest multiple of `multiple` (upstream rounded only the short side).
    """
    scale = longer_edge / max(width, height)
    return round_to_multiple(width * scale, multiple), round_to_multiple(height * scale, multiple)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop `image` to the aspect ratio of (width, height), then resize to it (bicubic).

    The same behaviour as UniPic-1's edit command, so a forced output size never distorts the input.
    """
    if image.size == (width, height):
        return image
    in_w, in_h = image.size
    if in_w * height > in_h * width:  # too wide: crop the sides
        crop_w, crop_h = round(in_h * width / height), in_h
    else:  # too tall: crop top and bottom
        crop_w, crop_h = in_w, round(in_w * height / width)
    left, top = (in_w - crop_w) // 2, (in_h - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((width, height), Image.Resampling.BICUBIC, box=box)


def resize_input(image: Image.Image, width: int, height: int, mode: str = "stretch") -> Image.Image:
    """Bring an edit source to (width, height): "stretch" (upstream) or "crop" (centre-crop first).

    Upstream's editing scripts resize straight to the rounded size, so rounding stretches the
    image slightly (500x333 -> 512x352); doing the same keeps edits equal to upstream's.
    "crop" keeps the proportions by cutting the excess (about 3 % of the width for 3:2 inputs),
    which suits forced output sizes of another aspect ratio. Both use bicubic filtering (PIL's
    default for RGB, which upstream relied on).
    """
    if check_choice(mode, "input_resize", INPUT_RESIZE_MODES) == "crop":
        return fit(image, width, height)
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)
