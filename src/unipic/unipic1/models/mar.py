"""MAR encoder/decoder: the masked-autoregressive image-token transformer of UniPic-1.

Li et al., "Autoregressive Image Generation without Vector Quantization" (arXiv 2406.11838),
as used by Harmon and UniPic: a bidirectional ViT encoder over the *visible* latent tokens
(plus `buffer_size` learned buffer rows), a decoder over the full grid that fills hidden
positions with a mask token (or, for editing, the source image's encoder features `x_con`), and
a per-token diffusion head (`diffloss`) that samples continuous 16-d latents.

Differences from the reference code: randomness comes from a passed `torch.Generator`; position
tables resized for another grid are cached per grid size instead of being re-interpolated at
every step; nothing here loops over sampling steps (see `unipic.unipic1.sampling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unipic.unipic1.models.diffusion_head import DiffusionHead, DiffusionHeadConfig
from unipic.unipic1.models.layers import Block


@dataclass
class MARConfig:
    """Sizes of the MAR encoder/decoder (mar_huge values by default)."""

    img_size: int = 512  # the pixel size the position tables were trained for
    patch_size: int = 1  # latents per token side (the VAE's stride × this = pixels per token)
    encoder_embed_dim: int = 1280
    encoder_depth: int = 20
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1280
    decoder_depth: int = 20
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    buffer_size: int = 64  # learned rows that are always visible (they all hold `fake_latent`)
    mask_ratio_min: float = 0.7
    # Spread of the training masking ratio (a normal at 1.0 truncated to [mask_ratio_min, 1]); MAR's 0.25
    # never trains the low ratios the last sampling steps meet, a large value makes it near-uniform.
    mask_ratio_std: float = 0.25
    class_num: int = 1000  # ImageNet class table inherited from MAR-H; unused by UniPic
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    grad_checkpointing: bool = False


class MAR(nn.Module):
    """MAR encoder + decoder + diffusion head; state-dict keys match the released `mar.*` tensors.

    Args:
        config: the MAR's own sizes.
        head_config: the diffusion head's.
        token_dim: width of one image token (the VAE's latent channels × patch area).
        grid_size: side of the token grid the position tables are stored for (img_size / pixel stride).
    """

    def __init__(self, config: MARConfig, head_config: DiffusionHeadConfig, *, token_dim: int, grid_size: int) -> None:
        super().__init__()
        self.config = config
        self.token_dim, self.grid_size = token_dim, grid_size
        enc, dec, buf, seq = config.encoder_embed_dim, config.decoder_embed_dim, config.buffer_size, grid_size**2
        # Registration order follows the released checkpoint's state_dict order.
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, enc))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, dec))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dec))
        self.class_emb = nn.Embedding(config.class_num, enc)
        self.z_proj = nn.Linear(token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=config.norm_eps)
        block = {"mlp_ratio": config.mlp_ratio, "eps": config.norm_eps, "attn_drop": config.attn_dropout,
                     "proj_drop": config.proj_dropout}
        self.encoder_blocks = nn.ModuleList(Block(enc, config.encoder_num_heads, **block)
                                            for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(enc, eps=config.norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.decoder_blocks = nn.ModuleList(Block(dec, config.decoder_num_heads, **block)
                                            for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=config.norm_eps)
        self.diffloss = DiffusionHead(head_config, token_dim=token_dim, cond_dim=dec)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: N(0, .02) tables and tokens, xavier Linear, unit LayerNorm; the head keeps its own."""
        if self.fake_latent.is_meta:
            return
        for table in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned, self.class_emb.weight):
            nn.init.normal_(table, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -----------------------------------------------------------------------------------------
    # Position tables at any grid size
    # -----------------------------------------------------------------------------------------

    def _resize_table(self, table: torch.Tensor, grid: tuple[int, int], buffer: int) -> torch.Tensor:
        """Bilinearly resize the image part of a (1, buffer+g², D) table to `grid`; buffers unchanged."""
        g = self.grid_size
        if grid == (g, g):
            return table
        head, image = table[:, :buffer], table[:, buffer:]
        image = image.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        image = F.interpolate(image, size=grid, mode="bilinear", align_corners=False)
        image = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([head, image], dim=1)

    def _pos_embed(self, name: str, grid: tuple[int, int], buffer: int) -> torch.Tensor:
        table = getattr(self, name)
        if torch.is_grad_enabled() and table.requires_grad:
            # Training needs gradients through the resize, so no caching.
            return self._resize_table(table, grid, buffer)
        # Inference: resize once per grid; the parameter's version counter invalidates stale entries.
        key = (name, grid, table.device, table.dtype, table._version, table.data_ptr())
        cached = self._pos_cache.get(key)
        if cached is None:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[0] != name or k[1] != grid}
            cached = self._resize_table(table.detach(), grid, buffer)
            self._pos_cache[key] = cached
        return cached

    def encoder_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder position table for a token grid (h, w): (1, buffer + h·w, D)."""
        return self._pos_embed("encoder_pos_embed_learned", grid, self.config.buffer_size)

    def decoder_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Decoder position table for a token grid (h, w): (1, buffer + h·w, D)."""
        return self._pos_embed("decoder_pos_embed_learned", grid, self.config.buffer_size)

    def diffusion_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Per-token condition position table (no buffer rows): (1, h·w, D)."""
        return self._pos_embed("diffusion_pos_embed_learned", grid, 0)

    # -----------------------------------------------------------------------------------------
    # Forward passes
    # -----------------------------------------------------------------------------------------

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_encoder(self, tokens: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """Encode the visible tokens.

        Args:
            tokens: (B, L, token_dim) latents in raster order, L = h·w.
            mask: (B, L), 1/True = hidden; every row must hide the same number. None = all visible.
            grid: (h, w) token grid.

        Returns:
            (B, buffer + L_visible, encoder_dim): buffer rows first, then visible tokens in raster order.
        """
        batch, length, _ = tokens.shape
        assert length == grid[0] * grid[1], f"{length} tokens do not fill a {grid} grid"
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))  # (B, L, D)
        buffer = self.fake_latent.unsqueeze(1).expand(batch, self.config.buffer_size, -1).to(x.dtype)
        x = torch.cat([buffer, x], dim=1)  # (B, buf + L, D)
        x = self.z_proj_ln(x + self.encoder_pos_embed(grid).to(x.dtype))
        if mask is not None:
            visible = torch.cat([mask.new_zeros(batch, self.config.buffer_size), mask], dim=1) == 0
            x = x[visible].reshape(batch, -1, x.shape[-1])  # (B, buf + L_vis, D)
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int],
                        x_con: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to per-token conditions for the diffusion head.

        Args:
            x: (B, buffer + L_vis, encoder_dim) encoder output (after the LLM residual).
            mask: (B, L), 1/True = hidden; None = all visible.
            grid: (h, w) token grid.
            x_con: optional (B, buffer + L, encoder_dim) source-image encoder features (editing):
                hidden positions start from them instead of the mask token.

        Returns:
            (B, L, decoder_dim) conditions z.
        """
        batch = x.shape[0]
        length = grid[0] * grid[1]
        buf = self.config.buffer_size
        x = self.decoder_embed(x)
        if mask is None:
            full = x
        else:
            if x_con is None:
                full = self.mask_token.to(x.dtype).expand(batch, buf + length, -1)
            else:
                full = self.decoder_embed(x_con.to(x.dtype))
            visible = torch.cat([mask.new_zeros(batch, buf), mask], dim=1) == 0  # (B, buf + L)
            # masked_scatter fills visible rows in row-major order, the order the encoder kept them in.
            full = full.masked_scatter(visible.unsqueeze(-1), x)
        full = full + self.decoder_pos_embed(grid).to(full.dtype)
        full = self.decoder_norm(self._run_blocks(self.decoder_blocks, full))
        z = full[:, buf:]  # drop buffer rows: (B, L, D)
        return z + self.diffusion_pos_embed(grid).to(z.dtype)
