"""Inpainting with UniPic-1: the masked-autoregressive loop started from a partly known image.

The source is VAE-encoded; its tokens outside the token mask are visible to the MAR encoder (and
so to the LLM) from the first step and never change, and only the masked tokens are revealed, in
random order, with the text-to-image prompt and its guidance against the null prompt. This is the
job MAR's training objective (predict hidden tokens from visible ones) teaches directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unipic.unipic1.models.unipic import UniPic
from unipic.unipic1.sampling.mar_decode import EXACT, SpeedOptions, mar_generate_tokens
from unipic.unipic1.sampling.rng import Randomness
from unipic.unipic1.sampling.text_to_image import build_t2i_prefix


@torch.no_grad()
def inpaint_images(
    model: UniPic,
    tokenizer,
    source_pixels: torch.Tensor,
    token_masks: torch.Tensor,
    prompts: Sequence[str],
    *,
    steps: int,
    cfg: float,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    head_steps: int | None = None,
    generator: Randomness = None,
    progress: bool = False,
    speed: SpeedOptions = EXACT,
) -> torch.Tensor:
    """Regenerate the masked tokens of each source.

    Args:
        source_pixels: (B, 3, H, W) sources in [-1, 1], H and W multiples of the token stride.
        token_masks: (B, h·w) bool, True = regenerate; every row must mask the same number of
            tokens (the MAR encoder drops hidden tokens, so rows stay rectangular).
        steps: MAR steps over the masked tokens (1 ≤ steps ≤ masked count).
        speed: training-free shortcuts, as for text-to-image (`SpeedOptions`); exact by default.

    Returns:
        (B, 3, H, W) decoded pixels (the caller pastes them into the source).
    """
    grid = model.grid_for(source_pixels.shape[-2], source_pixels.shape[-1])
    known = model.encode_images(source_pixels.to(model.device)).float()  # (B, L, token_dim)
    hidden = token_masks.to(model.device).bool()
    prefix, mask = build_t2i_prefix(model, tokenizer, prompts, cfg=cfg, device=model.device)
    tokens = mar_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, head_steps=head_steps, generator=generator,
                                 progress=progress, known_tokens=known, hidden=hidden, speed=speed)
    return model.decode_tokens(tokens, grid)
