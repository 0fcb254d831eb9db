"""The diffusion head's sampler as a scheduler, after diffusers' ``set_timesteps`` / ``step``.

:class:`HeadScheduler` turns the parameter-free process of
:mod:`unipic.unipic1.models.gaussian_diffusion` into one ancestral step at a time; the loop that calls the
network, applies guidance and draws the noise is :func:`unipic.unipic1.sampling.mar_decode.denoise_tokens`,
next to the MAR loop that calls it::

    scheduler.set_timesteps(50)
    for index, t in enumerate(scheduler.timesteps):
        out = net(x, t.expand(n), cond)                # (N, 2C): ε̂ ‖ v
        x = scheduler.step(out[:, :C], x, index, variance=out[:, C:], noise=z, temperature=0.9)
"""

from __future__ import annotations

import math

import torch

from unipic.unipic1.models.diffusion_head import DiffusionHeadConfig
from unipic.unipic1.models.gaussian_diffusion import GaussianDiffusion, get_diffusion

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
        self._scalars: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.set_timesteps(config.num_sampling_steps if num_steps is None else num_steps, device)

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        """Respace the training process to ``num_steps`` sampling steps."""
        c = self.config
        self.num_steps = int(num_steps)
        self.process: GaussianDiffusion = get_diffusion(c.train_steps, self.num_steps, c.noise_schedule,
                                                        c.max_beta, c.learn_sigma)
        # Per step, the plain floats `step` needs, (−mean_eps, fixed std), read without attribute lookups.
        self._floats = [(-co.mean_eps, math.exp(0.5 * co.fixed_log)) for co in self.process.step_coefficients]
        self._learn_sigma = self.process.learn_sigma
        # Ascending in the process, loop order is descending; a flipped copy made once.
        self.timesteps = self.process.original_timesteps(torch.device(device)).flip(0)

    def _scalar_tensors(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(mean_x, v scale, v offset) per step as 0-dim tensors of `like`'s dtype and device.

        `tensor * python_float` converts the float to a tensor at every call (~3 µs, as long as the
        arithmetic at 8 rows); a 0-dim tensor of the same dtype gives the same result without it.
        Kept per step count, so annealed head steps (`set_timesteps` at every MAR step) build each
        table once.
        """
        key = (self.num_steps, like.device, like.dtype)
        if key not in self._scalars:
            rows = []
            for co in self.process.step_coefficients:
                half_range = 0.25 * (co.max_log - co.min_log)
                values = (co.mean_x, half_range, 0.5 * co.min_log + half_range)
                rows.append(tuple(torch.tensor(v, dtype=like.dtype, device=like.device) for v in values))
            self._scalars[key] = rows
        return self._scalars[key]

    def adds_noise(self, index: int) -> bool:
        """Whether step ``index`` draws fresh noise (every step but the last, t = 0)."""
        return index < self.num_steps - 1

    def step(self, eps: torch.Tensor, sample: torch.Tensor, index: int, *, variance: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """One reverse step: x_{t-1} from x_t = ``sample (N, C)`` and the (guided) ε̂ ``eps (N, C)``.

        ``variance (N, C)`` is the network's v channels (learned sigma); ``noise (N, C)`` a standard
        normal draw, needed when :meth:`adds_noise`; ``temperature`` scales that noise only.
        """
        neg_mean_eps, fixed_std = self._floats[index]
        mean_x, v_scale, v_offset = self._scalar_tensors(sample)[index]
        mean = torch.add(sample * mean_x, eps, alpha=neg_mean_eps)
        if not self.adds_noise(index):  # t = 0: the mean, no noise
            return mean
        assert noise is not None, "every step but the last needs noise"
        if self._learn_sigma:
            # std = exp(½·log σ²) with log σ² = min + (v + 1)/2 · (max − min), folded into one affine of v
            std = (variance * v_scale).add_(v_offset).exp_()
            return mean.addcmul_(std, noise, value=temperature)
        return mean.add_(noise, alpha=fixed_std * temperature)
