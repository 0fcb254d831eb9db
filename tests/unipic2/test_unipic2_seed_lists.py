"""UniPic-2 adapters with one seed per prompt: a batched image equals the prompt drawn alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unipic.unipic2 import load_unipic2_pipeline
from unipic.unipic2.tiny import random_image


@pytest.fixture(scope="module")
def kontext(kontext_folder):
    return load_unipic2_pipeline(kontext_folder, device="cpu", dtype=torch.float32)


def _px(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_kontext_seed_list_generation_and_edit(kontext):
    batched = kontext.text_to_image(["a cat", "a dog"], height=32, width=32, seed=[4, 9], steps=2)
    [[solo]] = kontext.text_to_image(["a dog"], height=32, width=32, seed=9, steps=2)
    assert np.abs(_px(batched[1][0]) - _px(solo)).max() <= 2
    sources = [random_image(32, 32, seed=1), random_image(32, 32, seed=2)]
    edited = kontext.edit_image(sources, ["red", "blue"], height=32, width=32, seed=[5, 6], steps=2)
    [alone] = kontext.edit_image(sources[1:], ["blue"], height=32, width=32, seed=6, steps=2)
    assert np.abs(_px(edited[1]) - _px(alone)).max() <= 2


def test_kontext_seed_lists_are_checked_before_sampling(kontext):
    from unipic.api import UserError

    with pytest.raises(UserError, match="got 1 seeds for 2 prompts; give one seed per prompt"):
        kontext.text_to_image(["a cat", "a dog"], height=32, width=32, seed=[1], steps=2)
    sources = [random_image(32, 32, seed=1), random_image(32, 32, seed=2)]
    with pytest.raises(UserError, match=r"seed\[1\]=-2: must be an integer from 0"):
        kontext.edit_image(sources, ["red", "blue"], height=32, width=32, seed=[1, -2], steps=2)
    request = kontext.check_inputs("text_to_image", ["a cat", "a dog"], height=32, width=32, seed=[4, 9])
    assert request.seed == [4, 9]
