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

import bisect
import functools
import math

import torch

from unipic.unipic1.models.diffusion_head import DiffusionHeadConfig
from unipic.unipic1.models.gaussian_diffusion import GaussianDiffusion, get_diffusion

__all__ = ["HEAD_SOLVERS", "SOLVER_MIN_LOG_SNR", "DPMSolverHeadScheduler", "HeadScheduler", "make_head_scheduler",
           "solver_timesteps"]

HEAD_SOLVERS = ("ddpm", "dpm++2m")
"""The head samplers: ``ddpm`` (ancestral, the trained process; the exact path) and ``dpm++2m``
(DPM-Solver++(2M), a training-free deterministic ODE solver for few steps; ``--fast``)."""


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

    def initial_noise_scale(self, temperature: float) -> float:
        """Factor on the initial noise: 1 (the temperature scales the per-step noise instead)."""
        return 1.0

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


SOLVER_MIN_LOG_SNR = -2.5
"""Where `DPMSolverHeadScheduler` starts: log-SNR λ = log(α/σ) = −2.5 (ᾱ ≈ 0.007, t = 946 of 1000 on
the head's clipped cosine schedule). Starting at the schedule's end (λ ≈ −5.3) or spacing the
calls evenly in t left 8-step samples unusable on the embedded model (ShapesEval 0.18 against 0.95;
docs/sampling.md)."""


def solver_timesteps(alphas_cumprod, num_steps: int, min_log_snr: float = SOLVER_MIN_LOG_SNR) -> list[int]:
    """``num_steps + 1`` training timesteps, descending, ending at 0: the nearest to ``num_steps + 1`` log-SNR
    values spaced evenly from ``max(min_log_snr, λ(T − 1))`` to λ(0) (DPM-Solver's logSNR spacing)."""
    rising = [0.5 * math.log(a / (1.0 - a)) for a in reversed(alphas_cumprod)]  # λ(T − 1 − i), increasing in i
    last = len(rising) - 1
    start, stop = max(min_log_snr, rising[0]), rising[-1]
    grid = []
    for k in range(num_steps + 1):
        target = start + (stop - start) * k / num_steps
        i = min(bisect.bisect_left(rising, target), last)
        if i > 0 and target - rising[i - 1] <= rising[i] - target:  # the nearer neighbour (the noisier on a tie)
            i -= 1
        grid.append(last - i)
    grid[-1] = 0
    return grid


@functools.lru_cache(maxsize=64)
def _solver_plan(train_steps: int, noise_schedule: str, max_beta: float, num_steps: int,
                 min_log_snr: float = SOLVER_MIN_LOG_SNR) -> tuple[list[int], list[tuple[float, ...]]]:
    """(grid, per-call coefficients) of `DPMSolverHeadScheduler`, built once per setting.

    Per call: (1/α_s, σ_s/α_s, σ_t/σ_s, α_t·(1 − e^(−h)), weight of the previous x̂₀ or 0).
    """
    base = get_diffusion(train_steps, None, noise_schedule, max_beta, True).alphas_cumprod
    grid = solver_timesteps(base, num_steps, min_log_snr)
    alpha = [math.sqrt(base[t]) for t in grid]
    sigma = [math.sqrt(1.0 - base[t]) for t in grid]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    lower_final = num_steps < 15  # first order at the last step when the steps are few (as diffusers does)
    coefficients = []
    for i in range(num_steps):
        h = lam[i + 1] - lam[i]
        w_prev = 0.0
        if i > 0 and not (lower_final and i == num_steps - 1):
            w_prev = 1.0 / (2.0 * (lam[i] - lam[i - 1]) / h)  # 1/(2r), r = h_prev/h
        coefficients.append((1.0 / alpha[i], sigma[i] / alpha[i], sigma[i + 1] / sigma[i],
                             alpha[i + 1] * -math.expm1(-h), w_prev))
    return grid, coefficients


class DPMSolverHeadScheduler:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095) on the head's trained process: training-free, few steps.

    A deterministic multistep solver of the diffusion ODE in data-prediction form. ``num_steps``
    network calls walk the ``num_steps + 1`` training timesteps of `solver_timesteps` (even in
    log-SNR, from λ = `SOLVER_MIN_LOG_SNR` down to t = 0); call ``i`` moves x from ``t_i`` to
    ``t_{i+1}`` (so the last call lands on t = 0, the clean sample). With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ),
    x̂₀ = (x − σ_s·ε̂)/α_s and h = λ_t − λ_s:

        x_t = (σ_t/σ_s)·x + α_t·(1 − e^(−h))·D,
        D = x̂₀ (first order: DDIM; the first step, and the last when there are fewer than 15)
        D = (1 + 1/(2r))·x̂₀ − 1/(2r)·x̂₀_prev, r = h_prev/h (second order).

    The learned variance channels are not used and no noise is added after the start
    (`adds_noise` is False); `temperature` scales the initial noise (`initial_noise_scale`).
    The interface is `HeadScheduler`'s, so `denoise_tokens` drives either.
    """

    def __init__(self, config: DiffusionHeadConfig, num_steps: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self._prev_x0: torch.Tensor | None = None
        self.set_timesteps(config.num_sampling_steps if num_steps is None else num_steps, device)

    def set_timesteps(self, num_steps: int, device: torch.device | str = "cpu") -> None:
        """``num_steps`` network calls over the grid of `solver_timesteps`."""
        c = self.config
        self.num_steps = int(num_steps)
        if not 1 <= self.num_steps < c.train_steps:
            raise ValueError(f"num_steps must be in [1, {c.train_steps - 1}], got {num_steps}")
        grid, self._coefficients = _solver_plan(c.train_steps, c.noise_schedule, c.max_beta, self.num_steps)
        self.timesteps = torch.tensor(grid[:-1], dtype=torch.long, device=torch.device(device))

    def adds_noise(self, index: int) -> bool:
        """Never: the solver is deterministic after the initial noise."""
        return False

    def initial_noise_scale(self, temperature: float) -> float:
        """The temperature scales the initial noise (there is no per-step noise to scale)."""
        return temperature

    def step(self, eps: torch.Tensor, sample: torch.Tensor, index: int, *, variance: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """x at ``t_{index+1}`` from x = ``sample (N, C)`` at ``t_index`` and the (guided) ε̂ ``eps (N, C)``.

        ``variance``, ``noise`` and ``temperature`` are accepted for `HeadScheduler`'s interface and unused.
        """
        inv_alpha, sigma_over_alpha, sigma_ratio, data_weight, w_prev = self._coefficients[index]
        x0 = torch.add(sample * inv_alpha, eps, alpha=-sigma_over_alpha)  # x̂₀
        if index == 0:
            self._prev_x0 = None
        d = x0 if not w_prev else torch.add(x0 * (1.0 + w_prev), self._prev_x0, alpha=-w_prev)
        self._prev_x0 = x0
        return torch.add(sample * sigma_ratio, d, alpha=data_weight)


def make_head_scheduler(config: DiffusionHeadConfig, num_steps: int | None = None, device: torch.device | str = "cpu",
                        solver: str = "ddpm") -> HeadScheduler | DPMSolverHeadScheduler:
    """The head scheduler for ``solver`` (one of `HEAD_SOLVERS`)."""
    if solver == "ddpm":
        return HeadScheduler(config, num_steps, device)
    if solver == "dpm++2m":
        return DPMSolverHeadScheduler(config, num_steps, device)
    raise ValueError(f"unknown head solver {solver!r}; expected one of {', '.join(HEAD_SOLVERS)}")
