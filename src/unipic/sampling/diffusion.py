"""The diffusion head's sampler as a scheduler, after diffusers' ``set_timesteps`` / ``step``.

:class:`HeadScheduler` turns the parameter-free process of
:mod:`unipic.models.gaussian_diffusion` into one ancestral step at a time; the loop that calls the
network, applies guidance and draws the noise is :func:`unipic.sampling.mar_decode.denoise_tokens`,
next to the MAR loop that calls it::

    scheduler.set_timesteps(50)
    for index, t in enumerate(scheduler.timesteps):
        out = net(x, t.expand(n), cond)                # (N, 2C): ε̂ ‖ v
        x = scheduler.step(out[:, :C], x, index, variance=out[:, C:], noise=z, temperature=0.9)
"""

from __future__ import annotations

import math

import torch

from unipic.models.diffusion_head import DiffusionHeadConfig
from unipic.models.gaussian_diffusion import GaussianDiffusion, get_diffusion

__all__ = ["HeadScheduler"]


class HeadScheduler:
    """Ancestral (DDPM) sampling of the head's respaced diffusion, one step per call.

    Args:
        config: The head's configuration (training steps, schedule, learned sigma).
        num_steps: Sampling steps; the config's ``num_sampling_steps`` when None.
        device: Where ``timesteps`` lives.

    Attributes:
        timesteps: ``(num_steps,)`` long original timesteps in loop order (largest first), the
            values the network receives.
        process: The respaced :class:`GaussianDiffusion` (cached per step count).
    """

    def __init__(self, config: DiffusionHeadConfig, num_steps: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.set_timesteps(config.num_sampling_steps if num_steps is None else num_steps, device)

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        """Respace the training process to ``num_steps`` sampling steps."""
        c = self.config
        self.num_steps = int(num_steps)
        self.process: GaussianDiffusion = get_diffusion(c.train_steps, self.num_steps, c.noise_schedule,
                                                        c.max_beta, c.learn_sigma)
        self._coefs = self.process.step_coefficients
        # Ascending in the process, loop order is descending; a flipped copy made once.
        self.timesteps = self.process.original_timesteps(torch.device(device)).flip(0)

    def adds_noise(self, index: int) -> bool:
        """Whether step ``index`` draws fresh noise (every step but the last, t = 0)."""
        return index < self.num_steps - 1

    def step(self, eps: torch.Tensor, sample: torch.Tensor, index: int, *, variance: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """One reverse step: x_{t-1} from x_t = ``sample (N, C)`` and the (guided) ε̂ ``eps (N, C)``.

        ``variance (N, C)`` is the network's v channels (learned sigma); ``noise (N, C)`` a standard
        normal draw, needed when :meth:`adds_noise`; ``temperature`` scales that noise only.
        """
        co = self._coefs[index]
        mean = torch.add(sample * co.mean_x, eps, alpha=-co.mean_eps)
        if not self.adds_noise(index):  # t = 0: the mean, no noise
            return mean
        assert noise is not None, "every step but the last needs noise"
        if self.process.learn_sigma:
            # std = exp(½·log σ²) with log σ² = min + (v + 1)/2 · (max − min), folded into one affine of v
            half_range = 0.25 * (co.max_log - co.min_log)
            std = torch.exp(variance * half_range + (0.5 * co.min_log + half_range))
            return torch.addcmul(mean, std, noise, value=temperature)
        return mean + (math.exp(0.5 * co.fixed_log) * temperature) * noise
