"""UniPic-1: the KL-16 VAE, the MAR encoder/decoder + diffusion head, a Qwen2 LLM, projectors and
an optional SigLIP2 understanding tower, wired as in Skywork UniPic (arXiv 2508.03320).

Generation path (spec §7): visible latent tokens → MAR encoder → `proj_in` → LLM (after the text
prefix, buffer rows moved last so they see every visible token) → `proj_out` added back as a
residual → MAR decoder → per-token diffusion head. Understanding path: VAE + MAR-encoder
features (the released code) or SigLIP2 features (the paper) replace the `<image>` tokens.

Submodule names and registration order equal the released checkpoint's, so `state_dict()` keys
are the official tensor names. This module holds no sampling loop (see `unipic.unipic1.sampling`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

from unipic.unipic1.models.config import UniPicConfig
from unipic.unipic1.models.layers import build_mlp
from unipic.unipic1.models.mar import MAR
from unipic.unipic1.models.vae import AutoencoderKL


class SiglipTower(nn.Module):
    """Holds transformers' SigLIP vision model under `vision_model`, the checkpoint's key layout.

    transformers ≥ 5 flattened `SiglipVisionModel` (keys `embeddings.*`); the released weights
    use the 4.x names `vision_model.embeddings.*`. Nesting restores them on every version.
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import SiglipVisionModel

        model = SiglipVisionModel(config)
        # On transformers 4.x the model already nests a `vision_model`; use that inner module.
        self.vision_model = getattr(model, "vision_model", model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → patch features (B, (H/p)·(W/p), hidden)."""
        size = self.vision_model.config.image_size
        out = self.vision_model(pixel_values=pixel_values,
                                interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != (size, size))
        return out.last_hidden_state


@functools.lru_cache(maxsize=None)
def cache_argument(module_class: type) -> str:
    """The keyword a transformers model's `forward` takes its KV cache by.

    transformers 5.x renamed `past_key_values` to `cache` (the old name warns on every call);
    earlier versions only know `past_key_values`.
    """
    parameters = inspect.signature(module_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init compute); buffers stay real.

    Loading then assigns the checkpoint's tensors in place of the meta parameters, so a model is
    never held twice. Buffers (rotary frequencies, position ids) are computed normally because
    checkpoints do not carry them.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    # Initialising a meta tensor is meaningless, and `normal_` on one runs torch's Python reference
    # implementation, whose first call imports torch._dynamo (~1.3 s): skip it.
    original_normal = nn.init.normal_

    def normal_unless_meta(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return tensor if tensor.is_meta else original_normal(tensor, *args, **kwargs)

    nn.Module.register_parameter = register_on_meta
    nn.init.normal_ = normal_unless_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        nn.init.normal_ = original_normal


class UniPic(nn.Module):
    """The UniPic-1 model. Build with a `UniPicConfig`; load weights with `unipic.unipic1.checkpoint`.

    `light_llm=True` builds the LLM from `unipic.unipic1.models.qwen2` (same parameter names and
    forward arithmetic, no transformers import; what loading for inference uses), otherwise from
    transformers (training: gradient checkpointing, its attention internals).
    """

    def __init__(self, config: UniPicConfig, *, light_llm: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        enc = config.mar.encoder_embed_dim
        self.vae = AutoencoderKL(config.vae)
        if light_llm:
            from unipic.unipic1.models.qwen2 import Qwen2ForCausalLM

            self.llm = Qwen2ForCausalLM(config.llm)
        else:
            from transformers import Qwen2ForCausalLM

            self.llm = Qwen2ForCausalLM(config.llm.to_transformers())
        self.mar = MAR(config.mar, config.head, token_dim=config.token_dim, grid_size=config.trained_grid_size)
        self.proj_in = build_mlp(enc, hidden, hidden)
        self.proj_out = build_mlp(hidden, hidden, enc)
        if config.siglip is not None:
            self.siglip2 = SiglipTower(config.siglip.to_transformers())
            # Upstream hard-codes 1152 here; we read the tower's width.
            self.siglip2_proj = build_mlp(config.siglip.hidden_size, hidden, hidden)
        else:
            self.siglip2 = None
            self.siglip2_proj = None
        self.edit_keep: nn.Linear | None = None
        if config.edit_keep_mask:
            self.add_edit_keep_head()
        # The VAE is frozen in every training stage (spec §3).
        self.vae.requires_grad_(False)
        self.image_token_id: int | None = None  # set from the tokenizer by the loader

    # -----------------------------------------------------------------------------------------
    # Properties and small helpers
    # -----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the LLM weights (the pipelines put inputs there)."""
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the LLM."""
        return self.llm.model.embed_tokens.weight.dtype

    def train(self, mode: bool = True) -> UniPic:
        """Switch train/eval mode; the frozen VAE always stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an image size in pixels (both must be multiples of the stride)."""
        stride = self.config.pixel_stride
        # The pipelines' check_inputs turn a bad size into a UserError; this is an internal invariant.
        assert height > 0 and width > 0 and not height % stride and not width % stride, (height, width, stride)
        return height // stride, width // stride

    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        """How many `<image>` placeholders a source image of this grid expands to (h·w + buffers)."""
        return grid[0] * grid[1] + self.config.mar.buffer_size

    def understanding_grid(self, size: int) -> tuple[int, int]:
        """(rows, cols) of the per-patch understanding features at `size` pixels (square): SigLIP2
        patches, or the MAR token grid (whose features are followed by the buffer rows)."""
        if self.config.understanding_encoder == "siglip2":
            side = size // self.config.siglip.patch_size
            return side, side
        return self.grid_for(size, size)

    def num_understanding_tokens(self, size: int) -> int:
        """`<image>` placeholders for understanding at `size` pixels (square)."""
        rows, cols = self.understanding_grid(size)
        if self.config.understanding_encoder == "siglip2":
            return rows * cols
        return self.num_image_tokens((rows, cols))

    # -----------------------------------------------------------------------------------------
    # Latents ↔ tokens
    # -----------------------------------------------------------------------------------------

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H', W') VAE latents → (B, (H'/p)·(W'/p), C·p²) raster-order tokens."""
        p = self.config.mar.patch_size
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Inverse of `patchify` for a token grid (h, w)."""
        p = self.config.mar.patch_size
        b = tokens.shape[0]
        c = self.config.vae.embed_dim
        x = tokens.reshape(b, grid[0], grid[1], c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, grid[0] * p, grid[1] * p)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, L, token_dim) scaled posterior-mean tokens (the VAE is frozen)."""
        latents = self.vae.encode(pixels.to(self.vae_dtype))
        return self.patchify(latents)

    def decode_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, token_dim) → (B, 3, H, W) pixels in about [-1, 1]."""
        return self.vae.decode(self.unpatchify(tokens.to(self.vae_dtype), grid))

    @property
    def vae_dtype(self) -> torch.dtype:
        """Dtype of the VAE weights."""
        return self.vae.post_quant_conv.weight.dtype

    # -----------------------------------------------------------------------------------------
    # MAR ↔ LLM
    # -----------------------------------------------------------------------------------------

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, hidden)."""
        return self.llm.get_input_embeddings()(input_ids)

    def extract_visual_feature(self, tokens: torch.Tensor, mask: torch.Tensor | None,
                               grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """MAR-encode visible tokens; return (x_enc, z_enc).

        x_enc: (B, buf + L_vis, enc_dim) with buffer rows first (the MAR's layout).
        z_enc: (B, L_vis + buf, hidden) projected for the LLM with buffer rows moved LAST, so in the
        causal LLM the buffers attend to every visible image token.
        """
        x_enc = self.mar.forward_encoder(tokens, mask, grid)  # (B, buf + L_vis, enc_dim)
        z_enc = self.proj_in(x_enc)  # (B, buf + L_vis, hidden)
        buf = self.config.mar.buffer_size
        z_enc = torch.cat([z_enc[:, buf:], z_enc[:, :buf]], dim=1)  # (B, L_vis + buf, hidden): buffers last
        return x_enc, z_enc

    def llm_image_hidden(self, z_enc: torch.Tensor, attention_mask: torch.Tensor, *,
                         prefix_embeds: torch.Tensor | None = None,
                         past_key_values=None, prefix_out: dict | None = None) -> torch.Tensor:
        """Run image rows through the LLM after a text prefix; return their last hidden states.

        Args:
            z_enc: (B, Lz, hidden) image rows.
            attention_mask: (B, T) validity of the prefix rows (right padding).
            prefix_embeds: (B, T, hidden) prefix embeddings, when no cache is given.
            past_key_values: a transformers cache already holding the T prefix rows.
            prefix_out: when given (and no cache), receives the prefix rows' last hidden states
                (B, T, hidden) under "hidden".
        """
        batch, length = z_enc.shape[:2]
        full_mask = torch.cat([attention_mask.bool(),
                               attention_mask.new_ones(batch, length, dtype=torch.bool)], dim=1)  # (B, T + Lz)
        # Image rows continue right after each row's valid text, whatever its padding.
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        z_enc = z_enc.to(self.dtype)
        if past_key_values is None:
            inputs = torch.cat([prefix_embeds.to(self.dtype), z_enc], dim=1)  # (B, T + Lz, hidden)
        else:
            inputs, position_ids = z_enc, position_ids[:, -length:]
        cache = {} if past_key_values is None else {cache_argument(type(self.llm.model)): past_key_values}
        out = self.llm.model(inputs_embeds=inputs, attention_mask=full_mask.long(), position_ids=position_ids,
                             use_cache=past_key_values is not None, **cache)
        if prefix_out is not None:
            prefix_out["hidden"] = out.last_hidden_state[:, :-length]  # (B, T, hidden)
        return out.last_hidden_state[:, -length:]  # (B, Lz, hidden)

    def encode_with_llm(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int],
                        attention_mask: torch.Tensor, *, prefix_embeds: torch.Tensor | None = None,
                        past_key_values=None, copies: int = 1, prefix_out: dict | None = None) -> torch.Tensor:
        """MAR encoder → LLM (after the prefix) → residual back into MAR space: (B, buf + L_vis, enc_dim).

        Upstream calls this `forward_mae_encoder`; it runs the LLM too, hence the name. `copies`:
        the B rows are that many repeats of the first B / copies rows' tokens and mask (guidance's
        `[conditional; unconditional]` halves differ only in the prefix), so the MAR encoder, which
        does not see the prefix, runs on one block and its output is repeated. `prefix_out`: see
        `llm_image_hidden`.
        """
        block = tokens.shape[0] // copies
        x_enc, z_enc = self.extract_visual_feature(tokens[:block], None if mask is None else mask[:block],
                                                   grid)  # (B/copies, buf + L_vis, enc), (B/copies, L_vis + buf, hid)
        if copies > 1:
            x_enc, z_enc = x_enc.repeat(copies, 1, 1), z_enc.repeat(copies, 1, 1)  # (B, ...)
        hidden = self.llm_image_hidden(z_enc, attention_mask, prefix_embeds=prefix_embeds,
                                       past_key_values=past_key_values, prefix_out=prefix_out)  # (B, L_vis + buf, hidden)
        return x_enc + self.proj_out(self._buffers_first(hidden).to(self.proj_out[0].weight.dtype))

    def _buffers_first(self, rows: torch.Tensor) -> torch.Tensor:
        """LLM image rows (B, L + buf, hidden), buffers last as the LLM reads them, reordered to the
        MAR layout (B, buf + L, hidden), buffers first."""
        buf = self.config.mar.buffer_size
        return torch.cat([rows[:, -buf:], rows[:, :-buf]], dim=1)

    def instructed_x_con(self, x_con: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
        """x_con (B, buf + L, enc_dim) plus, through proj_out, the LLM states of the prompt's source
        `<image>` rows (`edit_source_through_llm`): source_rows (B, L + buf, hidden), see `image_rows`."""
        if source_rows.shape[1] != x_con.shape[1]:
            raise ValueError(f"prompt has {source_rows.shape[1]} source rows per image but x_con has {x_con.shape[1]}")
        return x_con + self.proj_out(self._buffers_first(source_rows).to(self.proj_out[0].weight.dtype))

    def add_edit_keep_head(self) -> None:
        """Give the model its `edit_keep_mask` head (new weights) if it has none, and set the option."""
        self.config.edit_keep_mask = True
        if self.edit_keep is None:
            weight = self.proj_out[0].weight
            self.edit_keep = nn.Linear(self.config.llm.hidden_size, 1).to(device=weight.device, dtype=weight.dtype)

    def edit_keep_logits(self, cell_rows: torch.Tensor) -> torch.Tensor:
        """Logits (B, L) that each source grid cell holds an object the instruction leaves alone:
        cell_rows (B, L, hidden), the LLM states of the prompt's source grid rows (`image_rows`
        without the buffers)."""
        return self.edit_keep(cell_rows.to(self.edit_keep.weight.dtype)).squeeze(-1).float()

    def image_rows(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of `hidden` (B, T, D) at the `<image>` positions of `input_ids` (B, T), in order:
        (B, N, D), the same count N in every row (the inverse of `fill_image_rows`)."""
        return hidden[input_ids == self.image_token_id].view(hidden.shape[0], -1, hidden.shape[-1])

    def understanding_features(self, pixels: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Visual features for the `<image>` rows of an understanding prompt: (B, N, hidden);
        `tokens`: the VAE tokens of `pixels` when already known (MAR understanding only)."""
        if self.config.understanding_encoder == "siglip2":
            feats = self.siglip2(pixels.to(self.siglip2_proj[0].weight.dtype))
            return self.siglip2_proj(feats)
        if tokens is None:
            tokens = self.encode_images(pixels)
        grid = self.grid_for(pixels.shape[-2], pixels.shape[-1])
        return self.extract_visual_feature(tokens, None, grid)[1]

    def fill_image_rows(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the `<image>` rows replaced, in order, by `features` (B, N, hidden)."""
        embeds = self.embed_text(input_ids)
        is_image = input_ids == self.image_token_id
        expected = int(is_image.sum())
        if expected != features.shape[0] * features.shape[1]:
            raise ValueError(f"prompt has {expected} <image> tokens but {tuple(features.shape[:2])} features were given")
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
