"""The masked-autoregressive decoding loop (spec §9): reveal tokens in random order over
`num_iter` steps, each step re-encoding the visible tokens through MAR + LLM and sampling the
newly revealed ones with the per-token diffusion head.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from unipic.sampling.rng import Randomness
from unipic.sampling.schedules import (
    cfg_at_step,
    mask_by_order,
    reveal_mask_len,
    sample_orders,
    sample_orders_within,
)


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _truncate_cache(cache, length: int) -> None:
    """Drop every cached position after the first `length` (the prefix)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        # A negative argument means "remove this many" on every transformers version.
        cache.crop(-extra)


@torch.no_grad()
def mar_generate_tokens(
    model,
    prefix_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    grid: tuple[int, int],
    *,
    num_iter: int,
    cfg: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    head_steps: int | None = None,
    x_con: torch.Tensor | None = None,
    generator: Randomness = None,
    progress: bool = False,
    known_tokens: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample image tokens after a text (or text + source image) prefix.

    Args:
        model: a `UniPic`.
        prefix_embeds: (R, T, hidden) prefix embeddings, right-padded. With guidance (cfg != 1) the
            first R/2 rows are conditional and the last R/2 their unconditional partners.
        attention_mask: (R, T) prefix validity.
        grid: (h, w) token grid of the output.
        num_iter: MAR steps (1 ≤ num_iter ≤ h·w).
        x_con: (R, buf + h·w, enc_dim) editing condition (source-image MAR features), or None.
        known_tokens, hidden: inpainting: (R or R/2, h·w, token_dim) tokens and (R or R/2, h·w)
            bool, True = to generate, for the conditional rows (their unconditional partners get
            the same). Known tokens are visible from the first step and kept; only hidden ones
            are revealed, and the reveal schedule runs over their count, which every row must share.

    Returns:
        (R or R/2, h·w, token_dim) float32 tokens of the conditional rows.
    """
    rows = prefix_embeds.shape[0]
    use_cfg = cfg != 1.0
    if use_cfg and rows % 2:
        raise ValueError("with guidance the prefix must hold conditional then unconditional rows (even count)")
    n_cond = rows // 2 if use_cfg else rows
    seq_len = grid[0] * grid[1]
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter={num_iter} must be between 1 and the token count {seq_len}")
    device = prefix_embeds.device
    token_dim = model.config.token_dim

    # 1. Random reveal orders; the unconditional rows follow their conditional partners exactly.
    if hidden is None:
        orders = sample_orders(n_cond, seq_len, device=device, generator=generator)
        tokens = torch.zeros(n_cond, seq_len, token_dim, device=device, dtype=torch.float32)
        mask = torch.ones(n_cond, seq_len, dtype=torch.bool, device=device)
        total = seq_len
    else:  # inpainting: start from the known tokens, hide and reveal only the others
        counts = hidden.sum(dim=1)
        total = int(counts[0])
        if not bool((counts == total).all()) or total < 1:
            raise ValueError(f"every row must hide the same, positive number of tokens, got {counts.tolist()}")
        orders = sample_orders_within(hidden.to(device), generator=generator)
        tokens = known_tokens.to(device=device, dtype=torch.float32).clone()
        mask = hidden.to(device).clone()
    if not 1 <= num_iter <= total:
        raise ValueError(f"num_iter={num_iter} must be between 1 and the hidden token count {total}")
    if use_cfg:
        orders, tokens, mask = torch.cat([orders, orders]), torch.cat([tokens, tokens]), torch.cat([mask, mask])
    num_masked = total

    # 2. The prefix never changes: run it through the LLM once and reuse its keys/values.
    cache = _new_cache()
    prefix_len = prefix_embeds.shape[1]
    from unipic.models.unipic import cache_argument

    model.llm.model(inputs_embeds=prefix_embeds.to(model.dtype), attention_mask=attention_mask.long(),
                    use_cache=True, **{cache_argument(type(model.llm.model)): cache})

    # 3. Reveal loop.
    for step in tqdm(range(num_iter), disable=not progress, desc="MAR steps", leave=False):
        x_enc = model.forward_mae_encoder(tokens, mask.float(), grid, attention_mask, past_key_values=cache)
        _truncate_cache(cache, prefix_len)  # drop this step's image rows; only the prefix stays cached
        z = model.mar.forward_decoder(x_enc, mask.float(), grid, x_con=x_con)  # (R, L, dec_dim)

        mask_len = reveal_mask_len(step, num_iter, total, num_masked)
        mask_next = mask_by_order(mask_len, orders)
        to_predict = mask if step == num_iter - 1 else mask & ~mask_next
        mask, num_masked = mask_next, mask_len
        if not bool(to_predict.any()):
            continue

        # Row-major gather puts every conditional row's tokens before the unconditional ones,
        # which is the layout the head's guidance expects.
        cond = z[to_predict]
        scale = cfg_at_step(cfg, cfg_schedule, total, mask_len) if use_cfg else 1.0
        sampled = model.mar.diffloss.sample(cond, temperature=temperature, cfg=scale, generator=generator,
                                            num_steps=head_steps)
        tokens = tokens.clone()
        tokens[to_predict] = sampled.float()
        if use_cfg:
            tokens[n_cond:] = tokens[:n_cond]
    return tokens[:n_cond]
