"""Masks for inpainting and outpainting, shared by every model family and the CLI.

A mask is a boolean (H, W) array, True where pixels are regenerated ("white = regenerate" in a
mask PNG). The steps every family takes, in order:

1. `check_mask`: read the user's mask (PIL image, numpy array or tensor) and refuse a wrong size,
   an empty mask or one that covers everything;
2. `grow_mask`: optionally dilate it by a few pixels (a square neighbourhood), so that the seam lands
   on pixels the user does not care about;
3. the family reduces it to its own grid (`token_grid_mask`: a UniPic-1 token, or a UniPic-2 latent
   cell, is regenerated when any of its pixels is masked) and samples;
4. `composite`: the decoded image is blended into the source with `feather_alpha`, a ramp that
   rises from 0 at the mask's edge to 1 `feather` pixels inside it, so every pixel outside the
   (grown) mask is exactly the source's.

Outpainting (`outpaint_canvas`) pads the source with copies of its edge pixels, masks the new
border and inpaints it; `outpaint_request` builds that checked request for any pipeline that
inpaints, and `outpaint_with` runs it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
from PIL import Image

from unipic.api import CheckedInputs, UserError, check_texts
from unipic.checks import show

DEFAULT_GROW = 0  # pixels the mask is dilated by before use
DEFAULT_FEATHER = 4  # pixels over which the generated image fades into the source, inside the mask
OUTPAINT_MULTIPLE = 16  # outpaint padding: the 16-pixel stride of UniPic-1 tokens and UniPic-2 patches
MAX_GROW = 4096


def check_mask(mask: object, size: tuple[int, int], name: str = "mask") -> np.ndarray:
    """A user mask as a bool (H, W) array for an image of `size` = (W, H); `UserError` if unusable.

    Accepts a PIL image (any mode; pixels >= 128 in greyscale are masked, so white = regenerate),
    a numpy array or a torch tensor of shape (H, W) (bool, or numbers where > 0.5 is masked).
    """
    width, height = size
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
            mask = mask.convert("RGBA").convert("RGB")  # transparency is not a mask: use the colour
        array = np.asarray(mask.convert("L")) >= 128
    else:
        try:
            import torch

            if isinstance(mask, torch.Tensor):
                mask = mask.detach().cpu().numpy()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if not isinstance(mask, np.ndarray):
            raise UserError(f"{name} has type {type(mask).__name__}; pass a PIL image (white = regenerate) or a "
                            "(H, W) bool array")
        if mask.ndim != 2:
            raise UserError(f"{name} has shape {tuple(mask.shape)}; a mask is a 2-D (H, W) array")
        array = mask.astype(bool) if mask.dtype == bool else np.asarray(mask, dtype=np.float64) > 0.5
    if array.shape != (height, width):
        raise UserError(f"{name} is {array.shape[1]}x{array.shape[0]} but its image is {width}x{height} (WxH); "
                        "the mask must have the image's size")
    if not array.any():
        raise UserError(f"{name} is empty: no pixel is marked for regeneration (white = regenerate)")
    if array.all():
        raise UserError(f"{name} covers the whole image, so nothing of the source is kept; "
                        "use `generate` for a new image, or leave some pixels black")
    return array


def box_mask(size: tuple[int, int], box: Sequence[int], name: str = "--box") -> np.ndarray:
    """The bool (H, W) mask of the pixel box (x0, y0, x1, y1), x1/y1 exclusive, in an image of `size` = (W, H)."""
    width, height = size
    if len(box) != 4 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box):
        raise UserError(f"{name} {box!r}: give four integers x0,y0,x1,y1")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(f"{name} {x0},{y0},{x1},{y1}: need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                        f"(the image is {width}x{height}; x1, y1 are exclusive)")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def parse_box(text: str, name: str = "--box") -> tuple[int, int, int, int]:
    """'x0,y0,x1,y1' -> four ints (a `UserError` for anything else)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"{name} {text!r}: give four integers x0,y0,x1,y1 (pixels; x1, y1 exclusive), e.g. 32,32,96,96")
    return values  # type: ignore[return-value]


def _box_any(mask: np.ndarray, radius: int) -> np.ndarray:
    """True where the (2r+1)^2 window around a pixel holds a True pixel (outside the image counts False)."""
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    # Integral image with a zero border, so every window sum is four lookups.
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    rows, cols = np.arange(height), np.arange(width)
    r0, r1 = np.clip(rows - radius, 0, height), np.clip(rows + radius + 1, 0, height)
    c0, c1 = np.clip(cols - radius, 0, width), np.clip(cols + radius + 1, 0, width)
    total = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])
    return total > 0


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate a bool mask by `pixels` (a square neighbourhood: Chebyshev distance)."""
    return _box_any(mask, int(pixels))


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight of the generated image, float32 (H, W): 0 outside the mask, rising inside it.

    A masked pixel at Chebyshev distance d (1, 2, ...) from the nearest unmasked pixel gets
    min(d, feather) / feather, so the fade happens inside the mask and unmasked pixels keep
    weight 0 exactly. The image border is not an edge: a mask touching it (outpainting) reaches
    full weight there.
    """
    if feather <= 0:
        return mask.astype(np.float32)
    depth = np.zeros(mask.shape, dtype=np.float32)
    inside = mask.copy()
    for _ in range(int(feather)):
        depth += inside
        # Erode by one pixel; pixels outside the image are masked here, so no ramp grows from the border.
        padded = np.pad(~inside, 1, constant_values=False)
        inside = ~_box_any(padded, 1)[1:-1, 1:-1] & mask
    return np.minimum(depth, feather) / float(feather)


def composite(generated: Image.Image, source: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Blend `generated` into `source` with weight `alpha` (H, W); pixels with weight 0 stay the source's."""
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    src = np.asarray(source.convert("RGB"))
    if gen.shape != src.shape:
        raise ValueError(f"generated image {gen.shape} and source {src.shape} differ in size")
    weight = alpha[..., None]
    blended = np.rint(weight * gen + (1.0 - weight) * src).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.where(weight > 0, blended, src))


def token_grid_mask(mask: np.ndarray, stride: int) -> np.ndarray:
    """(H, W) bool -> (H/stride, W/stride) bool: a cell is masked when any of its pixels is."""
    height, width = mask.shape
    if height % stride or width % stride:
        raise ValueError(f"a {width}x{height} mask does not tile into {stride}-pixel cells")
    # (h, s, w, s): the pixels of cell (i, j) are [i, :, j, :].
    return mask.reshape(height // stride, stride, width // stride, stride).any(axis=(1, 3))


def pad_to_multiple(image: Image.Image, mask: np.ndarray, multiple: int) -> tuple[Image.Image, np.ndarray]:
    """Pad image (edge pixels repeated) and mask (False: the padding is not regenerated) on the right
    and bottom to multiples of `multiple`; crop the result back with `image.crop((0, 0, W, H))`."""
    width, height = image.size
    pad_w, pad_h = -width % multiple, -height % multiple
    if not pad_w and not pad_h:
        return image, mask
    array = np.pad(np.asarray(image.convert("RGB")), ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return Image.fromarray(array), np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=False)


def check_grow_feather(grow: object, feather: object, names: Sequence[str] = ("grow", "feather")) -> tuple[int, int]:
    """`grow` and `feather` as non-negative pixel counts (`UserError` otherwise)."""
    from unipic.checks import check_int

    return (check_int(grow, names[0], minimum=0, maximum=MAX_GROW, hint=" pixels"),
            check_int(feather, names[1], minimum=0, maximum=MAX_GROW, hint=" pixels"))


def prepare_masks(sizes: Sequence[tuple[int, int]], masks: Sequence[object], grow: int, *,
                  names: Sequence[str] | None = None, grow_name: str = "grow") -> list[np.ndarray]:
    """Checked, grown bool masks, one per image size (W, H); a grown mask that covers everything is refused."""
    if isinstance(masks, (Image.Image, np.ndarray)) or not isinstance(masks, Sequence):
        raise UserError(f"masks must be a list with one mask per image, got a {type(masks).__name__}; "
                        "wrap a single mask in a list")
    if len(masks) != len(sizes):
        raise UserError(f"got {len(masks)} masks for {len(sizes)} images; give one mask per image")
    names = names or [f"masks[{i}]" for i in range(len(masks))]
    out = []
    for name, size, mask in zip(names, sizes, masks):
        array = grow_mask(check_mask(mask, size, name), grow)
        if array.all():
            raise UserError(f"{name} grown by {show(grow_name, grow)} pixels covers the whole image; "
                            f"use a smaller {grow_name}")
        out.append(array)
    return out


def rgb_request(request: CheckedInputs, background: tuple[int, int, int]) -> CheckedInputs:
    """A model-free inpainting request with its images converted to RGB (transparency onto `background`)."""
    from unipic.images import to_rgb

    request.images = [to_rgb(im, background, name=f"images[{i}]") for i, im in enumerate(request.images)]
    return request


def check_inpaint_request(images: Sequence[Image.Image], masks: Sequence[object], prompts: Sequence[str], *,
                          seed: object, grow: object, feather: object, mask_names: Sequence[str] | None = None,
                          names: Sequence[str] = ("grow", "feather", "seed")) -> CheckedInputs:
    """The family-independent checks of an inpainting request, which need no model: prompts, one image
    and one mask per prompt (checked against the image's upright size and grown, once), a seed (or one
    per prompt), grow and feather; settings hold grow and feather.

    The images stay as given: the family's `inpaint_settings` converts them to RGB (its own
    background for transparency) and adds its sampling settings. `mask_names` and `names` (grow,
    feather, seed) name the arguments in messages (the CLI passes its flags).
    """
    from unipic.checks import check_image_list, check_seeds
    from unipic.images import upright_size

    texts = check_texts(prompts, "prompts")
    seed = check_seeds(seed, len(texts), "prompt", names[2])
    grow, feather = check_grow_feather(grow, feather, names[:2])
    images = check_image_list(images, "images", len(texts), "prompts")
    sizes = [upright_size(im, name=f"images[{i}]") for i, im in enumerate(images)]
    return CheckedInputs("inpaint", texts, images, seed, 1, {"grow": grow, "feather": feather},
                         masks=prepare_masks(sizes, masks, grow, names=mask_names, grow_name=names[0]))


def check_padding(left: object = 0, right: object = 0, top: object = 0, bottom: object = 0, *,
                  names: Sequence[str] = ("left", "right", "top", "bottom"),
                  multiple: int = OUTPAINT_MULTIPLE) -> tuple[int, int, int, int]:
    """Outpainting's padding (left, right, top, bottom): multiples of `multiple`, at least one above 0."""
    from unipic.checks import check_int

    pads = []
    for value, name in zip((left, right, top, bottom), names):
        value = check_int(value, name, minimum=0, hint=f" of pixels, a multiple of {multiple}")
        if value % multiple:
            fixed = round(value / multiple) * multiple or multiple
            raise UserError(f"{name} {value}: must be a multiple of {multiple}; use {fixed}")
        pads.append(value)
    if not any(pads):
        raise UserError(f"nothing to outpaint: give at least one of {', '.join(names)} (pixels, multiples of "
                        f"{multiple})")
    return tuple(pads)  # type: ignore[return-value]


def outpaint_canvas(image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0,
                    bottom: int = 0, names: Sequence[str] = ("left", "right", "top", "bottom"),
                    multiple: int = OUTPAINT_MULTIPLE) -> tuple[Image.Image, np.ndarray]:
    """The padded canvas (edge pixels repeated outwards) and its mask (True on the new border)."""
    left, right, top, bottom = check_padding(left, right, top, bottom, names=names, multiple=multiple)
    source = np.asarray(image.convert("RGB"))
    canvas = np.pad(source, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.ones(canvas.shape[:2], dtype=bool)
    mask[top:top + source.shape[0], left:left + source.shape[1]] = False
    return Image.fromarray(canvas), mask


def outpaint_request(pipeline, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0,
                     right: int = 0, top: int = 0, bottom: int = 0, **kwargs: object) -> CheckedInputs:
    """An outpainting request as the checked inpainting request of the padded canvases.

    Every image is converted to RGB by the pipeline's rule (transparency onto its `alpha_background`),
    padded with copies of its edge pixels and masked on the new border; `pipeline.check_inpaint`
    then checks it once (keyword arguments: seed, grow, feather and sampling options).
    """
    from unipic.images import to_rgb

    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise UserError(f"images must be a list of PIL images, got a {type(images).__name__}; "
                        "wrap a single image in a list")
    background = getattr(pipeline, "alpha_background", (255, 255, 255))
    canvases, masks = [], []
    for index, image in enumerate(images):
        canvas, mask = outpaint_canvas(to_rgb(image, background, name=f"images[{index}]"), left=left, right=right,
                                       top=top, bottom=bottom)
        canvases.append(canvas)
        masks.append(mask)
    return pipeline.check_inpaint(canvases, masks, prompts, **kwargs)


def outpaint_with(pipeline, images: Sequence[Image.Image], prompts: Sequence[str], *, left: int = 0,
                  right: int = 0, top: int = 0, bottom: int = 0, progress: bool = False,
                  **kwargs: object) -> list[Image.Image]:
    """Outpaint through the pipeline: pad every image, mask the new border, inpaint it (`outpaint_request`)."""
    request = outpaint_request(pipeline, images, prompts, left=left, right=right, top=top, bottom=bottom, **kwargs)
    return pipeline.run(request, progress=progress)
