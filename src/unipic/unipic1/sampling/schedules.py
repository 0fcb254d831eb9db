"""Parameter-free schedules: MAR masking orders and ratios, the reveal schedule, CFG schedules."""

from __future__ import annotations

import math

import torch

from unipic.unipic1.sampling import rng


def sample_orders(batch: int, seq_len: int, *, device: torch.device | str = "cpu",
                  generator: rng.Randomness = None) -> torch.Tensor:
    """One uniformly random permutation of range(seq_len) per row, shape (batch, seq_len), long."""
    # argsort of uniform noise is a uniform permutation and draws from the caller's generator
    # (upstream used numpy's global RNG, so results could not be seeded per call).
    noise = rng.rand((batch, seq_len), generator, device=device)
    return noise.argsort(dim=1)


def sample_orders_within(hidden: torch.Tensor, *, generator: rng.Randomness = None) -> torch.Tensor:
    """Random orders (B, L) that list each row's hidden positions first (uniformly shuffled), then the rest.

    `hidden` is (B, L) bool. `mask_by_order(k, orders)` with k <= a row's hidden count then hides
    only hidden positions. The draw is `sample_orders`'s, so an all-hidden row gets its exact order.
    """
    noise = rng.rand(tuple(hidden.shape), generator, device=hidden.device)  # (B, L) in [0, 1)
    return (noise + (~hidden).to(noise.dtype)).argsort(dim=1)  # known positions sort into [1, 2)


def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, L) that hides the first `mask_len` positions of each row's order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter_(1, orders[:, :mask_len], True)


def sample_mask_ratio(mask_ratio_min: float, *, std: float = 0.25, generator: torch.Generator | None = None) -> float:
    """One masking ratio from a normal centred at 1.0 (sd `std`, MAR's 0.25) truncated to [mask_ratio_min, 1.0].

    Inverse-CDF sampling of the same truncated normal MAR draws with scipy's `truncnorm`.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    low = normal.cdf(torch.tensor((mask_ratio_min - 1.0) / std, dtype=torch.float64))
    high = 0.5  # cdf(0): the upper truncation point is the mean itself
    u = torch.rand((), dtype=torch.float64, generator=generator)
    z = torch.special.ndtri(low + u * (high - low))
    return float(1.0 + std * z)


def random_masking(orders: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Training mask (B, L) with 1.0 at the first ceil(L·ratio) positions of each order."""
    seq_len = orders.shape[1]
    num_masked = int(math.ceil(seq_len * mask_ratio))
    return mask_by_order(num_masked, orders).float()


def reveal_mask_len(step: int, steps: int, seq_len: int, num_masked_now: int) -> int:
    """How many tokens stay hidden after `step` of `steps` (cosine schedule, at least one revealed per step)."""
    ratio = math.cos(math.pi / 2.0 * (step + 1) / steps)
    mask_len = math.floor(seq_len * ratio)
    # Keep at least one token for the next step and reveal at least one now.
    return max(1, min(num_masked_now - 1, mask_len))


def cfg_at_step(cfg: float, schedule: str, seq_len: int, mask_len: int) -> float:
    """Guidance scale for a step: constant, or Muse's linear ramp as tokens are revealed."""
    if schedule == "constant":
        return cfg
    assert schedule == "linear", f"cfg_schedule {schedule!r} (checked by the pipeline)"
    return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
