"""KL-regularised convolutional autoencoder with stride 16 (LDM "KL-f16", MAR's ``kl16.ckpt``), spec §3.

Images ``(B, 3, H, W)`` in [-1, 1] ↔ latents ``(B, 16, H/16, W/16)``. Fully convolutional apart
from single-head spatial self-attention at the lowest resolution, so any H, W divisible by 16
work (square or not). Parameter names follow the released checkpoint exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AutoencoderKL",
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "VAEConfig",
]


@dataclass
class VAEConfig:
    """Hyper-parameters of the KL autoencoder (released KL-16 values as defaults)."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    scale: float = 0.2325
    # Pixels per side folded into channels before the first conv (and unfolded after the last):
    # 1 is the released architecture; 4 moves all convolutions to 1/4 resolution, which makes a
    # small from-scratch VAE far cheaper per image and sharper per unit of compute.
    patch_size: int = 1

    def __post_init__(self) -> None:
        # JSON/asdict round-trips give lists; keep tuples so configs compare and hash consistently.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not self.ch_mult:
            raise ValueError("ch_mult must not be empty")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"GroupNorm(32) needs channel counts divisible by 32; ch={self.ch} gives {bad}")
        if not self.double_z:
            # The KL posterior needs mean and log-variance; a plain AE is not part of UniPic.
            raise ValueError("only double_z=True (variational KL autoencoder) is supported")
        if self.scale == 0:
            raise ValueError("scale must be non-zero")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1; got {self.patch_size}")

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor: patch size × 2 per level after the first (16 for the released five levels)."""
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps=1e-6, affine) used everywhere in the autoencoder."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm→swish→conv3×3→norm→swish→dropout→conv3×3 plus a (1×1 when channels change) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W) -> (B, out, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1×1 conv q, k, v, proj_out), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, 1 head, H·W, C)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale is C^-0.5, the same as the reference; it also avoids
        # materialising the (HW)² attention matrix on backends with fused kernels.
        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then 3×3 stride-2 conv (halves H and W exactly for even sizes)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H/2, W/2)``."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (may be empty), optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """Middle stage: ResnetBlock → AttnBlock → ResnetBlock at constant width."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape-preserving."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` → moments ``(B, 2·embed_dim, H/16, W/16)`` (before ``quant_conv``)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        cfg = config
        self.patch_size = cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1,) + cfg.ch_mult
        res = cfg.resolution
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                # `resolution` only decides where attention goes (the 16×16 level for 256 px).
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * cfg.embed_dim if cfg.double_z else cfg.embed_dim, 3, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 2·embed_dim, H/16, W/16)``."""
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``(B, embed_dim, h, w)`` (after ``post_quant_conv``) → image ``(B, out_ch, 16h, 16w)``.

    Like the released model, the decoder has attention only in its middle stage.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        cfg = config
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        # Built from the lowest resolution up, but stored so that `up[i]` is level i (the
        # checkpoint's naming), hence the insert at the front.
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.patch_size = cfg.patch_size
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch * cfg.patch_size**2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, embed_dim, h, w) -> (B, out_ch, 16h, 16w)``; no output activation."""
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


class AutoencoderKL(nn.Module):
    """LDM KL-f16 autoencoder with UniPic's latent scaling.

    ``encode``: images ``(B, 3, H, W)`` in [-1, 1], H and W divisible by 16 →
    latents ``(B, embed_dim, H/16, W/16)`` = posterior mean × ``scale`` (deterministic, as UniPic
    uses it) or a posterior sample × ``scale``. ``decode`` is the inverse map (latents are divided
    by ``scale`` first). Inputs are cast to the parameter dtype; outputs are in that dtype.

    Args:
        config: Architecture and scaling.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, 1)

    @property
    def embed_dim(self) -> int:
        """Latent channels (16)."""
        return self.config.embed_dim

    @property
    def scale(self) -> float:
        """Latent scale factor (0.2325)."""
        return self.config.scale

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor (16)."""
        return self.config.stride

    def init_weights(self) -> None:
        """Re-initialise every layer with PyTorch's defaults (the reference uses no custom init), e.g. after ``to_empty``."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()

    def _dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(
                f"{what} must have shape (B, {channels}, H, W) with H and W divisible by {multiple}; "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{what} must be non-empty; got {tuple(x.shape)}")

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, logvar)``, each ``(B, embed_dim, H/16, W/16)``; logvar clamped to [-30, 20]."""
        self._check(x, self.config.in_channels, "images", self.stride)
        moments = self.quant_conv(self.encoder(x.to(self._dtype())))
        mean, logvar = moments.chunk(2, dim=1)
        # Same clamp as the reference posterior: keeps exp(logvar/2) finite in low precision.
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents ``(B, embed_dim, H/16, W/16)`` of images ``(B, 3, H, W)`` in [-1, 1] (posterior mean unless ``sample``)."""
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return z * self.config.scale  # out of place: `mean` may be reused by the caller

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, 16h, 16w)`` (nominally [-1, 1], unclamped) from scaled latents ``(B, embed_dim, h, w)``.

        The caller's tensor is never modified (the reference divided it in place).
        """
        self._check(z, self.config.embed_dim, "latents", 1)
        h = z.to(self._dtype()) / self.config.scale
        return self.decoder(self.post_quant_conv(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct images ``(B, 3, H, W)`` through the deterministic latent."""
        return self.decode(self.encode(x))
