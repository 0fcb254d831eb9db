"""The pipeline against a plain step-by-step re-statement of upstream's algorithm (tiny random weights).

The re-statement below uses the components directly and plain torch: upstream's budget, chat,
hidden states minus the first 64, noise from the *global* RNG seeded with `torch.manual_seed`
(upstream's generator), VAE mode latents, manual 2x2 packing, the schedules by formula, manual
Euler / consistency updates (consistency noise again from the global RNG, as upstream draws it),
and decoding. Equality within float32 rounding shows the pipeline reproduces the algorithm and
that a CPU generator seeded with s gives upstream's noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unipic.unipic3.pipeline import PROMPT_DROP_INDEX, SYSTEM_MESSAGE

AREA = 128**2


def _pack(x):  # (1, C, 1, h, w) -> (1, h/2 * w/2, 4C)
    _, c, _, h, w = x.shape
    return x.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, (h // 2) * (w // 2), c * 4)


def _unpack(x, height, width):  # (1, N, 4C) -> (1, C, 1, h, w)
    h, w = height // 8, width // 8
    c = x.shape[-1] // 4
    return x.view(1, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, 1, h, w)


def _embed(pipe, prompt, encoder_images):
    user = [{"type": "image", "image": im} for im in encoder_images] + [{"type": "text", "text": prompt}]
    chat = pipe.processor.apply_chat_template([{"role": "system", "content": SYSTEM_MESSAGE},
                                               {"role": "user", "content": user}],
                                              tokenize=False, add_generation_prompt=True)
    inputs = pipe.processor(text=[chat], images=[encoder_images], do_resize=False, padding=True, return_tensors="pt")
    hidden = pipe.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1][0]
    embeds = hidden[PROMPT_DROP_INDEX:][None]
    return embeds, torch.ones(1, embeds.shape[1], dtype=torch.long)


def reference_edit(pipe, images, prompt, *, steps, sampler, seed, scale=4.0, negative=" "):
    """Upstream's algorithm, written out; returns (packed final latents, decoded float image (H, W, 3))."""
    # 1.-3. shared budget (two resizes), output size, encoder images at 28/32
    ratio = math.sqrt(AREA) / sum(im.width * im.height for im in images) ** 0.5
    budgeted = [im.resize((round(im.width * ratio), round(im.height * ratio))) for im in images]
    budgeted = [im.resize((round(im.width / 32) * 32, round(im.height / 32) * 32)) for im in budgeted]
    width, height = budgeted[0].width // 16 * 16, budgeted[0].height // 16 * 16
    encoder = [im.resize((round(im.width * 28 / 32), round(im.height * 28 / 32))) for im in budgeted]
    cond = _embed(pipe, prompt, encoder)
    uncond = _embed(pipe, negative, encoder) if scale > 1 else None
    # 4. noise from the global RNG (upstream: generator=torch.manual_seed(seed)), then input latents
    torch.manual_seed(seed)
    latents = _pack(torch.randn(1, 1, 16, height // 8, width // 8).transpose(1, 2))
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    inputs = []
    for im in budgeted:
        pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None, :, None]
        inputs.append(_pack((pipe.vae.encode(pixels).latent_dist.mode() - mean) / std))
    shapes = [[(1, height // 16, width // 16)] + [(1, im.height // 16, im.width // 16) for im in budgeted]]
    # 5. schedule by formula
    cfg = pipe.scheduler.config
    mu = (latents.shape[1] * (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
          + cfg.base_shift - (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
          * cfg.base_image_seq_len)
    shift = math.exp(mu)
    if sampler == "euler":
        sig = np.linspace(1.0, 1.0 / steps, steps)
        sig = shift * sig / (1 + (shift - 1) * sig)
        sig = 1 - (1 - sig) / ((1 - sig[-1]) / (1 - cfg.shift_terminal))
        times = [float(s) for s in sig] + [0.0]
    else:
        times = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 0.0, steps + 1)]

    # 6. loop
    def velocity(embeds, mask, t):
        out = pipe.transformer(hidden_states=torch.cat([latents] + inputs, dim=1), encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, timestep=torch.tensor([t], dtype=torch.float32),
                               img_shapes=shapes, return_dict=False)[0]
        return out[:, : latents.shape[1]]

    for t, t_next in zip(times[:-1], times[1:]):
        v = velocity(*cond, t)
        if uncond is not None:
            g = (lambda u: u + scale * (v - u))(velocity(*uncond, t))
            v = g * v.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True)
        if sampler == "euler":
            latents = latents + (t_next - t) * v
        else:
            x0 = latents - t * v
            latents = (1 - t_next) * x0 + t_next * torch.randn_like(x0)
    # 7. decode
    image = pipe.vae.decode(_unpack(latents, height, width) * std + mean).sample[:, :, 0]
    return latents, (image[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) / 2


CASES = {
    "one-wide": [(96, 64)],
    "two-mixed": [(96, 64), (50, 90)],
    "six-mixed": [(96, 64), (50, 90), (64, 64), (120, 40), (40, 70), (80, 60)],
}


@pytest.mark.parametrize("sampler", ["euler", "consistency"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_pipeline_equals_the_step_by_step_restatement(tiny_pipe, images_of, case, sampler):
    images = images_of(CASES[case], seed=3)
    expected_latents, expected_image = reference_edit(tiny_pipe, images, "put them together", steps=2,
                                                      sampler=sampler, seed=7)
    common = {"num_inference_steps": 2, "sampler": sampler, "budget_area": AREA}
    latents = tiny_pipe(images, "put them together", generator=torch.Generator().manual_seed(7),
                        output_type="latent", **common).images
    image = tiny_pipe(images, "put them together", generator=torch.Generator().manual_seed(7),
                      output_type="np", **common).images[0]
    gap = (latents - expected_latents).abs()
    assert gap.max() < 1e-4, f"latents differ: max {gap.max():.2e}, mean {gap.mean():.2e}"
    assert image.shape == expected_image.shape
    assert np.abs(image - expected_image).max() < 1e-4, f"images differ by {np.abs(image - expected_image).max():.2e}"


@torch.no_grad()
def test_guidance_runs_only_with_scale_above_one_and_a_negative_prompt(tiny_pipe, images_of):
    calls = []
    hook = tiny_pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        images = images_of([(64, 64)])
        for scale, negative, expected in ((4.0, " ", 4), (1.0, " ", 2), (4.0, None, 2)):
            calls.clear()
            tiny_pipe(images, "make it red", true_cfg_scale=scale, negative_prompt=negative, num_inference_steps=2,
                      budget_area=AREA, output_type="latent")
            assert len(calls) == expected, (scale, negative)
    finally:
        hook.remove()


@torch.no_grad()
def test_prompt_embeddings_drop_the_first_64_positions(tiny_pipe, images_of):
    from unipic.unipic3 import sizes

    encoder = sizes.encoder_images(sizes.budget_images(images_of([(96, 64), (64, 64)]), AREA))
    embeds, mask = tiny_pipe.encode_prompt(["make it red"], [encoder])
    reference, _ = _embed(tiny_pipe, "make it red", encoder)
    assert embeds.shape == reference.shape and bool(mask.all())
    assert torch.allclose(embeds, reference, atol=1e-6)
