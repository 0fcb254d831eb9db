"""The three task losses of UniPic-1 training (spec §10-12).

- text-to-image: masked diffusion loss on hidden latent tokens, conditioned on the prompt;
- editing: the same, with the source image in the prompt (`<image>` rows) and as `x_con`;
- image-to-text: next-token cross-entropy on the answer, visual features in the `<image>` rows.
Visual features entering the LLM are gradient-scaled by the run's `loss.grad_scale` (0.1 upstream); it
is a training setting, passed to each loss, not part of the model's config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from unipic.unipic1.models.layers import scale_gradient
from unipic.unipic1.sampling.schedules import (
    mask_by_order,
    random_masking,
    sample_mask_ratio,
    sample_orders,
    sample_orders_within,
)


def _masked_targets(model, tokens: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One random order per row and one masking ratio per batch (as MAR): (B, L) float mask, 1 = hidden."""
    orders = sample_orders(tokens.shape[0], tokens.shape[1], device=tokens.device, generator=generator)
    mar = model.config.mar
    ratio = sample_mask_ratio(mar.mask_ratio_min, std=mar.mask_ratio_std, generator=_cpu_generator(generator))
    return random_masking(orders, ratio)


def _masked_targets_outside(model, keep: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`_masked_targets` for edits whose `keep` cells (B, L) bool stay visible, as the sampler of a
    model with `edit_keep_mask` holds them: (B, L) float mask, 1 = hidden.

    Every row hides the same count (the MAR encoder drops hidden tokens): the batch ratio of its
    largest set of other cells. A row with fewer other cells hides all of them and a few kept ones.
    """
    orders = sample_orders_within(~keep, generator=generator)  # (B, L): other cells first, then kept ones
    mar = model.config.mar
    ratio = sample_mask_ratio(mar.mask_ratio_min, std=mar.mask_ratio_std, generator=_cpu_generator(generator))
    count = max(1, math.ceil(ratio * int((~keep).sum(dim=1).max())))
    return mask_by_order(count, orders).float()


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    # The ratio is a host-side scalar; draw it from a CPU generator derived from the caller's.
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), device=generator.device,
                                                           generator=generator).item()))


def _tokens_of(model, pixels: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The frozen VAE's (B, L, token_dim) tokens of `pixels`: `tokens` when given (cached), else encoded."""
    if tokens is None:
        return model.encode_images(pixels)
    return tokens.to(device=pixels.device)


def object_tokens(tokens: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """(B, L) bool: tokens farther than `threshold` (scaled latent units) from their image's median token.

    A world image is mostly flat background, so the median token is the background's; the rest
    are the objects' tokens, the ones a prompt decides.
    """
    background = tokens.median(dim=1, keepdim=True).values  # (B, 1, C)
    return (tokens.float() - background.float()).norm(dim=-1) > threshold


def changed_tokens(source: torch.Tensor, target: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """(B, L) bool: target tokens farther than `threshold` (scaled latent units) from the source token
    at the same position, i.e. where an edit changes the image."""
    return (target.float() - source.float()).norm(dim=-1) > threshold


def _diffusion_loss(model, tokens: torch.Tensor, z: torch.Tensor, mask: torch.Tensor,
                    generator: torch.Generator | None, probe: TokenProbe | None = None,
                    object_weight: float = 0.0, changed: torch.Tensor | None = None,
                    changed_weight: float = 0.0) -> torch.Tensor:
    weights = mask
    if object_weight > 0:
        # Object tokens are ~20% of a world image; weighting them is weighting what the prompt says.
        weights = weights * (1.0 + object_weight * object_tokens(tokens).to(mask.dtype))
    if changed is not None and changed_weight > 0:
        # An edit changes a few tokens; the rest are a copy of x_con. Weighting the changed ones is
        # weighting what the instruction says, so its signal is not diluted by the easy copy.
        weights = weights * (1.0 + changed_weight * changed.to(mask.dtype))
    loss = model.mar.diffloss(tokens.reshape(-1, tokens.shape[-1]), z.reshape(-1, z.shape[-1]),
                              weights.reshape(-1), generator=generator)
    if probe is not None:
        loss = loss + probe.weight * probe.loss(z, tokens, mask)
    return loss


class TokenProbe(nn.Module):
    """Training-only linear read-out of each hidden token from its MAR decoder feature `z`.

    The diffusion loss reaches `z` only through the head's zero-initialised adaLN modulation, so
    early on the MAR and LLM learn slowly; a direct regression of the clean token from `z` gives
    them a strong signal from the first step. The probe is not part of the model (inference never
    uses it); the trainer keeps its weights beside the model in checkpoints.
    """

    def __init__(self, cond_dim: int, token_dim: int, weight: float) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, token_dim)
        self.weight = weight

    def loss(self, z: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over hidden tokens: z (B, L, D), tokens (B, L, C), mask (B, L)."""
        error = ((self.linear(z).float() - tokens.float()) ** 2).mean(dim=-1)
        return (error * mask).sum() / mask.sum().clamp_min(1.0)


def text_to_image_loss(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                       generator: torch.Generator | None = None, tokens: torch.Tensor | None = None,
                       probe: TokenProbe | None = None, object_weight: float = 0.0) -> torch.Tensor:
    """Diffusion loss for generating `pixels` (B, 3, H, W) from prompts (right-padded ids and mask);
    `tokens`: the frozen VAE's tokens of `pixels`, when already known; `object_weight`: extra
    weight on hidden `object_tokens`."""
    grid = model.grid_for(pixels.shape[-2], pixels.shape[-1])
    tokens = _tokens_of(model, pixels, tokens)  # (B, L, token_dim)
    mask = _masked_targets(model, tokens, generator)
    x_enc = model.encode_with_llm(tokens, mask, grid, attention_mask, prefix_embeds=model.embed_text(input_ids))
    z = model.mar.forward_decoder(x_enc, mask, grid)
    return _diffusion_loss(model, tokens, z, mask, generator, probe, object_weight)


def edit_loss(model, source_pixels: torch.Tensor, target_pixels: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor, *, generator: torch.Generator | None = None,
              source_tokens: torch.Tensor | None = None, target_tokens: torch.Tensor | None = None,
              probe: TokenProbe | None = None, grad_scale: float = 0.1,
              object_weight: float = 0.0, changed_weight: float = 0.0,
              decoder_out: dict | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion loss for producing `target_pixels` from `source_pixels` and an instruction prompt.

    `input_ids` must contain h·w + buffer `<image>` ids for the source (see `UniPic.num_image_tokens`);
    `changed_weight`: extra weight on hidden `changed_tokens` (target unlike source); `decoder_out`,
    when given, receives the MAR decoder's conditions z (B, L, decoder_dim) under "z" and, for models
    with `edit_source_through_llm`, the LLM's final states of the source grid rows (B, L, hidden), in
    raster order, under "source_rows". `keep` (B, L) bool: cells that stay visible (models with
    `edit_keep_mask`; see `_masked_targets_outside`).
    """
    grid = model.grid_for(target_pixels.shape[-2], target_pixels.shape[-1])
    source = _tokens_of(model, source_pixels, source_tokens)
    target = _tokens_of(model, target_pixels, target_tokens)
    x_con, z_src = model.extract_visual_feature(source, None, grid)
    x_con, z_src = scale_gradient(x_con, grad_scale), scale_gradient(z_src, grad_scale)
    prefix = model.fill_image_rows(input_ids, z_src)
    mask = _masked_targets(model, target, generator) if keep is None else \
        _masked_targets_outside(model, keep.to(target.device), generator)
    prefix_out = {} if model.config.edit_source_through_llm else None
    # Kept cells show the source's tokens, as the sampler of a model with edit_keep_mask fills them
    # (the target's differ a little next to an edited object: the VAE sees across cell borders).
    visible = target if keep is None else torch.where(keep.to(target.device)[..., None], source, target)
    x_enc = model.encode_with_llm(visible, mask, grid, attention_mask, prefix_embeds=prefix, prefix_out=prefix_out)
    source_rows = None if prefix_out is None else model.image_rows(prefix_out["hidden"], input_ids)  # (B, L + buf, hidden)
    if source_rows is not None:
        x_con = model.instructed_x_con(x_con, source_rows)
    z = model.mar.forward_decoder(x_enc, mask, grid, x_con=x_con)
    if decoder_out is not None:
        decoder_out["z"] = z
        if source_rows is not None:
            decoder_out["source_rows"] = source_rows[:, : z.shape[1]]  # (B, L, hidden): grid cells first
    changed = changed_tokens(source, target) if changed_weight > 0 else None
    return _diffusion_loss(model, target, z, mask, generator, probe, object_weight, changed, changed_weight)


@contextmanager
def captured_output(module: nn.Module, active: bool = True) -> Iterator[dict]:
    """While open, the dict holds `module`'s latest output under "output" (its first element when
    the module returns a tuple; nothing when inactive)."""
    outputs: dict = {}

    def keep(_, __, output) -> None:
        outputs["output"] = output[0] if isinstance(output, tuple) else output

    hook = module.register_forward_hook(keep) if active else None
    try:
        yield outputs
    finally:
        if hook is not None:
            hook.remove()


@contextmanager
def captured_inputs(module: nn.Module, active: bool = True) -> Iterator[dict]:
    """While open, the dict holds the keyword inputs of `module`'s latest call (nothing when inactive)."""
    inputs: dict = {}
    hook = module.register_forward_pre_hook(lambda _, args, kwargs: inputs.update(kwargs),
                                            with_kwargs=True) if active else None
    try:
        yield inputs
    finally:
        if hook is not None:
            hook.remove()


def image_to_text_loss(model, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       labels: torch.Tensor, tokens: torch.Tensor | None = None, grad_scale: float = 0.1,
                       features: torch.Tensor | None = None, hidden_out: dict | None = None) -> torch.Tensor:
    """Next-token cross-entropy on positions whose label is ≥ 0 (-100 = ignore), image rows filled;
    `features`: the understanding features of `pixels`, when already computed; `hidden_out`, when
    given, receives the LLM's output (B, T, hidden) under "hidden"."""
    if features is None:
        features = model.understanding_features(pixels, tokens=tokens)
    features = scale_gradient(features, grad_scale)
    embeds = model.fill_image_rows(input_ids, features)
    hidden = model.llm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    if hidden_out is not None:
        hidden_out["hidden"] = hidden
    # Predict token t+1 from position t; only supervised positions go through the output matrix.
    shifted = labels[:, 1:]
    keep = shifted >= 0
    if not bool(keep.any()):
        return hidden.sum() * 0.0
    logits = model.llm.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), shifted[keep])
