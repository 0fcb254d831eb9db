"""The samplers and guidance against their formulas, and the base schedule against diffusers' scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from unipic.unipic3.sampling import (
    base_sigmas,
    consistency_step,
    consistency_times,
    guided_velocity,
    shift_times,
)
from unipic.unipic3.tiny import TINY_CONFIG


def test_consistency_times_follow_the_shift_formula():
    mu = calculate_shift(4096, 256, 8192, 0.5, 0.9)  # a 1024² target under Qwen-Image-Edit's config
    times = consistency_times(8, mu)
    shift = math.exp(mu)
    expected = [shift * s / (1 + (shift - 1) * s) for s in np.linspace(1.0, 0.0, 9)]
    assert times.dtype == torch.float64 and times.shape == (9,)
    assert np.allclose(times.numpy(), expected, rtol=0, atol=1e-15)
    assert times[0] == 1 and times[-1] == 0 and bool((times[1:] < times[:-1]).all())
    assert torch.allclose(shift_times(torch.tensor([0.5], dtype=torch.float64), 2.0, "linear"),
                          torch.tensor([2 * 0.5 / 1.5], dtype=torch.float64))


def test_consistency_step_formula_and_exact_x0_on_a_straight_path():
    gen = torch.Generator().manual_seed(0)
    data, eps0, eps = (torch.randn(1, 12, 64, generator=gen) for _ in range(3))
    t, t_next = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    x_t = (1 - t.float()) * data + t.float() * eps0
    x0, x_next = consistency_step(x_t, eps0 - data, t, t_next, eps)  # the exact velocity of the path
    assert torch.allclose(x0, data, atol=1e-6)
    assert torch.allclose(x_next, (1 - 0.3) * x0 + 0.3 * eps, atol=1e-6)
    x0_last, x_last = consistency_step(x_t, eps0 - data, t, torch.tensor(0.0, dtype=torch.float64), eps)
    assert torch.equal(x_last, x0_last)  # the final step returns x0


def test_guided_velocity_keeps_the_conditional_norm_per_token():
    gen = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 7, 64, generator=gen), torch.randn(2, 7, 64, generator=gen)
    guided = guided_velocity(cond, uncond, 4.0)
    combined = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(guided.norm(dim=-1), cond.norm(dim=-1), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(guided, combined, dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-6)  # the direction is CFG's
    assert torch.allclose(guided_velocity(cond, uncond, 1.0), cond, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 8, 50])
def test_base_schedule_through_diffusers_matches_shift_and_terminal_stretch(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_CONFIG["scheduler"])
    mu = calculate_shift(1024, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=base_sigmas(steps), mu=mu)
    shifted = shift_times(torch.from_numpy(base_sigmas(steps)), mu).numpy()
    one_minus = 1 - shifted
    stretched = 1 - one_minus / (one_minus[-1] / (1 - 0.02))  # diffusers' stretch to shift_terminal
    assert np.allclose(scheduler.sigmas[:-1].numpy(), stretched, atol=1e-6)
    assert scheduler.sigmas[-1] == 0 and np.allclose(scheduler.timesteps.numpy(), 1000 * stretched, atol=1e-3)
    # Euler: the scheduler's step is x + (sigma_next - sigma) v
    x, v = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    scheduler.set_begin_index(0)
    stepped = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    assert torch.allclose(stepped, x + (scheduler.sigmas[1] - scheduler.sigmas[0]) * v, atol=1e-6)
