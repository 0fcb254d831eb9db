"""MetaQuery's Qwen pixel values equal transformers' torchvision ("fast") image processor's (issue 10)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.utils import is_torchvision_available

from unipic.unipic2.pipeline_metaquery import UniPic2MetaQueryPipeline

# (width, height, pinned pixel budget or None, grid (t, h, w), sha256[:16] of the float32 pixel_values).
# Digests recorded from transformers 5.24's torchvision `Qwen2VLImageProcessor` (torchvision 0.28,
# torch 2.13 CPU, x86 AVX-512) with the tiny patch sizes on `_pattern(width, height)`.
CASES = [
    (96, 64, None, [1, 4, 6], "6f7ca65ddb0864d3"),  # upscale to the minimum area
    (61, 37, None, [1, 4, 6], "9278af010ccdb733"),  # odd sizes, aspect ratio changed by rounding
    (512, 352, UniPic2MetaQueryPipeline.qwen_pixels(352, 512), [1, 22, 32], "5aa29ac9930245d3"),  # an edit input
    (30, 200, 28 * 28 * 4, [1, 10, 2], "58d8ba4c33877c3a"),  # extreme aspect, downscale
]


def _pattern(width: int, height: int) -> Image.Image:
    """Ramps plus a hard-edged checkerboard: resampling kernels differ most at edges."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), ((xx // 5 + yy // 7) % 2) * 255], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _documented(image: Image.Image, processor, height: int, width: int) -> torch.Tensor:
    """torchvision's documented steps: uint8 bicubic antialiased resize, fused normalise, Qwen patch order."""
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    if (height, width) != x.shape[-2:]:
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(processor.image_mean) * (1.0 / processor.rescale_factor)
    std = torch.tensor(processor.image_std) * (1.0 / processor.rescale_factor)
    x = (x[0].float() - mean[:, None, None]) / std[:, None, None]
    p, m, t = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    frames = x[None].expand(t, -1, -1, -1)  # (T, C, H, W): a still image repeated in time
    x = frames.reshape(t, 3, height // p // m, m, p, width // p // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(-1, 3 * t * p * p)


@pytest.mark.parametrize(("width", "height", "pixels", "grid", "digest"), CASES)
def test_metaquery_pixels_match_torchvision_processor(mq_pipe, width, height, pixels, grid, digest):
    image = _pattern(width, height)
    values, grid_thw = mq_pipe._vision_inputs([image], pixels)
    assert grid_thw.tolist() == [grid]
    processor = mq_pipe.mllm_image_processor
    expected = _documented(image, processor, grid[1] * processor.patch_size, grid[2] * processor.patch_size)
    diff = (values - expected).abs().max().item()
    assert torch.equal(values, expected), f"max abs diff {diff} from the torchvision processor's steps"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # torch's uint8 resize kernels for other CPUs may round a pixel differently (the fast
        # processor would too), so the recorded bytes are checked only where they were made.
        assert hashlib.sha256(values.numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.skipif(not is_torchvision_available(), reason="needs torchvision (the fast processor's backend)")
@pytest.mark.parametrize(("width", "height", "pixels"), [case[:3] for case in CASES])
def test_metaquery_pixels_equal_fast_processor(mq_pipe, width, height, pixels):
    try:  # transformers 4.x names the torchvision class "...Fast"; 5.x made it the default class
        from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import (
            Qwen2VLImageProcessorFast as fast_class,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as fast_class
    processor = mq_pipe.mllm_image_processor
    fast = fast_class(patch_size=processor.patch_size, merge_size=processor.merge_size,
                      temporal_patch_size=processor.temporal_patch_size)
    size = dict(processor.size) if pixels is None else {"shortest_edge": pixels, "longest_edge": pixels}
    image = _pattern(width, height)
    reference = fast(images=[image], return_tensors="pt", size=size)
    values, grid_thw = mq_pipe._vision_inputs([image], pixels)
    assert torch.equal(grid_thw, reference["image_grid_thw"])
    assert torch.equal(values, reference["pixel_values"])
