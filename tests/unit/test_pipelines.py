"""Pipelines: determinism, sizes, batching and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unipic.api import UnifiedPipeline, UserError


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_pipeline_implements_the_protocol(tiny_pipeline):
    assert isinstance(tiny_pipeline, UnifiedPipeline)
    assert tiny_pipeline.sampling_defaults()["num_iter"] == 4
    # `unipic caption` without --prompt asks this, through the protocol rather than the config.
    assert tiny_pipeline.sampling_defaults()["caption_question"] == tiny_pipeline.config.sampling.caption_prompt


def test_same_seed_same_image_different_seed_different_image(tiny_pipeline):
    a = tiny_pipeline.text_to_image(["a red circle"], seed=1)[0][0]
    b = tiny_pipeline.text_to_image(["a red circle"], seed=1)[0][0]
    c = tiny_pipeline.text_to_image(["a red circle"], seed=2)[0][0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_non_square_and_several_images_per_prompt(tiny_pipeline):
    out = tiny_pipeline.text_to_image(["a star", "two squares"], height=64, width=160, images_per_prompt=2, seed=0,
                                      cfg_schedule="linear")
    assert [len(x) for x in out] == [2, 2]
    assert all(im.size == (160, 64) and im.mode == "RGB" for row in out for im in row)
    assert not np.array_equal(np.asarray(out[0][0]), np.asarray(out[0][1])), "images of one prompt must differ"


def test_explicit_defaults_equal_implicit_defaults(tiny_pipeline):
    one = tiny_pipeline.text_to_image(["a red circle", "a blue star"], seed=3, batch_size=8)
    two = tiny_pipeline.text_to_image(["a red circle", "a blue star"], seed=3, cfg=3.0, steps=4, temperature=1.0)
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(one, two))


def test_no_guidance_path(tiny_pipeline):
    [[image]] = tiny_pipeline.text_to_image(["a circle"], seed=0, cfg=1.0, steps=2, head_steps=3)
    assert image.size == (128, 128)


def test_edit_is_reproducible_and_keeps_size(tiny_pipeline):
    source = Image.new("RGBA", (200, 120), (255, 0, 0, 128))  # any mode, any aspect
    a = tiny_pipeline.edit_image([source], ["Remove the circle."], seed=5)[0]
    b = tiny_pipeline.edit_image([source], ["Remove the circle."], seed=5)[0]
    assert a.size == (160, 96)  # no size given: the source's 5:3 aspect at about 128² pixels (aspect_size)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    wide = tiny_pipeline.edit_image([source], ["Remove the circle."], seed=5, height=64, width=128)[0]
    assert wide.size == (128, 64)


def test_batched_answers_equal_single_answers(tiny_pipeline):
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (90, 40), (30, 70, 220))]
    questions = ["Describe the image.", "How many circles are there in this picture?"]
    batched = tiny_pipeline.image_to_text(images, questions, max_new_tokens=6)
    single = [tiny_pipeline.image_to_text([im], [q], max_new_tokens=6)[0] for im, q in zip(images, questions)]
    assert batched == single


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.text_to_image([""]), "empty"),
        (lambda p: p.text_to_image("a cat"), "list of strings"),
        (lambda p: p.text_to_image(["a cat"], height=100), "multiple of 16"),
        (lambda p: p.text_to_image(["a cat"], steps=0), "steps=0: must be an integer from 1 to 64"),
        (lambda p: p.text_to_image(["a cat"], steps=1000), "has 64 tokens"),
        (lambda p: p.text_to_image(["a cat"], bogus=1), "unknown"),
        (lambda p: p.text_to_image(["a cat"], cfg_schedule="cosine"), "cfg_schedule"),
        (lambda p: p.edit_image([Image.new("RGB", (8, 8))], ["a", "b"]), "one image per instruction"),
        (lambda p: p.image_to_text([Image.new("RGB", (8, 8))], [" "]), "empty"),
    ],
)
def test_bad_inputs_raise_user_errors(tiny_pipeline, call, message):
    with pytest.raises(UserError, match=message):
        call(tiny_pipeline)


def test_reduced_precision_on_cpu(tiny_model_and_tokenizer):
    import copy

    import torch

    from unipic.unipic1.pipeline import UniPicPipeline

    model, tokenizer = tiny_model_and_tokenizer
    half = copy.deepcopy(model).to(torch.bfloat16)
    pipeline = UniPicPipeline(half, tokenizer)
    [[image]] = pipeline.text_to_image(["a red circle"], seed=0, steps=2, head_steps=2)
    assert image.size == (128, 128)
    [edited] = pipeline.edit_image([image], ["Remove the circle."], seed=0, steps=2, head_steps=2)
    assert edited.size == (128, 128)
    assert isinstance(pipeline.image_to_text([image], ["Describe the image."], max_new_tokens=2)[0], str)


def test_understanding_pixels_are_contiguous():
    """Pixels reach the VAE contiguous: a channels-last view takes another CPU GroupNorm kernel."""
    import torch

    from unipic.unipic1.sampling.prompts import images_to_tensor

    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    pixels = images_to_tensor([image, image], torch.device("cpu"))
    assert pixels.shape == (2, 3, 4, 6) and pixels.is_contiguous()
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0 * 2.0 - 1.0
    assert torch.equal(pixels[1], expected)
