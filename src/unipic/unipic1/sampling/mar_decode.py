"""The masked-autoregressive decoding loop (spec §9) and the diffusion head's loop inside it.

`mar_generate_tokens` reveals tokens in random order over `steps` MAR steps, each step
re-encoding the visible tokens through MAR + LLM; `denoise_tokens` samples the newly revealed
ones with the per-token diffusion head (a `HeadScheduler` step per head step). Classifier-free
guidance lives here and only here: `guidance_enabled` decides whether it is on, `with_unconditional`
lays out the rows it needs (conditional rows first, then their unconditional partners in the same
order) and `denoise_tokens` mixes the two predictions. For inpainting the loop starts from a
partly known image (`known_tokens`, `hidden`): known tokens are visible from the first step and
only the hidden ones are revealed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from tqdm.auto import tqdm

from unipic.interrupt import check_interrupt
from unipic.unipic1.models.unipic import cache_argument
from unipic.unipic1.sampling import rng
from unipic.unipic1.sampling.diffusion import DPMSolverHeadScheduler, HeadScheduler, make_head_scheduler
from unipic.unipic1.sampling.schedules import (
    cfg_at_step,
    mask_by_order,
    reveal_mask_len,
    sample_orders,
    sample_orders_within,
)

if TYPE_CHECKING:
    from unipic.unipic1.models.diffusion_head import SimpleMLPAdaLN
    from unipic.unipic1.models.unipic import UniPic

Rows = TypeVar("Rows", list, torch.Tensor)


def guidance_enabled(cfg: float) -> bool:
    """Guidance is on for every scale but 1 (scale 1 is the conditional prediction alone)."""
    return cfg != 1.0


def with_unconditional(conditional: Rows, unconditional: Rows, cfg: float) -> Rows:
    """The rows guided sampling runs on: `[conditional; unconditional]`, or `conditional` alone without guidance.

    Works on lists (prompt texts) and on tensors (rows along dim 0); row i of the second half is
    the unconditional partner of row i of the first.
    """
    if not guidance_enabled(cfg):
        return conditional
    if isinstance(conditional, torch.Tensor):
        return torch.cat([conditional, unconditional])
    return list(conditional) + list(unconditional)


def new_prefix_cache(model: UniPic | None = None):
    """An empty key/value cache for a prefix pass through `model`'s LLM (its own kind when it has one,
    `unipic.unipic1.models.qwen2.KVCache`; else transformers' DynamicCache)."""
    new_cache = getattr(getattr(model, "llm", None), "new_cache", None)
    if new_cache is not None:
        return new_cache()
    from transformers import DynamicCache

    return DynamicCache()


def _truncate_cache(cache, length: int) -> None:
    """Drop every cached position after the first `length` (the prefix)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        # A negative argument means "remove this many" on every transformers version.
        cache.crop(-extra)


@dataclass(frozen=True)
class SpeedOptions:
    """Training-free shortcuts of the sampler; the defaults (all off) are the exact path.

    Attributes:
        head_anneal: DiSA-style step annealing: the head's step count falls linearly over the
            MAR steps from `head_steps` to `head_anneal · head_steps` at the last one (later
            tokens are conditioned on more known tokens and need fewer steps). 1.0 = off.
        guidance_interval: LazyMAR-style guidance caching in the head: the unconditional head rows
            run only every k-th head step; between, the last guidance residual ε_c − ε_u is reused.
            1 = off.
        uncond_interval: LazyMAR-style condition caching across MAR steps: the unconditional rows
            go through the MAR encoder, the LLM and the MAR decoder only every k-th MAR step;
            between, their decoder features are the conditional ones minus the last measured
            difference z_c − z_u. 1 = off.
        head_solver: the head's sampler: "ddpm" (ancestral, the trained process) or "dpm++2m"
            (DPM-Solver++(2M), deterministic, for few head steps; `sampling.diffusion`).
    """

    head_anneal: float = 1.0
    guidance_interval: int = 1
    uncond_interval: int = 1
    head_solver: str = "ddpm"

    def head_steps_at(self, step: int, steps: int, head_steps: int) -> int:
        """Head steps for MAR step `step` of `steps`."""
        if self.head_anneal >= 1.0 or steps == 1:
            return head_steps
        last = head_steps * self.head_anneal
        return max(1, round(head_steps + (last - head_steps) * step / (steps - 1)))


EXACT = SpeedOptions()
# Bytes of adaLN modulations precomputed at once (rows × head steps); bounds the memory of
# large batches (UniPic-1.5B at 1024 px: ~400 rows × 117 KB per head step). On CPU the chunk is
# kept near the size of a core's cache instead: modulations written and read back while they are
# still cached made the embedded model's head 13% faster than one 50 MB chunk (docs/sampling.md).
MODULATION_BUDGET = 64 * 2**20
CPU_MODULATION_BUDGET = 4 * 2**20


@torch.no_grad()
def denoise_tokens(
    net: SimpleMLPAdaLN,
    scheduler: HeadScheduler | DPMSolverHeadScheduler,
    cond: torch.Tensor,
    *,
    guided: bool = False,
    cfg: float = 1.0,
    temperature: float = 1.0,
    generator: rng.Randomness = None,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
    guidance_interval: int = 1,
) -> torch.Tensor:
    """Sample one token per condition with the head's ancestral loop; returns (N', C) in float32.

    The result equals `unipic.unipic1.sampling.reference.reference_denoise_tokens` (the plain loop) up to
    float32 rounding: what depends only on the condition and the timestep, the adaLN
    modulations, is computed for many head steps in one matmul, and the duplicated noisy rows of
    guidance go through `input_proj` once.

    Args:
        net: the head network.
        scheduler: a `HeadScheduler` (or `DPMSolverHeadScheduler`) set to the wanted number of head steps.
        cond: (N, D) conditions. With `guided`, rows are `[conditional; unconditional]` (N = 2N')
            and each step's ε̂ is `ε_u + cfg·(ε_c − ε_u)`; the variance channels are the
            conditional rows', unguided. Without, N' = N and every row is independent.
        temperature: multiplies the per-step noise (not the initial noise); with a scheduler that adds
            no noise after the start, the initial noise (`scheduler.initial_noise_scale`).
        generator: source of all randomness, in this order: initial noise (N', C), then one
            (N', C) draw per step but the last; a `rng.GeneratorGroups` draws each image's rows
            from its own generator.
        noise, step_noise: optional fixed draws instead: (N', C) and (steps − 1, N', C).
        guidance_interval: see `SpeedOptions.guidance_interval` (1 = exact).
    """
    n = cond.shape[0]
    assert cond.dim() == 2 and (not guided or n % 2 == 0), f"cond {tuple(cond.shape)}, guided={guided}"
    assert guidance_interval >= 1
    n_eff = n // 2 if guided else n
    device = cond.device
    dtype = torch.float64 if cond.dtype == torch.float64 else torch.float32
    channels = net.token_dim
    if noise is None:
        noise = rng.randn((n_eff, channels), generator, device=device, dtype=dtype)
    assert tuple(noise.shape) == (n_eff, channels), f"noise {tuple(noise.shape)} for {n_eff} tokens"
    assert step_noise is None or tuple(step_noise.shape) == (scheduler.num_steps - 1, n_eff, channels)
    lazy = guided and guidance_interval > 1

    wdtype = net.input_proj.weight.dtype
    weights = net.step_weights()
    c_emb = net.cond_embed(cond.to(wdtype))  # (N, W): the token's part of the adaLN input
    t_emb = net.time_embed(scheduler.timesteps.to(device))  # (S, W): the step's part
    width = c_emb.shape[1]
    rows = n_eff if lazy else n  # rows whose modulations are precomputed for every step
    per_step = rows * net.modulation_width * c_emb.element_size()
    budget = min(MODULATION_BUDGET, CPU_MODULATION_BUDGET) if device.type == "cpu" else MODULATION_BUDGET
    chunk = max(1, budget // max(per_step, 1))
    x = noise.to(device=device, dtype=dtype)  # (N', C)
    if scheduler.initial_noise_scale(temperature) != 1.0:
        x = x * scheduler.initial_noise_scale(temperature)
    residual = None  # ε_c − ε_u of the last full guided step (lazy guidance)
    for start in range(0, scheduler.num_steps, chunk):
        stop = min(scheduler.num_steps, start + chunk)
        # (s, rows, W) adaLN inputs for s = stop − start steps, flattened for one matmul per layer.
        y = (t_emb[start:stop, None] + c_emb[None, :rows]).reshape(-1, width)
        mods = net.split_modulations([m.view(stop - start, rows, -1) for m in net.modulations(y)])
        # Per step, per layer: (shift, 1 + scale[, gate]) views of (rows, W), unbound once per chunk.
        by_step = list(zip(*(tuple(zip(*(part.unbind(0) for part in layer))) for layer in mods)))
        for index in range(start, stop):
            step_mods = by_step[index - start]
            if not guided:
                out = net.forward_modulated(x, step_mods, weights).to(dtype)  # (N', 2C)
                eps, variance = out[:, :channels], out[:, channels:]
            elif lazy and residual is not None and index % guidance_interval:
                out = net.forward_modulated(x, step_mods, weights).to(dtype)  # (N', 2C): conditional rows only
                eps, variance = out[:, :channels] + (cfg - 1.0) * residual, out[:, channels:]
            else:
                if lazy:  # a full step: the unconditional rows' modulations, for this step only
                    uncond = net.split_modulations(net.modulations(t_emb[index, None] + c_emb[n_eff:]))
                    step_mods = [tuple(torch.cat([a, b]) for a, b in zip(mc, mu)) for mc, mu in zip(step_mods, uncond)]
                out = net.forward_modulated(x, step_mods, weights, duplicate=True).to(dtype)  # (2N', 2C)
                eps_c, eps_u = out[:n_eff, :channels], out[n_eff:, :channels]  # [cond; uncond]
                eps = torch.lerp(eps_u, eps_c, cfg)  # ε_u + cfg·(ε_c − ε_u)
                if lazy:
                    residual = eps_c - eps_u
                variance = out[:n_eff, channels:]
            z = None
            if scheduler.adds_noise(index):
                z = (step_noise[index].to(device=device, dtype=dtype) if step_noise is not None
                     else rng.randn(x.shape, generator, device=device, dtype=dtype))
            x = scheduler.step(eps, x, index, variance=variance, noise=z, temperature=temperature)
    return x.float() if dtype != torch.float64 else x


@torch.no_grad()
def mar_generate_tokens(
    model: UniPic,
    prefix_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    grid: tuple[int, int],
    *,
    steps: int,
    cfg: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    head_steps: int | None = None,
    x_con: torch.Tensor | None = None,
    generator: rng.Randomness = None,
    progress: bool = False,
    known_tokens: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    speed: SpeedOptions = EXACT,
    prefix_cache=None,
) -> torch.Tensor:
    """Sample image tokens after a text (or text + source image) prefix, or fill in a partly known image.

    Args:
        model: the UniPic-1 model.
        prefix_embeds: (R, T, hidden) prefix embeddings, right-padded, rows laid out by
            `with_unconditional(..., cfg)`: with guidance R = 2B, conditional rows first.
        attention_mask: (R, T) prefix validity.
        grid: (h, w) token grid of the output.
        steps: MAR steps (1 ≤ steps ≤ h·w; checked by the pipeline).
        cfg, cfg_schedule: guidance scale and how it changes over the steps (`cfg_at_step`).
        head_steps: diffusion-head steps (the head config's default when None).
        x_con: (R, buf + h·w, enc_dim) editing condition (source-image MAR features), or None.
        known_tokens, hidden: inpainting: (B, h·w, token_dim) tokens and (B, h·w) bool, True = to
            generate, for the conditional rows (their unconditional partners get the same). Known
            tokens are visible from the first step and kept; only hidden ones are revealed, and the
            reveal schedule (and a linear guidance ramp) runs over their count, which every row must share.
        speed: training-free shortcuts (`SpeedOptions`); the default is the exact path.
        prefix_cache: a key/value cache for this very prefix (all R rows): empty, the prefix's pass
            fills it here; already filled by the caller's own pass (`build_edit_condition` with
            `edit_source_through_llm`), the prefix is not run again.

    Returns:
        (B, h·w, token_dim) float32 tokens of the conditional rows.

    The loop state is `tokens` (R, L, C), `mask` (R, L, True = hidden) and the reveal `orders`;
    a caller that knows some tokens up front (inpainting) would start from them visible and the
    hidden count below L — the steps themselves need no change.
    """
    guided = guidance_enabled(cfg)
    rows = prefix_embeds.shape[0]
    assert not guided or rows % 2 == 0, "guided rows are [conditional; unconditional]"
    n_cond = rows // 2 if guided else rows
    seq_len = grid[0] * grid[1]
    if hidden is None:
        total = seq_len
    else:
        counts = hidden.sum(dim=1)
        total = int(counts[0])
        if not bool((counts == total).all()) or total < 1:
            raise ValueError(f"every row must hide the same, positive number of tokens, got {counts.tolist()}")
    assert 1 <= steps <= total, f"steps={steps} for {total} tokens to generate"
    device = prefix_embeds.device
    head_config = model.mar.diffloss.config
    head_steps = head_config.num_sampling_steps if head_steps is None else head_steps
    scheduler = make_head_scheduler(head_config, head_steps, device, speed.head_solver)

    # 1. Random reveal orders; the unconditional rows follow their conditional partners exactly.
    if hidden is None:
        orders = sample_orders(n_cond, seq_len, device=device, generator=generator)  # (B, L)
        tokens = torch.zeros(n_cond, seq_len, model.config.token_dim, device=device, dtype=torch.float32)  # (B, L, C)
        mask = torch.ones(n_cond, seq_len, dtype=torch.bool, device=device)  # (B, L), True = hidden
    else:  # inpainting: start from the known tokens; only the hidden ones are ever revealed
        hidden = hidden.to(device)
        orders = sample_orders_within(hidden, generator=generator)  # (B, L), hidden positions first
        tokens = known_tokens.to(device=device, dtype=torch.float32).clone()  # (B, L, C)
        mask = hidden.clone()
    orders = with_unconditional(orders, orders, cfg)  # (R, L)
    tokens = with_unconditional(tokens, tokens, cfg)  # (R, L, C)
    mask = with_unconditional(mask, mask, cfg)  # (R, L)
    num_masked = total

    # 2. The prefix never changes: run it through the LLM once and reuse its keys/values. With a
    # single MAR step there is nothing to reuse it for: the prefix and the image rows go through
    # the LLM in one pass (what the reference loop does at every step), one pass fewer.
    prefix_len = prefix_embeds.shape[1]
    one_pass = steps == 1 and prefix_cache is None
    cache = new_prefix_cache(model) if prefix_cache is None else prefix_cache
    if cache.get_seq_length() == 0 and not one_pass:
        model.llm.model(inputs_embeds=prefix_embeds.to(model.dtype), attention_mask=attention_mask.long(),
                        use_cache=True, **{cache_argument(type(model.llm.model)): cache})
    elif cache.get_seq_length() not in (0, prefix_len):
        raise ValueError(f"prefix_cache holds {cache.get_seq_length()} positions, the prefix has {prefix_len}")
    lazy = guided and speed.uncond_interval > 1
    if lazy:  # a second cache for the conditional rows alone, used on the steps that skip the others
        cache_cond = new_prefix_cache(model)
        model.llm.model(inputs_embeds=prefix_embeds[:n_cond].to(model.dtype),
                        attention_mask=attention_mask[:n_cond].long(), use_cache=True,
                        **{cache_argument(type(model.llm.model)): cache_cond})
    difference = None  # z_c − z_u of the last full step, (B, L, dec_dim)

    # 3. Reveal loop.
    for step in tqdm(range(steps), disable=not progress, desc="MAR steps", leave=False):
        check_interrupt()  # a server may stop a batch nobody waits for
        if lazy and step % speed.uncond_interval:
            x_enc = model.encode_with_llm(tokens[:n_cond], mask[:n_cond].float(), grid, attention_mask[:n_cond],
                                          past_key_values=cache_cond)  # (B, buf + L_vis, enc_dim)
            _truncate_cache(cache_cond, prefix_len)
            z_c = model.mar.forward_decoder(x_enc, mask[:n_cond].float(), grid,
                                            x_con=None if x_con is None else x_con[:n_cond])  # (B, L, dec_dim)
            z = torch.cat([z_c, z_c - difference])  # (R, L, dec_dim): [conditional; estimated unconditional]
        else:
            # Both guidance halves see the same tokens: the MAR encoder runs once for the pair.
            if one_pass:
                x_enc = model.encode_with_llm(tokens, mask.float(), grid, attention_mask, prefix_embeds=prefix_embeds,
                                              copies=2 if guided else 1)  # (R, buf + L_vis, enc_dim)
            else:
                x_enc = model.encode_with_llm(tokens, mask.float(), grid, attention_mask, past_key_values=cache,
                                              copies=2 if guided else 1)  # (R, buf + L_vis, enc_dim)
                _truncate_cache(cache, prefix_len)  # drop this step's image rows; only the prefix stays cached
            z = model.mar.forward_decoder(x_enc, mask.float(), grid, x_con=x_con)  # (R, L, dec_dim)
            if lazy:
                difference = z[:n_cond] - z[n_cond:]

        mask_len = reveal_mask_len(step, steps, total, num_masked)
        mask_next = mask_by_order(mask_len, orders)  # (R, L)
        to_predict = mask if step == steps - 1 else mask & ~mask_next  # (R, L), same in both halves
        mask, num_masked = mask_next, mask_len
        if not bool(to_predict.any()):
            continue

        # Row-major gather: every conditional row's tokens, then the unconditional ones in the
        # same order, i.e. `[conditional; unconditional]` as denoise_tokens expects.
        cond = z[to_predict]  # (K, dec_dim), K = (2 if guided else 1) · new tokens
        scale = cfg_at_step(cfg, cfg_schedule, total, mask_len) if guided else 1.0
        step_head = speed.head_steps_at(step, steps, head_steps)
        if step_head != scheduler.num_steps:
            scheduler.set_timesteps(step_head, device)
        sampled = denoise_tokens(model.mar.diffloss.net, scheduler, cond, guided=guided, cfg=scale,
                                 temperature=temperature, generator=generator,
                                 guidance_interval=speed.guidance_interval)  # (K', C)
        tokens = tokens.clone()
        tokens[:n_cond][to_predict[:n_cond]] = sampled
        if guided:
            tokens[n_cond:] = tokens[:n_cond]  # the unconditional rows see the same tokens
    return tokens[:n_cond]
