"""StableDiffusion3KontextPipeline: T2I parity with diffusers' SD3 pipeline, reproducible edits, input fixes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from unipic.api import UserError
from unipic.unipic2.images import to_rgb
from unipic.unipic2.tiny import random_image

H, W = 64, 48  # image_size_for_tests of the tiny config
STEPS = 2


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_text_to_image_equals_stock_sd3_pipeline(kontext_pipe):
    """Same weights (stock transformer class), same seed, real tiny tokenizers/encoders, CFG on."""
    components = dict(kontext_pipe.components)
    stock_transformer = SD3Transformer2DModel.from_config(kontext_pipe.transformer.config).eval()
    stock_transformer.load_state_dict(kontext_pipe.transformer.state_dict())
    components.update(transformer=stock_transformer, scheduler=copy.deepcopy(kontext_pipe.scheduler))
    stock = StableDiffusion3Pipeline(**components)
    stock.set_progress_bar_config(disable=True)
    kwargs = {"prompt": ["a red circle", "two blue squares"], "negative_prompt": ["blurry", ""], "height": H, "width": W,
                  "num_inference_steps": STEPS, "guidance_scale": 3.5, "num_images_per_prompt": 2, "output_type": "np"}
    ours = kontext_pipe(**kwargs, generator=_gen(7)).images
    theirs = stock(**kwargs, generator=_gen(7)).images
    assert ours.shape == (4, H, W, 3)
    diff = np.abs(ours - theirs).max()
    assert diff == 0.0, f"max abs diff {diff}"


def test_text_to_image_without_guidance_equals_stock(kontext_pipe):
    stock = StableDiffusion3Pipeline(**kontext_pipe.components)  # the Kontext transformer works in SD3's loop too
    stock.set_progress_bar_config(disable=True)
    kwargs = {"prompt": "a cat", "height": H, "width": W, "num_inference_steps": STEPS, "guidance_scale": 1.0, "output_type": "latent"}
    ours = kontext_pipe(**kwargs, generator=_gen(3)).images
    theirs = stock(**kwargs, generator=_gen(3)).images
    assert torch.equal(ours, theirs)


def test_edit_is_reproducible_from_the_seed(kontext_pipe):
    """Upstream sampled the reference posterior with the global RNG; we use the generator."""
    image = random_image(W, H, seed=1)
    kwargs = {"prompt": "make it red", "image": image, "num_inference_steps": STEPS, "output_type": "np"}
    torch.manual_seed(1)
    first = kontext_pipe(**kwargs, generator=_gen(5)).images
    torch.manual_seed(2)  # a different global RNG state must not matter
    second = kontext_pipe(**kwargs, generator=_gen(5)).images
    other_seed = kontext_pipe(**kwargs, generator=_gen(6)).images
    assert first.shape == (1, H, W, 3)  # height/width default to the reference size
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_reference_image_changes_the_result(kontext_pipe):
    kwargs = {"prompt": "make it red", "height": H, "width": W, "num_inference_steps": STEPS, "output_type": "latent"}
    t2i = kontext_pipe(**kwargs, generator=_gen(0)).images
    edit_a = kontext_pipe(**kwargs, image=random_image(W, H, seed=1), generator=_gen(0)).images
    edit_b = kontext_pipe(**kwargs, image=random_image(W, H, seed=2), generator=_gen(0)).images
    assert not torch.allclose(t2i, edit_a)
    assert not torch.allclose(edit_a, edit_b)


def test_reference_argmax_mode_needs_no_generator(kontext_pipe):
    image = random_image(W, H, seed=1)
    pixels = kontext_pipe.image_processor.preprocess([image], height=H, width=W)
    a = kontext_pipe.prepare_reference_latents([image], 2, H, W, torch.float32, torch.device("cpu"), None, "argmax")
    b = kontext_pipe.prepare_reference_latents([image], 2, H, W, torch.float32, torch.device("cpu"), None, "argmax")
    assert a.shape == (2, 4, H // 8, W // 8) and torch.equal(a, b)
    with torch.no_grad():
        mean = kontext_pipe.vae.encode(pixels).latent_dist.mode()
    expected = (mean - kontext_pipe.vae.config.shift_factor) * kontext_pipe.vae.config.scaling_factor
    assert torch.allclose(a[0], expected[0])


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_references_are_converted(kontext_pipe, mode):
    image = random_image(W, H, mode=mode, seed=4)
    out = kontext_pipe(prompt="x", image=image, num_inference_steps=1, generator=_gen(0), output_type="np").images
    assert out.shape == (1, H, W, 3) and np.isfinite(out).all()


def test_transparent_pixels_are_composited_on_white():
    from PIL import Image

    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2))
    assert to_rgb(palette).mode == "RGB"


def test_size_errors_are_user_errors_with_a_fix(kontext_pipe):
    with pytest.raises(UserError, match="reference image 0 is 48x64 .* but the output is 64x64"):
        kontext_pipe(prompt="x", image=random_image(W, H), height=64, width=64, num_inference_steps=1)
    with pytest.raises(UserError, match="multiple of 16.*use height=64"):
        kontext_pipe(prompt="x", height=60, width=48, num_inference_steps=1)
    with pytest.raises(UserError, match="exceeds the model's maximum 512"):
        kontext_pipe(prompt="x", height=1024, width=48, num_inference_steps=1)
    with pytest.raises(UserError, match="3 reference images for 2 prompts"):
        kontext_pipe(prompt=["a", "b"], image=[random_image(W, H)] * 3, num_inference_steps=1)


def test_skip_layer_guidance_keeps_the_reference(kontext_pipe, monkeypatch):
    """Upstream's extra skip-layer forward dropped the reference latents (spec §10.2)."""
    calls = []
    original = kontext_pipe.transformer.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(kontext_pipe.transformer, "forward", spy)
    kontext_pipe(prompt="x", image=random_image(W, H), num_inference_steps=6, skip_guidance_layers=[0],
                 generator=_gen(0), output_type="latent")
    slg = [c for c in calls if c.get("skip_layers")]
    assert len(slg) == 1  # only step i=1 lies inside (0.01 * 6, 0.2 * 6)
    assert slg[0]["ref_latents"].shape == slg[0]["hidden_states"].shape
    assert all("ref_latents" in c for c in calls)


def test_several_prompts_and_images_per_prompt(kontext_pipe):
    images = [random_image(W, H, seed=1), random_image(W, H, seed=2)]
    out = kontext_pipe(prompt=["a", "b"], image=images, num_images_per_prompt=2, num_inference_steps=1,
                       generator=_gen(0), output_type="np").images
    assert out.shape == (4, H, W, 3)


def test_models_are_offloaded_before_the_reference_encode(kontext_pipe, monkeypatch):
    """Under model CPU offload the T5 would otherwise stay on the GPU while the VAE encodes."""
    events = []

    class FakeHook:  # stands in for accelerate's UserCpuOffloadHook
        def offload(self):
            events.append("offload")

    original = kontext_pipe.vae.encode
    monkeypatch.setattr(kontext_pipe, "_all_hooks", [FakeHook(), FakeHook()], raising=False)
    monkeypatch.setattr(kontext_pipe.vae, "encode", lambda *a, **k: events.append("encode") or original(*a, **k))
    kontext_pipe.prepare_reference_latents([random_image(W, H)], 1, H, W, torch.float32, torch.device("cpu"), _gen(0))
    assert events == ["offload", "offload", "encode"]


def test_pooled_embeddings_stay_with_their_prompt(kontext_pipe, monkeypatch):
    """2 prompts x 2 images: every row equals that prompt encoded alone, whatever diffusers tiles.

    diffusers <= 0.35.2 tiled the pooled CLIP rows in prompt order 0,1,0,1 (fixed in 0.36, PR
    #12306); the test runs once with the installed parent method and once with that behaviour.
    """
    parent = StableDiffusion3Pipeline._get_clip_prompt_embeds

    def tiled_like_diffusers_0_35(self, prompt, num_images_per_prompt=1, **kwargs):
        embeds, pooled = parent(self, prompt, num_images_per_prompt=1, **kwargs)
        return embeds.repeat_interleave(num_images_per_prompt, 0), pooled.repeat(num_images_per_prompt, 1)

    prompts, negatives = ["a red cat", "a blue dog on grass"], ["blurry", "dark and noisy"]

    def encode(prompt, negative, n):
        return kontext_pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative,
                                          num_images_per_prompt=n, do_classifier_free_guidance=True,
                                          device=torch.device("cpu"))

    singles = [encode(p, n, 1) for p, n in zip(prompts, negatives)]
    assert not torch.allclose(singles[0][2], singles[1][2])  # the two prompts' pooled vectors differ
    for method in (parent, tiled_like_diffusers_0_35):
        monkeypatch.setattr(StableDiffusion3Pipeline, "_get_clip_prompt_embeds", method)
        batch = encode(prompts, negatives, 2)  # (embeds, negative embeds, pooled, negative pooled)
        for row in range(4):
            single = singles[row // 2]  # rows 0, 1 -> prompt 0; rows 2, 3 -> prompt 1
            for got, expected in zip(batch, single):
                torch.testing.assert_close(got[row], expected[0], rtol=0, atol=1e-5,
                                           msg=lambda m, row=row: f"row {row} ({method.__name__}): {m}")
