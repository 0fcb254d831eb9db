"""One seed per prompt (`seed=[...]`): a batched image equals the same prompt drawn alone with its seed.

This is what lets `unipic serve` batch unrelated requests without changing anyone's image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unipic.api import UserError
from unipic.unipic1.sampling.rng import GeneratorGroups, rand, randn


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_one_group_draws_what_the_plain_generator_draws():
    plain = torch.randn((6, 3), generator=torch.Generator().manual_seed(4))
    grouped = randn((6, 3), GeneratorGroups([torch.Generator().manual_seed(4)], [2]))
    assert torch.equal(plain, grouped)


def test_groups_split_rows_in_proportion():
    groups = GeneratorGroups([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], [1, 2])
    draw = rand((6, 4), groups)  # 2 rows per image: rows 0-1 from seed 1, rows 2-5 from seed 2
    assert torch.equal(draw[:2], torch.rand((2, 4), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(draw[2:], torch.rand((4, 4), generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError):
        randn((5, 4), groups)  # 5 rows cannot be split over 3 images


def test_unipic1_batched_images_equal_solo_images(tiny_pipeline):
    prompts = ["a red circle", "two blue squares left of a long green triangle", "x"]
    seeds = [5, 6, 7]
    batched = tiny_pipeline.text_to_image(prompts, seed=seeds, height=32, width=48, steps=3)
    for row, prompt, seed in zip(batched, prompts, seeds):
        [[solo]] = tiny_pipeline.text_to_image([prompt], seed=seed, height=32, width=48, steps=3)
        assert np.abs(_px(row[0]) - _px(solo)).max() <= 2  # batched float arithmetic may round differently
    assert np.abs(_px(batched[0][0]) - _px(batched[1][0])).mean() > 5


def test_unipic1_seed_list_with_several_images_and_small_batches(tiny_pipeline):
    [one] = tiny_pipeline.text_to_image(["a star"], seed=3, images_per_prompt=2, height=32, width=32)
    both = tiny_pipeline.text_to_image(["a star", "a moon"], seed=[3, 4], images_per_prompt=2, height=32, width=32,
                                       batch_size=3)  # a prompt's images split across forward passes
    assert all(np.abs(_px(a) - _px(b)).max() <= 2 for a, b in zip(one, both[0]))


def test_unipic1_edit_seed_list(tiny_pipeline):
    sources = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))]
    batched = tiny_pipeline.edit_image(sources, ["make it blue", "remove it"], seed=[1, 2], height=32, width=32,
                                       steps=2)
    [solo] = tiny_pipeline.edit_image(sources[1:], ["remove it"], seed=2, height=32, width=32, steps=2)
    assert np.abs(_px(batched[1]) - _px(solo)).max() <= 2


def test_seed_list_must_match_the_prompts(tiny_pipeline):
    with pytest.raises(UserError, match="one seed per prompt"):
        tiny_pipeline.text_to_image(["a", "b"], seed=[1])
    with pytest.raises(UserError, match=r"seed\[0\]='1': must be an integer"):
        tiny_pipeline.text_to_image(["a"], seed=["1"])
    with pytest.raises(UserError, match=r"seed\[1\]=-1: must be an integer from 0"):
        tiny_pipeline.text_to_image(["a", "b"], seed=[1, -1])
    with pytest.raises(UserError, match=r"seed\[0\]=1.5: must be an integer"):
        tiny_pipeline.edit_image([Image.new("RGB", (8, 8))], ["x"], seed=[1.5])


def test_check_inputs_validates_and_returns_seed_lists(tiny_pipeline):
    from unipic.world.oracle import ShapesOracle

    request = tiny_pipeline.check_inputs("text_to_image", ["a", "b"], seed=(3, 4), height=32, width=32)
    assert request.seed == [3, 4]
    assert tiny_pipeline.check_inputs("text_to_image", ["a"], seed=3, height=32, width=32).seed == 3
    with pytest.raises(UserError, match=r"seed\[0\]=18446744073709551616: must be an integer from 0"):
        tiny_pipeline.check_inputs("text_to_image", ["a"], seed=[2**64])
    with pytest.raises(UserError, match=r"seed\[0\]=True: must be an integer"):
        tiny_pipeline.check_inputs("edit_image", ["x"], [Image.new("RGB", (8, 8))], seed=[True])
    with pytest.raises(UserError, match=r"seed=\[1, 2\]: must be an integer"):  # answering takes one seed
        tiny_pipeline.check_inputs("image_to_text", ["q", "r"], [Image.new("RGB", (8, 8))] * 2, seed=[1, 2])
    source = Image.new("RGB", (64, 64), (128, 128, 128))
    with pytest.raises(UserError, match="got 1 seeds for 2 instructions; give one seed per instruction"):
        ShapesOracle().edit_image([source, source], ["x", "y"], seed=[1])


def test_oracle_seed_list_is_independent_of_the_batch():
    from unipic.world.oracle import ShapesOracle

    oracle = ShapesOracle()
    batched = oracle.text_to_image(["a red circle", "a blue square"], seed=[1, 2])
    [[solo]] = oracle.text_to_image(["a blue square"], seed=2)
    assert np.array_equal(_px(batched[1][0]), _px(solo))
