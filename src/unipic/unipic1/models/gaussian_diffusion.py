"""Gaussian diffusion for the UniPic-1 per-token diffusion head (spec §5.2–§5.4).

This module has no parameters. It implements the discrete-time DDPM used by MAR's ``DiffLoss``:

* cosine ᾱ schedule whose betas are clipped at ``max_beta`` (UniPic uses **0.2**, MAR/IDDPM 0.999);
* respacing of the 1000 training steps to ``num_steps`` sampling steps (the kept original
  timesteps are fed to the network unchanged);
* ε-prediction with a LEARNED_RANGE variance (the network's second half of channels ``v``
  interpolates the log-variance between the posterior variance β̃ₜ and βₜ);
* the IDDPM hybrid training loss (ε-MSE + variational bound in bits);
* the per-step coefficients of ancestral sampling (the loop itself, with its guidance and noise,
  is :class:`unipic.unipic1.sampling.diffusion.HeadScheduler` driven by :mod:`unipic.unipic1.sampling.mar_decode`).

The schedule is computed once in float64 (on the host) and cached; per-device coefficient
tables are built lazily and cached too, so neither is rebuilt on every call. Sampling uses only
Python-float coefficients and device tensors: no host↔device synchronisation per step.

It lives in ``models`` because the head's training loss needs it; ``models`` never imports
``sampling``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "GaussianDiffusion",
    "NetFn",
    "StepCoefficients",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "cosine_betas",
    "discretized_gaussian_log_likelihood",
    "get_diffusion",
    "get_named_betas",
    "normal_kl",
    "respace_timesteps",
]

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``net_fn(x: (M, C), t: (M,) long original timesteps, c: (M, D)) -> (M, 2C)`` (or ``(M, C)`` without learned sigma)."""


# ---------------------------------------------------------------------------------------------
# Schedules (float64, host side, computed once)
# ---------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float) -> np.ndarray:
    """Discretise a continuous ᾱ(s), s∈[0,1], into ``num_steps`` betas clipped at ``max_beta``."""
    betas = []
    for i in range(num_steps):
        # β_i = 1 − ᾱ((i+1)/T)/ᾱ(i/T); the clip keeps the last betas finite where ᾱ → 0.
        betas.append(min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta))
    return np.asarray(betas, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.2) -> np.ndarray:
    """Betas of the improved-DDPM cosine schedule ᾱ(s)=cos²((s+0.008)/1.008·π/2), clipped at ``max_beta``."""
    return betas_for_alpha_bar(
        num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta
    )


def get_named_betas(name: str, num_steps: int, max_beta: float = 0.2) -> np.ndarray:
    """Betas for a named schedule: ``"cosine"`` (clipped at ``max_beta``) or ``"linear"`` (DDPM)."""
    if name == "cosine":
        return cosine_betas(num_steps, max_beta)
    if name == "linear":
        # DDPM's linear schedule, rescaled so that any step count spans the same noise range.
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")


def respace_timesteps(train_steps: int, num_steps: int) -> tuple[int, ...]:
    """Original timesteps kept when respacing ``train_steps`` to ``num_steps`` (ascending).

    Evenly strided including both ends: ``round(k·(T−1)/(n−1))``. The stride is accumulated
    in floating point and rounded with Python's ``round`` (half-to-even), exactly like the
    reference implementation; for all common step counts (10…1000) this equals the closed form.
    """
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in [1, {train_steps}], got {num_steps}")
    stride = 1.0 if num_steps == 1 else (train_steps - 1) / (num_steps - 1)
    kept: list[int] = []
    pos = 0.0
    for _ in range(num_steps):
        kept.append(round(pos))
        pos += stride
    return tuple(kept)


# ---------------------------------------------------------------------------------------------
# Distribution helpers for the variational-bound term (written from their definitions)
# ---------------------------------------------------------------------------------------------


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF Φ(x) (the one IDDPM's NLL uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of ``x`` ∈ [-1, 1] under a Gaussian discretised into 1/255-wide bins.

    The two outermost bins extend to ±∞ (values below −0.999 / above 0.999).
    """
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # Clamps keep log() finite when a bin has (numerically) zero mass.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass)
    )


# ---------------------------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step sampling coefficients as Python floats (float64-accurate), one entry per step."""

    timestep: int  # original timestep value passed to the network
    mean_x: float  # μ = mean_x·xₜ − mean_eps·ε̂  (x̂₀ folded into the posterior mean)
    mean_eps: float
    min_log: float  # log β̃ₜ (posterior variance, first entry fixed)
    max_log: float  # log βₜ
    fixed_log: float  # log-variance used without learned sigma (FIXED_LARGE)


# Row order of the stacked per-device table used for training-time gathers.
_TABLE_ROWS = (
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_betas",
    "fixed_large_log_variance",
)


class GaussianDiffusion:
    """Discrete DDPM with ε-prediction and LEARNED_RANGE variance, optionally respaced.

    Args:
        train_steps: Number of steps of the underlying (training) process, 1000 in UniPic.
        num_steps: Number of steps of this process; ``None`` or ``train_steps`` means no respacing.
            Step index ``i`` of this process corresponds to original timestep ``timesteps[i]``,
            which is what the network receives.
        noise_schedule: ``"cosine"`` (UniPic) or ``"linear"``.
        max_beta: Clip of the cosine betas; **0.2** in UniPic-1, 0.999 in MAR/IDDPM.
        learn_sigma: If True the network outputs 2C channels (ε ‖ v) and the variance is
            LEARNED_RANGE; otherwise it outputs C channels and the variance is fixed to βₜ
            (FIXED_LARGE, with the first entry replaced by β̃₁) and the loss is the ε-MSE only.

    Attributes:
        timesteps: Kept original timesteps, ascending, length ``num_steps``.
        betas, alphas_cumprod, alphas_cumprod_prev, posterior_variance,
        posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2: float64
            numpy arrays of shape ``(num_steps,)`` describing the (respaced) process.
    """

    def __init__(
        self,
        *,
        train_steps: int = 1000,
        num_steps: int | None = None,
        noise_schedule: str = "cosine",
        max_beta: float = 0.2,
        learn_sigma: bool = True,
    ) -> None:
        num_steps = train_steps if num_steps is None else int(num_steps)
        self.train_steps = int(train_steps)
        self.num_steps = num_steps
        self.noise_schedule = noise_schedule
        self.max_beta = float(max_beta)
        self.learn_sigma = bool(learn_sigma)

        base_betas = get_named_betas(noise_schedule, self.train_steps, self.max_beta)
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        self.timesteps: tuple[int, ...] = respace_timesteps(self.train_steps, num_steps)
        # Respaced betas are re-derived from ᾱ at the kept steps so that ᾱ of the respaced
        # process equals ᾱ of the original process at every kept step.
        kept_ab = base_alphas_cumprod[list(self.timesteps)]
        betas = 1.0 - kept_ab / np.concatenate([[1.0], kept_ab[:-1]])
        self._set_process(betas)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._timestep_tensors: dict[torch.device, torch.Tensor] = {}

    # -- schedule ---------------------------------------------------------------------------

    def _set_process(self, betas: np.ndarray) -> None:
        """Derive every float64 quantity of the process from its betas."""
        self.betas = betas.astype(np.float64)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1·x0 + coef2·xt, β̃t)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃₀ = 0, so its log would be −∞; the first entry is replaced by the second (only the
        # t = 0 decoder NLL and the unused t = 0 sampling noise ever touch it).
        pv = self.posterior_variance
        fixed_first = np.concatenate([pv[1:2], pv[1:]]) if len(pv) > 1 else np.maximum(pv, 1e-20)
        self.posterior_log_variance_clipped = np.log(fixed_first)
        self.posterior_mean_coef1 = (
            self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(self.betas)
        fixed_large = np.concatenate([pv[1:2], self.betas[1:]]) if len(pv) > 1 else self.betas
        self.fixed_large_log_variance = np.log(fixed_large)

        # Sampling coefficients, reverse order (first entry = first step = largest t). The
        # x̂₀ = √(1/ᾱ)·xₜ − √(1/ᾱ−1)·ε̂ substitution is folded into the posterior mean in float64,
        # which avoids the large cancellation (√(1/ᾱ₉₉₉) ≈ 195) that float32 would suffer.
        coefs = []
        for i in reversed(range(self.num_steps)):
            coefs.append(
                StepCoefficients(
                    timestep=self.timesteps[i],
                    mean_x=float(
                        self.posterior_mean_coef1[i] * self.sqrt_recip_alphas_cumprod[i]
                        + self.posterior_mean_coef2[i]
                    ),
                    mean_eps=float(self.posterior_mean_coef1[i] * self.sqrt_recipm1_alphas_cumprod[i]),
                    min_log=float(self.posterior_log_variance_clipped[i]),
                    max_log=float(self.log_betas[i]),
                    fixed_log=float(self.fixed_large_log_variance[i]),
                )
            )
        self._sample_coefs: tuple[StepCoefficients, ...] = tuple(coefs)

    def _table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Cached ``(len(_TABLE_ROWS), num_steps)`` coefficient table on ``device``."""
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None:
            host = np.stack([getattr(self, name) for name in _TABLE_ROWS])
            # Cast from float64 after computing, like the reference (which gathers float64
            # then casts); MPS has no float64 so we never keep float64 on device.
            table = torch.from_numpy(host).to(dtype=dtype).to(device)
            self._tables[key] = table
        return table

    def original_timesteps(self, device: torch.device) -> torch.Tensor:
        """Cached ``(num_steps,)`` long tensor mapping step index → original timestep."""
        key = torch.device(device)
        ts = self._timestep_tensors.get(key)
        if ts is None:
            ts = torch.tensor(self.timesteps, dtype=torch.long, device=key)
            self._timestep_tensors[key] = ts
        return ts

    def _gather(self, names: Sequence[str], t: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Gather rows ``names`` at step indices ``t`` as ``(N, 1)`` tensors (for broadcasting over channels)."""
        table = self._table(t.device, dtype)
        rows = [_TABLE_ROWS.index(n) for n in names]
        picked = table[rows][:, t]  # (len(names), N), one gather for all rows
        return [picked[j].unsqueeze(-1) for j in range(len(rows))]

    # -- forward process --------------------------------------------------------------------

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw xₜ ~ q(xₜ | x₀) = N(√ᾱₜ·x₀, (1−ᾱₜ)I) for ``x0: (N, C)``, step indices ``t: (N,)``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a, s = self._gather(("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"), t, x0.dtype)
        return a * x0 + s * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(N, C)`` and clipped log-variance ``(N, 1)`` of q(x_{t−1} | xₜ, x₀)."""
        c1, c2, logv = self._gather(
            ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped"), t, x0.dtype
        )
        return c1 * x0 + c2 * xt, logv

    def p_mean_variance(
        self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model mean, log-variance and x̂₀ (each ``(N, C)``) from a raw network output ``(N, 2C)``."""
        c = xt.shape[-1]
        eps = model_output[:, :c]
        r_a, r_am1, c1, c2, min_log, max_log, fixed_log = self._gather(
            (
                "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod",
                "posterior_mean_coef1",
                "posterior_mean_coef2",
                "posterior_log_variance_clipped",
                "log_betas",
                "fixed_large_log_variance",
            ),
            t,
            xt.dtype,
        )
        if self.learn_sigma:
            frac = (model_output[:, c : 2 * c] + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
        else:
            log_var = fixed_log.expand_as(xt)
        pred_x0 = r_a * xt - r_am1 * eps  # no clipping (clip_denoised=False)
        mean = c1 * pred_x0 + c2 * xt
        return mean, log_var, pred_x0

    # -- training ---------------------------------------------------------------------------

    def training_loss_terms(
        self,
        net_fn: NetFn,
        x0: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-row loss terms ``{"loss", "mse", "vb", "t"}`` (each ``(N,)``) for ``x0: (N, C)``, ``cond: (N, D)``.

        ``t`` (step indices) and ``noise`` are drawn from ``generator`` unless given (t first, then noise).
        """
        if x0.dim() != 2 or cond.dim() != 2 or cond.shape[0] != x0.shape[0]:
            raise ValueError(
                f"expected x0 (N, C) and cond (N, D), got {tuple(x0.shape)} and {tuple(cond.shape)}"
            )
        n = x0.shape[0]
        device = x0.device
        if t is None:
            t = torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        xt = self.q_sample(x0, t, noise)
        model_output = net_fn(xt, self.original_timesteps(device)[t], cond).to(x0.dtype)
        c = x0.shape[-1]
        eps = model_output[:, :c]
        mse = ((noise - eps) ** 2).mean(dim=-1)
        if not self.learn_sigma:
            zeros = torch.zeros_like(mse)
            return {"loss": mse, "mse": mse, "vb": zeros, "t": t}
        # The VB term trains only the variance: the mean it uses is built from a detached ε̂,
        # so the ε-MSE alone drives the mean (IDDPM's hybrid objective).
        frozen = torch.cat([eps.detach(), model_output[:, c : 2 * c]], dim=-1)
        true_mean, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)
        nll = nll.mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "t": t}

    def training_losses(
        self,
        net_fn: NetFn,
        x0: torch.Tensor,
        cond: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-row training loss ``(N,)``: ε-MSE + variational bound (bits), see :meth:`training_loss_terms`."""
        return self.training_loss_terms(net_fn, x0, cond, generator, t=t, noise=noise)["loss"]

    # -- sampling coefficients -----------------------------------------------------------

    @property
    def step_coefficients(self) -> tuple[StepCoefficients, ...]:
        """Per-step sampling coefficients in loop order (entry 0 = the noisiest step)."""
        return self._sample_coefs


@lru_cache(maxsize=32)
def get_diffusion(
    train_steps: int = 1000,
    num_steps: int | None = None,
    noise_schedule: str = "cosine",
    max_beta: float = 0.2,
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """Shared, cached :class:`GaussianDiffusion` for these settings (schedules are built once per process)."""
    return GaussianDiffusion(
        train_steps=train_steps,
        num_steps=num_steps,
        noise_schedule=noise_schedule,
        max_beta=max_beta,
        learn_sigma=learn_sigma,
    )
