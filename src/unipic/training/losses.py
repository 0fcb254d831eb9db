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


class ObjectReadout(nn.Module):
    """Training-only linear read-outs of each object's shape and colour from the understanding
    feature of the token under its centre (Shapes world).

    Answers reach the understanding features at `loss.grad_scale` and, on a small budget, teach
    colour and the question priors long before shape; the trained MAR encoder then hands the LLM
    features that hold shape poorly (docs/training.md). The world labels every object exactly, so
    a direct read-out at full gradient keeps shape and colour in the features. Inference never
    uses it; the trainer keeps its weights beside the model in checkpoints.
    """

    def __init__(self, hidden_size: int, num_shapes: int, num_colors: int, weight: float) -> None:
        super().__init__()
        self.shape = nn.Linear(hidden_size, num_shapes)
        self.color = nn.Linear(hidden_size, num_colors)
        self.weight = weight

    def loss(self, features: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed shape and colour cross-entropy: features (B, N, hidden), index (K, 2) = (row, token),
        labels (K, 2) = (shape, colour)."""
        picked = features[index[:, 0], index[:, 1]].float()  # (K, hidden)
        return F.cross_entropy(self.shape(picked), labels[:, 0]) + F.cross_entropy(self.color(picked), labels[:, 1])


class EditRegionReadout(nn.Module):
    """Training-only linear read-out, from each position's MAR decoder condition z (or, with
    `loss.edit_region_at=source`, each source grid row's final LLM state), of whether the source
    object the edit instruction names covers that token cell (Shapes world).

    Editing models learn the instruction's colour or shape but apply it to every object: nothing
    tells a decoder position whether it is the one named (docs/training.md, "Fourteenth session").
    This read-out asks each position exactly that. Inference never uses it; the trainer keeps its
    weights beside the model in checkpoints.
    """

    def __init__(self, width: int, weight: float) -> None:
        super().__init__()
        self.region = nn.Linear(width, 1)
        self.weight = weight

    def loss(self, z: torch.Tensor, region: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over every token of the rows that name an object: z (B, L, D),
        region (B, L) bool (cells the named object covers), named (B,) bool."""
        logits = self.region(z[named]).squeeze(-1).float()  # (B_named, L)
        return F.binary_cross_entropy_with_logits(logits, region[named].float())


class EditTargetReadout(nn.Module):
    """Training-only linear read-outs, from each MAR decoder condition z of an edit, of where the
    object the edit draws lies in the target (every cell its box covers) and, at the cells its box
    alone covers, its shape and colour (Shapes world).

    With the untouched objects kept, edits still draw the new colour as a blob and add or move
    nothing (docs/training.md, "Seventeenth session"): the decoder positions of the edited object
    do not know what to draw there. This read-out asks them. Inference never uses it; the trainer
    keeps its weights beside the model in checkpoints.
    """

    def __init__(self, width: int, num_shapes: int, num_colors: int, weight: float) -> None:
        super().__init__()
        self.where = EditRegionReadout(width, weight)
        self.what = ObjectReadout(width, num_shapes, num_colors, weight)
        self.weight = weight

    def loss(self, z: torch.Tensor, drawn: torch.Tensor, region: torch.Tensor, index: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Region cross-entropy over the rows that draw an object plus shape and colour cross-entropy
        at its own cells: z (B, L, D), drawn (B,) bool, region (B, L) bool, index (K, 2) = (row,
        cell), labels (K, 2) = (shape, colour)."""
        loss = self.where.loss(z, region, drawn)
        if len(index):
            loss = loss + self.what.loss(z, index, labels)
        return loss


class RelationReadout(nn.Module):
    """Training-only linear read-out, from the final hidden state of the row that answers a relation
    question, of whether its first named shape lies left of and above its second (Shapes world).

    Attention supervision tells an answer where the named objects are, but the answer alone does
    not teach the LLM to compare two positions: relation answers stay at chance (docs/training.md,
    "Eleventh session"). Reading the two comparisons out of the answer row gives that row a direct
    signal. Inference never uses it; the trainer keeps its weights beside the model in checkpoints.
    """

    def __init__(self, hidden_size: int, weight: float) -> None:
        super().__init__()
        self.order = nn.Linear(hidden_size, 2)
        self.weight = weight

    def loss(self, hidden: torch.Tensor, query: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy: hidden (B, T, hidden) the LLM's output, query (R, 2) = (batch row,
        answer row), order (R, 2) = (first left of second, first above second) as 0/1."""
        picked = hidden[query[:, 0], query[:, 1]].float()  # (R, hidden)
        return F.binary_cross_entropy_with_logits(self.order(picked), order.float())


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


def head_attention(attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                   attention_mask: torch.Tensor, query: torch.Tensor, head: int = 0) -> torch.Tensor:
    """One head's attention weights from chosen rows, recomputed from a Qwen2 attention layer's input.

    hidden: (B, T, hidden) the layer's normalised input; position_embeddings: its rotary (cos, sin),
    each (B, T, head_dim); attention_mask: (B, T) key validity (right padding); query: (K, 2) (batch
    row, query row). Returns (K, T) softmax weights over the keys (causal, padding masked), equal to
    the weights the layer's eager attention computes for that head.
    """
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    head_dim = attention.head_dim
    kv_head = head // attention.num_key_value_groups  # grouped-query attention: heads share K/V in groups
    rows, positions = query[:, 0], query[:, 1]
    each = torch.arange(len(rows), device=hidden.device)
    states = hidden[rows]  # (K, T, hidden)
    q = attention.q_proj(states[each, positions])  # (K, heads·head_dim)
    q = q.view(len(rows), -1, head_dim)[:, head]  # (K, head_dim)
    k = attention.k_proj(states).view(len(rows), states.shape[1], -1, head_dim)[:, :, kv_head]  # (K, T, head_dim)
    # Without explicit position ids the rotary tables have a batch axis of one: broadcast it first.
    cos, sin = (table.expand(hidden.shape[0], -1, -1)[rows] for table in position_embeddings)  # (K, T, head_dim)
    q_cos, q_sin = cos[each, positions], sin[each, positions]  # (K, head_dim)
    # apply_rotary_pos_emb expects (batch, heads, length, dim): give q and k a heads axis of one.
    q, _ = apply_rotary_pos_emb(q[:, None, None], q[:, None, None], q_cos[:, None], q_sin[:, None])
    _, k = apply_rotary_pos_emb(k[:, None], k[:, None], cos, sin)
    scores = (k[:, 0] @ q[:, 0, 0, :, None]).squeeze(-1) * attention.scaling  # (K, T)
    keys = torch.arange(states.shape[1], device=hidden.device)
    visible = attention_mask[rows].bool() & (keys[None] <= positions[:, None])
    return scores.float().masked_fill(~visible, float("-inf")).softmax(-1)


def named_attention_loss(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log of the attention mass (K, T) that falls on the target rows (K, T), averaged over queries."""
    return -(weights * target).sum(-1).clamp(min=1e-6).log().mean()


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
