"""Text-to-image with UniPic-1: prompts → MAR decoding with CFG against the null prompt → VAE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unipic.unipic1.sampling.mar_decode import EXACT, SpeedOptions, mar_generate_tokens, with_unconditional
from unipic.unipic1.sampling.prompts import tokenize_chat
from unipic.unipic1.sampling.rng import Randomness

if TYPE_CHECKING:
    from unipic.unipic1.models.unipic import UniPic


def build_t2i_prefix(model: UniPic, tokenizer, prompts: Sequence[str], *, cfg: float,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (R, T, hidden) and mask (R, T) of [conditional prompts; null prompts] (null rows only with guidance)."""
    sampling = model.config.sampling
    texts = with_unconditional([sampling.t2i_prompt.format(prompt=p.strip()) for p in prompts],
                               [sampling.cfg_prompt] * len(prompts), cfg)
    input_ids, mask = tokenize_chat(model.config, tokenizer, texts, device=device)
    return model.embed_text(input_ids), mask


@torch.no_grad()
def generate_images(
    model: UniPic,
    tokenizer,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    steps: int,
    cfg: float,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    head_steps: int | None = None,
    generator: Randomness = None,
    progress: bool = False,
    speed: SpeedOptions = EXACT,
) -> torch.Tensor:
    """Generate one image per prompt: (B, 3, height, width) pixels in about [-1, 1]."""
    grid = model.grid_for(height, width)
    prefix, mask = build_t2i_prefix(model, tokenizer, prompts, cfg=cfg, device=model.device)
    tokens = mar_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, head_steps=head_steps, generator=generator,
                                 progress=progress, speed=speed)
    # Only the conditional rows are decoded (upstream decoded the discarded CFG rows too).
    return model.decode_tokens(tokens, grid)
