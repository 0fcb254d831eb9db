"""UniPic-2: each request is checked once (the adapter's `check_inputs` / `check_inpaint`; the diffusers
pipeline then samples the checked values through `sample_checked`), and guidance is off at cfg <= 1."""

from __future__ import annotations

import numpy as np
import pytest

import unipic.checks as checks
import unipic.inpainting as inpainting
import unipic.unipic2.adapters as adapters
import unipic.unipic2.pipeline_kontext as pipeline_kontext
from unipic.unipic2.adapters import KontextUnifiedPipeline
from unipic.unipic2.tiny import random_image

FAST = {"steps": 1}


@pytest.fixture
def calls(monkeypatch, kontext_pipe):
    """Counts, per request: the adapter's size checks, cfg checks, mask checks and grows, and the
    diffusers pipeline's own input checks (which only its public `__call__` runs)."""
    counts: dict[str, int] = {}

    def count(module, name, label, only=None):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            if only is None or only in args:
                counts[label] = counts.get(label, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(adapters, "check_size", "size")
    count(pipeline_kontext, "check_size", "size")
    count(checks, "check_number", "cfg", only="cfg")  # the diffusion families' option check
    count(inpainting, "check_mask", "check_mask")
    count(inpainting, "grow_mask", "grow_mask")
    count(pipeline_kontext, "check_mask", "check_mask")
    count(pipeline_kontext, "grow_mask", "grow_mask")
    for method in ("check_inputs", "check_reference_images", "check_inpaint_inputs"):
        count(kontext_pipe, method, f"pipeline.{method}")
    return counts


def test_generate_edit_and_inpaint_are_checked_once(kontext_pipe, calls):
    adapter = KontextUnifiedPipeline(kontext_pipe)
    adapter.text_to_image(["a cat"], height=32, width=48, seed=1, cfg=2.0, **FAST)
    assert calls == {"size": 1, "cfg": 1}
    calls.clear()
    [edited] = adapter.edit_image([random_image(96, 48, seed=2)], ["make it red"], image_size=64, seed=1, cfg=2.0,
                                  **FAST)
    assert edited.size == (64, 32) and calls == {"size": 1, "cfg": 1}
    calls.clear()
    mask = np.zeros((32, 48), dtype=bool)
    mask[8:24, 8:24] = True
    [inpainted] = adapter.inpaint([random_image(48, 32, seed=3)], [mask], ["a cat"], grow=2, seed=1, cfg=2.0, **FAST)
    assert inpainted.size == (48, 32)
    assert calls == {"size": 1, "cfg": 1, "check_mask": 1, "grow_mask": 1}


def test_the_diffusers_call_still_checks_its_own_inputs(kontext_pipe, calls):
    # The diffusers-compatible `__call__` is a public entry of its own: it checks, then samples.
    kontext_pipe(prompt="a cat", height=32, width=32, num_inference_steps=1, output_type="latent")
    assert calls == {"size": 1, "pipeline.check_inputs": 1}


@pytest.mark.parametrize("cfg", [0.0, 0.5, 1.0])
def test_guidance_is_off_at_cfg_one_or_below(kontext_pipe, cfg):
    adapter = KontextUnifiedPipeline(kontext_pipe)

    def draw(scale, negative=""):
        [[image]] = adapter.text_to_image(["a cat"], height=32, width=32, seed=4, cfg=scale, negative_prompt=negative,
                                          steps=2)
        return np.asarray(image)

    unguided = draw(1.0)
    # cfg <= 1: the conditional prediction alone, so neither the scale nor the negative prompt matters.
    assert np.array_equal(draw(cfg), unguided)
    assert np.array_equal(draw(cfg, negative="blurry"), unguided)
    assert not np.array_equal(draw(2.0), unguided)
