"""Instruction-based editing with UniPic-1 (spec §10): the source image enters twice — as `<image>`
rows of the prompt (MAR-encoder features through `proj_in`) and as `x_con`, the starting point of
every hidden position in the MAR decoder. Guidance contrasts the instruction with "Repeat this image."
Models with `edit_source_through_llm` (ours, not upstream's) read the instruction first and start
hidden positions from x_con plus the source rows' LLM states. Models with `edit_keep_mask` (ours too)
also predict, from those states, which source cells hold objects the instruction leaves alone; those
cells keep the source's tokens, visible from the first step, and only the others are regenerated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from unipic.unipic1.models.unipic import cache_argument
from unipic.unipic1.sampling.mar_decode import (
    EXACT,
    SpeedOptions,
    mar_generate_tokens,
    new_prefix_cache,
    with_unconditional,
)
from unipic.unipic1.sampling.prompts import edit_user_text, tokenize_chat
from unipic.unipic1.sampling.rng import Randomness, row_generator

if TYPE_CHECKING:
    from unipic.unipic1.models.unipic import UniPic


def build_edit_condition(model: UniPic, tokenizer, instructions: Sequence[str], x_con: torch.Tensor,
                         source_features: torch.Tensor, *, cfg: float, device: torch.device,
                         cache=None, keep_out: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefix embeddings, prefix mask, x_con) of an edit, rows: instructions, then "Repeat this
    image." with guidance; the prompt's image rows hold `source_features`. With
    `edit_source_through_llm`, the prefix's LLM pass fills `cache` (if given) for the sampler, and
    with `edit_keep_mask` it puts the instructed rows' keep logits (B, L) in `keep_out["logits"]`."""
    config = model.config
    count = source_features.shape[1]
    texts = with_unconditional([edit_user_text(config, inst.strip()) for inst in instructions],
                               [edit_user_text(config, config.sampling.edit_cfg_prompt)] * len(instructions), cfg)
    features = with_unconditional(source_features, source_features, cfg)  # (R, buf + L, hidden)
    input_ids, mask = tokenize_chat(config, tokenizer, texts, device=device, image_rows=count)
    prefix = model.fill_image_rows(input_ids, features)
    x_con = with_unconditional(x_con, x_con, cfg)  # (R, buf + L, enc_dim)
    if config.edit_source_through_llm:
        # The sampler needs this very pass's keys and values; filling `cache` saves it a second pass.
        cached = {} if cache is None else {"use_cache": True, cache_argument(type(model.llm.model)): cache}
        hidden = model.llm.model(inputs_embeds=prefix.to(model.dtype), attention_mask=mask.long(),
                                 **cached).last_hidden_state
        source_rows = model.image_rows(hidden, input_ids)  # (R, L + buf, hidden)
        x_con = model.instructed_x_con(x_con, source_rows)
        if keep_out is not None and model.edit_keep is not None:
            cells = count - config.mar.buffer_size
            keep_out["logits"] = model.edit_keep_logits(source_rows[: len(instructions), :cells])  # (B, L)
    return prefix, mask, x_con


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
    if model.edit_keep is not None:
        return _edit_with_keep_mask(model, tokenizer, source_tokens, instructions, x_con, z_src, grid,
                                    steps=steps, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                                    head_steps=head_steps, generator=generator, progress=progress, speed=speed)
    cache = new_prefix_cache(model)  # filled by whichever pass over the prefix comes first
    prefix, mask, x_con = build_edit_condition(model, tokenizer, instructions, x_con, z_src, cfg=cfg,
                                               device=model.device, cache=cache)
    tokens = mar_generate_tokens(model, prefix, mask, grid, steps=steps, cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, head_steps=head_steps, x_con=x_con,
                                 generator=generator, progress=progress, speed=speed, prefix_cache=cache)
    return model.decode_tokens(tokens, grid)


def _edit_with_keep_mask(model: UniPic, tokenizer, source_tokens: torch.Tensor, instructions: Sequence[str],
                         x_con: torch.Tensor, z_src: torch.Tensor, grid: tuple[int, int], *, generator: Randomness,
                         **sampling) -> torch.Tensor:
    """`edit_images` for models with `edit_keep_mask`: the cells the keep head marks keep the
    source's tokens and only the rest is sampled, one source at a time (the MAR encoder needs every
    row of a call to hide as many tokens, and each source keeps its own cells)."""
    tokens = torch.cat([
        edit_tokens_keeping(model, tokenizer, source_tokens[b : b + 1], instruction, x_con[b : b + 1],
                            z_src[b : b + 1], grid, generator=row_generator(generator, b), **sampling)[0]
        for b, instruction in enumerate(instructions)])  # (B, L, token_dim)
    return model.decode_tokens(tokens, grid)


def edit_tokens_keeping(model: UniPic, tokenizer, source_tokens: torch.Tensor, instruction: str,
                        x_con: torch.Tensor, z_src: torch.Tensor, grid: tuple[int, int], *,
                        keep: torch.Tensor | None = None, steps: int, cfg: float, cfg_schedule: str = "constant",
                        temperature: float = 0.85, head_steps: int | None = None, generator: Randomness = None,
                        progress: bool = False, speed: SpeedOptions = EXACT) -> tuple[torch.Tensor, torch.Tensor]:
    """One source's edit with the `keep` cells (L,) bool held at its tokens (1, L, token_dim) and
    the rest sampled; `keep=None` takes the model's keep head. Returns (tokens, the keep mask used)."""
    cache, keep_out = new_prefix_cache(model), {}  # one LLM pass over the prefix serves both
    prefix, mask, x_con = build_edit_condition(model, tokenizer, [instruction], x_con, z_src, cfg=cfg,
                                               device=model.device, cache=cache, keep_out=keep_out)
    if keep is None:
        keep = keep_out["logits"][0].sigmoid() > model.config.sampling.edit_keep_threshold  # (L,)
    hidden = ~keep[None].to(source_tokens.device)  # (1, L), True = regenerate
    count = int(hidden.sum())
    if count == 0:
        return source_tokens.float(), keep  # every cell kept: the edit leaves the source as it is
    tokens = mar_generate_tokens(model, prefix, mask, grid, steps=min(steps, count), cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, head_steps=head_steps, x_con=x_con, generator=generator,
                                 progress=progress, known_tokens=source_tokens.float(), hidden=hidden, speed=speed,
                                 prefix_cache=cache)
    return tokens, keep
