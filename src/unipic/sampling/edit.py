"""Instruction-based editing with UniPic-1 (spec §10): the source image enters twice — as `<image>`
rows of the prompt (MAR-encoder features through `proj_in`) and as `x_con`, the starting point of
every hidden position in the MAR decoder. Guidance contrasts the instruction with "Repeat this image."
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unipic.sampling.mar_decode import EXACT, SpeedOptions, mar_generate_tokens, with_unconditional
from unipic.sampling.prompts import tokenize_chat
from unipic.sampling.rng import Randomness

if TYPE_CHECKING:
    from unipic.models.unipic import UniPic


def build_edit_prefix(model: UniPic, tokenizer, instructions: Sequence[str], source_features: torch.Tensor, *,
                      cfg: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix embeddings (rows: instructions, then "Repeat this image." with guidance) with image rows filled."""
    config = model.config
    image_token = config.image_token
    count = source_features.shape[1]
    texts = with_unconditional([f"{image_token}\n{inst.strip()}" for inst in instructions],
                               [f"{image_token}\n{config.sampling.edit_cfg_prompt}"] * len(instructions), cfg)
    features = with_unconditional(source_features, source_features, cfg)  # (R, buf + L, hidden)
    input_ids, mask = tokenize_chat(config, tokenizer, texts, device=device, image_rows=count)
    return model.fill_image_rows(input_ids, features), mask


@torch.no_grad()
def edit_images(
    model: UniPic,
    tokenizer,
    source_pixels: torch.Tensor,
    instructions: Sequence[str],
    *,
    steps: int,
    cfg: float,
    cfg_schedule: str = "constant",
    temperature: float = 0.85,
    head_steps: int | None = None,
    generator: Randomness = None,
    progress: bool = False,
    speed: SpeedOptions = EXACT,
) -> torch.Tensor:
    """Edit each source (B, 3, H, W) by its instruction; returns (B, 3, H, W) pixels at the same size."""
    grid = model.grid_for(source_pixels.shape[-2], source_pixels.shape[-1])
    source_tokens = model.encode_images(source_pixels.to(model.device))
    x_con, z_src = model.extract_visual_feature(source_tokens, None, grid)
    prefix, mask = build_edit_prefix(model, tokenizer, instructions, z_src, cfg=cfg, device=model.device)
    x_con = with_unconditional(x_con, x_con, cfg)  # (R, buf + L, enc_dim)
    tokens = mar_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, head_steps=head_steps, x_con=x_con,
                                 generator=generator, progress=progress, speed=speed)
    return model.decode_tokens(tokens, grid)
