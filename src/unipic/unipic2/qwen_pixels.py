"""Qwen2-VL image preprocessing in torch ops, equal to transformers' torchvision ("fast") processor.

Upstream's environment has torchvision, so transformers hands it the torchvision Qwen2-VL image
processor (4.55 forces the fast class for Qwen2-VL). Without torchvision, `AutoImageProcessor`
returns the PIL backend, whose bicubic resize differs (pixel values up to 0.015 apart on a 64x96
image), and the difference carries into the vision features, the query states and the latents.
The fast processor's steps are plain torch ops, so we run them here on any install and take only
the settings (pixel budget, patch sizes, mean/std) from whichever processor object was loaded:

1. RGB uint8 (C, H, W) from the PIL image;
2. resize to `smart_resize(H, W)` with `interpolate(mode="bicubic", antialias=True)` on the
   uint8 tensor: torchvision's CPU path for bicubic keeps uint8 (torch's native kernel rounds and
   clamps between its two passes; a float round trip differs by several levels on sharp edges);
3. float32 `(x - 255 mean) / (255 std)`: rescale and normalise fused, as the fast processor does;
4. patchify to (t h w, C T p p), each still image repeated `temporal_patch_size` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unipic.unipic2.images import to_rgb

try:  # transformers >= 5 keeps smart_resize importable without torchvision in the PIL module
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover - transformers 4.x: the default (slow) module has it
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

# PIL resampling codes -> torch interpolate modes (Qwen2-VL ships BICUBIC = 3).
_MODES = {2: "bilinear", 3: "bicubic"}


def _setting(processor, name: str, default=None):
    value = getattr(processor, name, None)
    return default if value is None else value


def pixel_budget(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor (its `size` shortest/longest edge)."""
    size = _setting(processor, "size", {})
    low = size.get("shortest_edge") or _setting(processor, "min_pixels")
    high = size.get("longest_edge") or _setting(processor, "max_pixels")
    if not low or not high:
        raise ValueError(f"the Qwen image processor has no pixel budget (size={size!r}); expected shortest/longest_edge")
    return int(low), int(high)


def _patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H, W) -> (gh * gw, C * T * p * p) in Qwen's order: merge windows first, then patches."""
    channels, height, width = image.shape
    gh, gw = height // patch, width // patch
    x = image.reshape(channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)  # (..., C, T, p, p): a still image
    return x.reshape(gh * gw, channels * temporal * patch * patch)


def qwen_pixel_values(
    images: Sequence[Image.Image], processor, pixels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL vision inputs as the torchvision image processor computes them.

    Args:
        images: PIL images of any size and mode (converted to RGB, transparency on white).
        processor: a Qwen2-VL image processor (any backend); only its settings are read.
        pixels: pin the resized area (min_pixels = max_pixels = pixels); None uses the processor's.

    Returns:
        `(pixel_values, image_grid_thw)`: (sum of patches, C*T*p*p) float32 and (N, 3) long.
    """
    patch = int(_setting(processor, "patch_size", 14))
    merge = int(_setting(processor, "merge_size", 2))
    temporal = int(_setting(processor, "temporal_patch_size", 2))
    min_pixels, max_pixels = (pixels, pixels) if pixels is not None else pixel_budget(processor)
    resample = int(_setting(processor, "resample", 3))
    if resample not in _MODES:
        raise ValueError(f"unsupported Qwen image processor resample={resample}; expected bicubic (3) or bilinear (2)")
    scale = float(_setting(processor, "rescale_factor", 1 / 255)) if _setting(processor, "do_rescale", True) else 1.0
    normalise = _setting(processor, "do_normalize", True)
    mean = torch.tensor(_setting(processor, "image_mean", (0.0, 0.0, 0.0)), dtype=torch.float32)
    std = torch.tensor(_setting(processor, "image_std", (1.0, 1.0, 1.0)), dtype=torch.float32)

    rows, grids = [], []
    for image in images:
        array = np.asarray(to_rgb(image), dtype=np.uint8)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W) uint8
        height, width = x.shape[-2:]
        if _setting(processor, "do_resize", True):
            new_h, new_w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
            if (new_h, new_w) != (height, width):  # torchvision returns the image untouched at equal size
                x = F.interpolate(x, size=(new_h, new_w), mode=_MODES[resample], align_corners=False, antialias=True)
        x = x[0].to(torch.float32)  # (3, h, w)
        if normalise:  # fused as in transformers: mean and std times 1/scale (the same float32 rounding)
            x = (x - (mean * (1.0 / scale)).view(-1, 1, 1)) / (std * (1.0 / scale)).view(-1, 1, 1)
        elif scale != 1.0:
            x = x * scale
        rows.append(_patchify(x, patch, merge, temporal))
        grids.append([1, x.shape[1] // patch, x.shape[2] // patch])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.long)
