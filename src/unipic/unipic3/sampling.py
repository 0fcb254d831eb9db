"""UniPic-3's samplers and guidance as plain functions (no parameters, no loops over the model).

- `guided_velocity`: true classifier-free guidance whose result is rescaled, token by token, to
  the conditional prediction's norm (upstream `pipeline_qwenimage_edit.py` in both folders).
- Base model (`qwen_image_edit/`): sigmas linspace(1, 1/N, N) go through diffusers'
  `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)`, which applies the
  resolution shift (and the config's terminal stretch); the scheduler's own Euler `step` follows.
- CM / DMD (`qwen_image_edit_fast/`): a multistep consistency sampler. Times
  t_i = shift(linspace(1, 0, N+1)), computed here without the scheduler (so no terminal
  stretch), and each step predicts x0 = x_t - t v, then re-noises to the next time with fresh
  Gaussian noise: x_next = (1 - t_next) x0 + t_next eps. The last step has t_next = 0 and
  returns x0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SAMPLERS = ("euler", "consistency")


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale (cond - uncond), rescaled per token to the norm of `cond`.

    Args:
        cond: conditional prediction, (B, L, C).
        uncond: prediction with the negative prompt, (B, L, C).
        scale: the true-CFG scale.

    Returns:
        The guided prediction, (B, L, C); its norm over C equals `cond`'s at every token.
    """
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)  # (B, L, 1)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)  # (B, L, 1)
    return combined * (cond_norm / combined_norm)


def base_sigmas(num_steps: int) -> np.ndarray:
    """Unshifted sigmas of the base model: linspace(1, 1/N, N) (the scheduler appends the final 0)."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


def shift_times(sigmas: torch.Tensor, mu: float, time_shift_type: str = "exponential") -> torch.Tensor:
    """The scheduler's resolution shift t = s σ / (1 + (s - 1) σ), s = exp(mu) or mu."""
    if time_shift_type == "exponential":
        shift = math.exp(mu)
    elif time_shift_type == "linear":
        shift = mu
    else:
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def consistency_times(num_steps: int, mu: float, time_shift_type: str = "exponential",
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The N + 1 times of the consistency sampler, from 1 down to 0, float64 (float32 on MPS)."""
    device = torch.device(device or "cpu")
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype, device=device)
    return shift_times(sigmas, mu, time_shift_type)


def consistency_step(latents: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                     noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One consistency step: (x0, x_next) with x0 = x_t - t v and x_next = (1 - t_next) x0 + t_next noise.

    Args:
        latents: x_t, (B, L, C).
        velocity: the (guided) prediction v, (B, L, C).
        t, t_next: 0-dim times (float64 in the pipeline).
        noise: fresh Gaussian noise shaped like `latents`.
    """
    # As upstream, t enters x0 at the latents' precision (the transformer got the same value).
    t_model = t.to(latents.dtype).reshape(1, 1, 1)
    x0 = latents - t_model * velocity
    return x0, (1 - t_next) * x0 + t_next * noise
