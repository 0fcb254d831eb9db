"""Fast mode's head sampler, DPM-Solver++(2M) (issue 40): its grid and its update formula."""

from __future__ import annotations

import math

import pytest
import torch

from unipic.unipic1.models.diffusion_head import DiffusionHeadConfig
from unipic.unipic1.models.gaussian_diffusion import get_diffusion
from unipic.unipic1.sampling.diffusion import (
    SOLVER_MIN_LOG_SNR,
    DPMSolverHeadScheduler,
    HeadScheduler,
    make_head_scheduler,
    solver_timesteps,
)

CONFIG = DiffusionHeadConfig(depth=1, width=8, num_sampling_steps=50)


def _ab() -> list[float]:
    return list(get_diffusion(CONFIG.train_steps, None, CONFIG.noise_schedule, CONFIG.max_beta,
                              CONFIG.learn_sigma).alphas_cumprod)


def _log_snr(a: float) -> float:
    return 0.5 * math.log(a / (1.0 - a))


def test_grid_is_even_in_log_snr_and_ends_at_zero() -> None:
    ab = _ab()
    grid = solver_timesteps(ab, 8)
    assert len(grid) == 9 and grid[-1] == 0 and grid == sorted(grid, reverse=True)
    assert abs(_log_snr(ab[grid[0]]) - SOLVER_MIN_LOG_SNR) < 0.05
    lams = [_log_snr(ab[t]) for t in grid[:-1]]
    gaps = [b - a for a, b in zip(lams, lams[1:])]
    assert max(gaps) - min(gaps) < 0.1 * max(gaps)  # even up to the integer timesteps
    scheduler = DPMSolverHeadScheduler(CONFIG, 8)
    assert scheduler.timesteps.tolist() == grid[:-1] and not scheduler.adds_noise(0)


def test_steps_follow_the_dpm_solver_pp_2m_formula() -> None:
    """Each step, in float64 from the definitions: x0 = (x − σ_s ε)/α_s, then first order (DDIM) at
    the first and the last step, second order multistep in between."""
    ab = _ab()
    n = 5
    grid = solver_timesteps(ab, n)
    scheduler = make_head_scheduler(CONFIG, n, solver="dpm++2m")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    ref = x.clone()
    prev_x0 = None
    for i in range(n):
        eps = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        s, t = grid[i], grid[i + 1]
        a_s, a_t = math.sqrt(ab[s]), math.sqrt(ab[t])
        sig_s, sig_t = math.sqrt(1 - ab[s]), math.sqrt(1 - ab[t])
        h = math.log(a_t / sig_t) - math.log(a_s / sig_s)
        x0 = (ref - sig_s * eps) / a_s
        if prev_x0 is None or i == n - 1:
            d = x0
        else:
            h_prev = math.log(a_s / sig_s) - math.log(math.sqrt(ab[grid[i - 1]]) / math.sqrt(1 - ab[grid[i - 1]]))
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        ref = sig_t / sig_s * ref - a_t * (math.exp(-h) - 1) * d
        prev_x0 = x0
        x = scheduler.step(eps, x, i, variance=torch.zeros_like(eps))
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)


def test_the_solver_restarts_at_step_zero_and_the_ddpm_default_is_unchanged() -> None:
    scheduler = DPMSolverHeadScheduler(CONFIG, 4)
    x, eps = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 0.5, dtype=torch.float64)
    first = [scheduler.step(eps, x, i) for i in range(4)]
    again = [scheduler.step(eps, x, i) for i in range(4)]  # a second token batch: no state carried over
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert isinstance(make_head_scheduler(CONFIG, 10), HeadScheduler)
    assert scheduler.initial_noise_scale(0.8) == 0.8 and HeadScheduler(CONFIG).initial_noise_scale(0.8) == 1.0
    with pytest.raises(ValueError, match="head solver"):
        make_head_scheduler(CONFIG, 4, solver="euler")
