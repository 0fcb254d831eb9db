"""Reading user images: any file PIL opens, any mode, turned into the RGB the models expect.

A plain `image.convert("RGB")` is wrong for several modes: 16-bit greyscale clips to white,
transparent pixels show whatever colour hides under them, and an animated file gives whichever
frame happens to be current. `to_rgb` handles each mode explicitly; `open_image` adds the file
checks (missing, a folder, not an image, too large) as one-line `UserError`s.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unipic.api import UserError

# Modes whose alpha (or palette transparency) is composited onto a background.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# 16-bit integer greyscale modes (PNG/TIFF); full scale is 65535.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _greyscale_to_8bit(image: Image.Image) -> Image.Image:
    """Map an integer or float greyscale image onto 0..255 by its nominal range."""
    values = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        scale = 255.0 / 65535.0
    elif image.mode == "F":
        # Float images are usually 0..1; anything larger is taken as already 0..255.
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:  # "I": 32-bit ints; older Pillow opened 16-bit PNGs this way, so values above 255 mean 16-bit
        scale = 255.0 / 65535.0 if values.size and values.max() > 255 else 1.0
    values = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _require_image(image: object, name: str) -> None:
    if not isinstance(image, Image.Image):
        hint = ("open it first with unipic.images.open_image(path)" if isinstance(image, (str, os.PathLike))
                else "pass a PIL.Image.Image (e.g. PIL.Image.fromarray(array) for a uint8 HxWx3 array)")
        raise UserError(f"{name} has type {type(image).__name__}, not PIL.Image.Image; {hint}")


def upright_size(image: Image.Image, *, name: str = "image") -> tuple[int, int]:
    """(width, height) of `image` as `to_rgb` returns it (EXIF orientation applied), without converting it.

    Raises:
        UserError: `image` is not a PIL image.
    """
    _require_image(image, name)
    width, height = image.size
    # ImageOps.exif_transpose: orientations 5-8 turn the image by a quarter, swapping its sides.
    return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255), *,
           name: str = "image") -> Image.Image:
    """Return `image` as an RGB image, converting every PIL mode by what its values mean.

    - animated files: the first frame (the caller's current frame is restored afterwards);
    - EXIF orientation is applied, so a rotated photo is seen upright;
    - 16-bit and 32-bit greyscale are scaled to 8 bits, not clipped;
    - transparency (RGBA, LA, PA, palette with a transparent index) is composited onto `background`;
    - CMYK, YCbCr, LAB, HSV, 1-bit and palettes go through PIL's colour conversions.

    Raises:
        UserError: `image` is not a PIL image, or its mode has no RGB conversion.
    """
    _require_image(image, name)
    source, frame = image, (image.tell() if getattr(image, "n_frames", 1) > 1 else None)
    try:
        if frame is not None:
            image.seek(0)
            image = image.copy()
        image = ImageOps.exif_transpose(image) or image
        if image.mode == "RGB":
            return image
        if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
            return _greyscale_to_8bit(image).convert("RGB")
        if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
            # "La" (premultiplied) has no direct RGBA conversion in PIL; "LA" does.
            rgba = image.convert("LA").convert("RGBA") if image.mode == "La" else image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise UserError(f"{name} has mode {image.mode!r}, which cannot be converted to RGB ({error}); "
                        "save it as an 8-bit PNG or JPEG") from None
    finally:
        if frame is not None:
            source.seek(frame)  # leave the caller's image on the frame it was on


def open_image(path: str | os.PathLike, *, name: str = "image") -> Image.Image:
    """Open and fully decode an image file (first frame, upright by its EXIF orientation), keeping its
    mode; convert with `to_rgb`.

    Raises:
        UserError: the path is missing or a folder, the file is not a readable image, or it is
            larger than PIL's decompression-bomb limit.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{name} {path} is a folder; give an image file")
    if not path.is_file():
        raise UserError(f"{name} not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice the limit; a warning is a second stderr
            # line and the decode may still exhaust memory, so both count as too large.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) > 1:
                    image.seek(0)
                image.load()
                # Phone photos: every consumer (checks, masks, boxes, the model) sees the picture
                # the way a viewer shows it, so a mask of the displayed size fits.
                return ImageOps.exif_transpose(image.copy())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # PIL's message carries the pixel count: "Image size (N pixels) exceeds limit of M pixels ...".
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f" ({int(found.group(1)):,} pixels)" if found else ""
        raise UserError(f"{name} {path} is too large{size}: the limit is {limit:,} pixels "
                        "(PIL's decompression-bomb guard); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{name} {path} is not a readable image ({type(error).__name__})") from None


def aspect_size(width: int, height: int, side: int, stride: int) -> tuple[int, int]:
    """(height, width) of an edit's output when no size is given: the input's aspect ratio at about
    `side`² pixels, each side a multiple of `stride` (a 2:1 photo at side 128, stride 16: 96x176).

    One rule for every front end (CLI, server, Python), kept by the pipeline that applies it.
    """
    import math

    aspect = width / height
    out_width = max(stride, round(side * math.sqrt(aspect) / stride) * stride)
    out_height = max(stride, round(side / math.sqrt(aspect) / stride) * stride)
    return out_height, out_width
