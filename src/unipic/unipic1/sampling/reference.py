"""The plain sampling algorithm, kept as the baseline that tests and benchmarks compare against.

It is the loop as the upstream code writes it: the text prefix re-run through the LLM at every
MAR step, position tables re-interpolated at every step, the head called as ``net(x, t, c)`` at
every head step with the noisy rows duplicated for guidance, and every row (the unconditional
ones too) decoded by the VAE. It draws its randomness in the same order as
:func:`unipic.unipic1.sampling.mar_decode.mar_generate_tokens`, so for one seed both give the same image
up to float32 rounding. Nothing here is used by the package's pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from unipic.unipic1.sampling import rng
from unipic.unipic1.sampling.diffusion import HeadScheduler
from unipic.unipic1.sampling.edit import build_edit_condition
from unipic.unipic1.sampling.mar_decode import guidance_enabled, with_unconditional
from unipic.unipic1.sampling.schedules import cfg_at_step, mask_by_order, reveal_mask_len, sample_orders
from unipic.unipic1.sampling.text_to_image import build_t2i_prefix

if TYPE_CHECKING:
    from unipic.unipic1.models.unipic import UniPic

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def reference_denoise_tokens(net: NetFn, scheduler: HeadScheduler, cond: torch.Tensor, *, guided: bool = False,
                             cfg: float = 1.0, temperature: float = 1.0, generator: rng.Randomness = None,
                             noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
                             channels: int | None = None) -> torch.Tensor:
    """The head's ancestral loop, one full network call per step; arguments as `mar_decode.denoise_tokens`.

    `net` may be any `(x (M, C), t (M,), c (M, D)) -> (M, 2C)` function; `channels` is then the token
    width C (read from `noise` or `net.token_dim` when None). Returns (N', C).
    """
    n = cond.shape[0]
    assert cond.dim() == 2 and (not guided or n % 2 == 0)
    n_eff = n // 2 if guided else n
    dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
    if channels is None:
        channels = noise.shape[1] if noise is not None else net.token_dim
    if noise is None:
        noise = rng.randn((n_eff, channels), generator, device=cond.device, dtype=dtype)
    x = noise.to(device=cond.device, dtype=dtype)  # (N', C)
    for index, t in enumerate(scheduler.timesteps.to(cond.device)):
        t = t.expand(n)  # (N,)
        if guided:
            out = net(torch.cat([x, x], dim=0), t, cond).to(dtype)  # (2N', 2C): [cond; uncond]
            eps_c, eps_u = out[:n_eff, :channels], out[n_eff:, :channels]
            eps = eps_u + cfg * (eps_c - eps_u)
            variance = out[:n_eff, channels:]
        else:
            out = net(x, t, cond).to(dtype)  # (N', 2C)
            eps, variance = out[:, :channels], out[:, channels:]
        z = None
        if scheduler.adds_noise(index):
            z = (step_noise[index].to(device=cond.device, dtype=dtype) if step_noise is not None
                 else rng.randn(x.shape, generator, device=cond.device, dtype=dtype))
        x = scheduler.step(eps, x, index, variance=variance, noise=z, temperature=temperature)
    return x.float() if dtype != torch.float64 else x


@torch.no_grad()
def reference_generate_tokens(model: UniPic, prefix_embeds: torch.Tensor, attention_mask: torch.Tensor,
                              grid: tuple[int, int], *, steps: int, cfg: float = 1.0, cfg_schedule: str = "constant",
                              temperature: float = 1.0, head_steps: int | None = None,
                              x_con: torch.Tensor | None = None, generator: rng.Randomness = None) -> torch.Tensor:
    """The plain MAR loop; arguments and result as `mar_decode.mar_generate_tokens` but ALL rows (R, L, C)."""
    guided = guidance_enabled(cfg)
    rows, seq_len = prefix_embeds.shape[0], grid[0] * grid[1]
    n_cond = rows // 2 if guided else rows
    orders = sample_orders(n_cond, seq_len, device=prefix_embeds.device, generator=generator)
    orders = with_unconditional(orders, orders, cfg)  # (R, L)
    tokens = torch.zeros(rows, seq_len, model.config.token_dim, device=prefix_embeds.device)  # (R, L, C)
    mask = torch.ones(rows, seq_len, dtype=torch.bool, device=prefix_embeds.device)  # (R, L), True = hidden
    masked = seq_len
    for step in range(steps):
        model.mar._pos_cache.clear()  # upstream interpolates the position tables on every call
        x_enc = model.encode_with_llm(tokens, mask.float(), grid, attention_mask, prefix_embeds=prefix_embeds)
        model.mar._pos_cache.clear()
        z = model.mar.forward_decoder(x_enc, mask.float(), grid, x_con=x_con)  # (R, L, dec_dim)
        mask_len = reveal_mask_len(step, steps, seq_len, masked)
        mask_next = mask_by_order(mask_len, orders)
        to_predict = mask if step == steps - 1 else mask & ~mask_next
        mask, masked = mask_next, mask_len
        scale = cfg_at_step(cfg, cfg_schedule, seq_len, mask_len) if guided else 1.0
        scheduler = HeadScheduler(model.mar.diffloss.config, head_steps, prefix_embeds.device)
        sampled = reference_denoise_tokens(model.mar.diffloss.net, scheduler, z[to_predict], guided=guided,
                                           cfg=scale, temperature=temperature, generator=generator)
        tokens = tokens.clone()
        tokens[:n_cond][to_predict[:n_cond]] = sampled
        if guided:
            tokens[n_cond:] = tokens[:n_cond]
    return tokens


@torch.no_grad()
def reference_generate_images(model: UniPic, tokenizer, prompts: Sequence[str], *, height: int, width: int,
                              steps: int, cfg: float, cfg_schedule: str = "constant", temperature: float = 1.0,
                              head_steps: int | None = None, generator: rng.Randomness = None) -> torch.Tensor:
    """Text-to-image the plain way: (B, 3, H, W) pixels (every row decoded, the conditional ones kept)."""
    grid = model.grid_for(height, width)
    prefix, mask = build_t2i_prefix(model, tokenizer, prompts, cfg=cfg, device=model.device)
    tokens = reference_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                       temperature=temperature, head_steps=head_steps, generator=generator)
    return model.decode_tokens(tokens, grid)[:len(prompts)]


@torch.no_grad()
def reference_edit_images(model: UniPic, tokenizer, source_pixels: torch.Tensor, instructions: Sequence[str], *,
                          steps: int, cfg: float, cfg_schedule: str = "constant", temperature: float = 0.85,
                          head_steps: int | None = None, generator: rng.Randomness = None) -> torch.Tensor:
    """Editing the plain way: (B, 3, H, W) pixels (every row decoded, the conditional ones kept)."""
    grid = model.grid_for(source_pixels.shape[-2], source_pixels.shape[-1])
    x_con, z_src = model.extract_visual_feature(model.encode_images(source_pixels.to(model.device)), None, grid)
    prefix, mask, x_con = build_edit_condition(model, tokenizer, instructions, x_con, z_src, cfg=cfg,
                                               device=model.device)
    tokens = reference_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                       temperature=temperature, head_steps=head_steps, x_con=x_con,
                                       generator=generator)
    return model.decode_tokens(tokens, grid)[:len(instructions)]
