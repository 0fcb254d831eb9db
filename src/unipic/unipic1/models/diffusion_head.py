"""Per-token diffusion head of UniPic-1's MAR (``mar.diffloss``, spec §5).

``SimpleMLPAdaLN`` denoises one 16-channel latent token at a time, conditioned on the MAR
decoder feature of that token (1280-d) and the diffusion timestep, through adaptive LayerNorm
(shift/scale/gate) residual MLP blocks. ``DiffusionHead`` wraps it with its training loss (the
process of :mod:`unipic.unipic1.models.gaussian_diffusion`); its state dict is exactly ``net.*`` so that it
loads the released ``mar.diffloss.*`` tensors unchanged. Sampling is not here: the scheduler is
:class:`unipic.unipic1.sampling.diffusion.HeadScheduler` and the loop :mod:`unipic.unipic1.sampling.mar_decode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unipic.unipic1.models.gaussian_diffusion import GaussianDiffusion, get_diffusion

__all__ = [
    "DiffusionHead",
    "DiffusionHeadConfig",
    "FinalLayer",
    "ResBlock",
    "SimpleMLPAdaLN",
    "TimestepEmbedder",
    "timestep_embedding",
]


@dataclass
class DiffusionHeadConfig:
    """Hyper-parameters of the diffusion head and its diffusion processes (released values as defaults)."""

    depth: int = 12
    width: int = 1536
    frequency_embedding_size: int = 256
    train_steps: int = 1000
    num_sampling_steps: int = 100
    noise_schedule: str = "cosine"
    max_beta: float = 0.2
    learn_sigma: bool = True
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Upstream passes num_sampling_steps as a string ("100"); accept that spelling too.
        self.num_sampling_steps = int(self.num_sampling_steps)
        if self.frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be even, got {self.frequency_embedding_size}")
        if not 1 <= self.num_sampling_steps <= self.train_steps:
            raise ValueError(
                f"num_sampling_steps must be in [1, train_steps={self.train_steps}], got {self.num_sampling_steps}"
            )
        if self.diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")
        if self.noise_schedule not in ("cosine", "linear"):
            raise ValueError(f"noise_schedule must be 'cosine' or 'linear', got {self.noise_schedule!r}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``(N, dim)`` of timesteps ``t: (N,)``: cos half first, then sin half (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _linear(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
    """``x @ W.T + b`` for a `SimpleMLPAdaLN.step_weights` entry (W stored transposed or not)."""
    w, b, transposed = weight
    return torch.addmm(b, x, w) if transposed else F.linear(x, w, b)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; ``1 + scale`` so that a zero-initialised modulation is the identity."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features → Linear → SiLU → Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, width: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps ``(N,)`` → ``(N, width)``."""
        feats = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """adaLN residual MLP block: ``x + gate · MLP(LN(x)·(1+scale)+shift)``, (shift, scale, gate) from y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y: (N, width) -> (N, width)``."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm, adaLN (shift, scale) from y, then Linear to the output channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y: (N, width) -> (N, out_channels)``."""
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


Linear = tuple[torch.Tensor, torch.Tensor, bool]  # (weight, bias, stored transposed)


@dataclass(frozen=True)
class HeadStepWeights:
    """`SimpleMLPAdaLN.step_weights`: what one head step multiplies by, as plain tensors.

    Attributes:
        input: ``input_proj``.
        blocks: per residual block, (LayerNorm weight, bias, eps, first MLP Linear, second MLP Linear).
        final_eps: the final affine-free LayerNorm's eps.
        final: the final Linear.
        dtype: the weights' dtype (inputs are cast to it).
    """

    input: Linear
    blocks: tuple[tuple[torch.Tensor, torch.Tensor, float, Linear, Linear], ...]
    final_eps: float
    final: Linear
    dtype: torch.dtype


class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser MLP with adaLN conditioning.

    Args:
        token_dim: Channels C of a latent token (16).
        width: Hidden width (1536).
        cond_dim: Width of the MAR condition vector (1280).
        depth: Number of residual blocks (12).
        out_channels: Output channels; defaults to ``2 * token_dim`` (ε ‖ v, learned sigma).
        frequency_embedding_size: Sinusoidal timestep feature size (256).
        grad_checkpointing: Recompute each block in backward (training only).

    Shapes:
        ``forward(x: (N, C), t: (N,) long original timesteps 0..T−1, c: (N, cond_dim)) -> (N, out_channels)``;
        with learned sigma, channels ``[:C]`` are the predicted noise ε̂ and ``[C:]`` the variance
        interpolation value v ∈ ~[−1, 1]. Output is in the weight dtype.
    """

    def __init__(
        self,
        token_dim: int,
        width: int,
        cond_dim: int,
        depth: int,
        out_channels: int | None = None,
        frequency_embedding_size: int = 256,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.out_channels = 2 * token_dim if out_channels is None else out_channels
        self.grad_checkpointing = grad_checkpointing
        # Registration order defines the state-dict order of the released checkpoint.
        self.time_embed = TimestepEmbedder(width, frequency_embedding_size)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Spec §5.1 init: xavier Linear / zero bias, N(0, 0.02) time MLP, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero modulation makes every block start as the identity and the head output zero,
        # which keeps early training stable (adaLN-Zero).
        zero_layers = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero_layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- inference in two halves: what depends on (t, c) only, then what depends on x ----------
    #
    # The adaLN modulations are a function of y = time_embed(t) + cond_embed(c) alone, which does
    # not change while x is denoised; a sampler computes them for many steps in one matmul
    # (`modulations`) and runs only the x-dependent part per step (`forward_modulated`). Together
    # they compute `forward` (up to float32 rounding of the batched matmuls).

    @property
    def modulation_width(self) -> int:
        """Columns of `modulations`: 3·width per block, then 2·width for the final layer."""
        width = self.input_proj.out_features
        return (3 * len(self.res_blocks) + 2) * width

    def modulations(self, y: torch.Tensor) -> list[torch.Tensor]:
        """adaLN outputs for adaLN inputs ``y (M, width)``: one ``(M, 3·width)`` per block, then ``(M, 2·width)``."""
        silu = F.silu(y)  # every adaLN_modulation starts with the same SiLU
        layers = [b.adaLN_modulation[1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[1]]
        return [F.linear(silu, layer.weight, layer.bias) for layer in layers]

    def split_modulations(self, mods: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """`modulations` as ``(shift, 1 + scale, gate)`` per block and ``(shift, 1 + scale)`` last (any leading dims)."""
        out = []
        for mod in mods:
            parts = mod.chunk(3 if len(out) < len(self.res_blocks) else 2, dim=-1)
            # 1 + scale once here instead of at every step: the same float32 value _modulate forms.
            out.append((parts[0], 1 + parts[1], *parts[2:]))
        return out

    def step_weights(self) -> HeadStepWeights:
        """The tensors `forward_modulated` needs at every head step, gathered once (`HeadStepWeights`).

        On CPU, small-batch ``addmm`` with a contiguous transposed weight is ~1.7x faster than
        ``F.linear`` (which transposes on the fly), so there the transposed copies are made once
        and cached (rebuilt when a weight changes or moves); GPUs use the weights as they are.
        Holding plain tensors also keeps module attribute lookups out of the per-step loop.
        """
        layers = [self.input_proj] + [m for b in self.res_blocks for m in (b.mlp[0], b.mlp[2])]
        layers.append(self.final_layer.linear)
        norms = [b.in_ln for b in self.res_blocks]
        on_cpu = layers[0].weight.device.type == "cpu"
        key = tuple((t.data_ptr(), t._version) for layer in layers + norms for t in (layer.weight, layer.bias))
        cached = self.__dict__.get("_step_weight_cache")
        if cached is None or cached[0] != key:
            linears = [(layer.weight.detach().t().contiguous(), layer.bias.detach(), True) if on_cpu
                       else (layer.weight.detach(), layer.bias.detach(), False) for layer in layers]
            blocks = tuple((ln.weight.detach(), ln.bias.detach(), ln.eps, linears[1 + 2 * i], linears[2 + 2 * i])
                           for i, ln in enumerate(norms))
            weights = HeadStepWeights(linears[0], blocks, self.final_layer.norm_final.eps, linears[-1],
                                      self.input_proj.weight.dtype)
            cached = (key, weights)
            self.__dict__["_step_weight_cache"] = cached
        return cached[1]

    def forward_modulated(self, x: torch.Tensor, mods: list[tuple[torch.Tensor, ...]],
                          weights: HeadStepWeights | None = None, duplicate: bool = False) -> torch.Tensor:
        """The x-dependent part of `forward` (inference): ``x (N, C)``, ``mods`` from `split_modulations` → (N, out).

        ``weights`` is `step_weights()` (fetched when None); ``duplicate`` runs ``[x; x]`` (2N rows,
        guidance) with ``input_proj`` applied once. Written with local tensors only: at 8-16 rows
        a head step is a few microseconds of arithmetic per op, so Python overhead matters.
        """
        weights = self.step_weights() if weights is None else weights
        h = _linear(x.to(weights.dtype), weights.input)  # (N, W)
        if duplicate:
            h = torch.cat([h, h])  # (2N, W)
        shape = (h.shape[-1],)
        for (ln_weight, ln_bias, eps, first, second), (shift, scale1, gate) in zip(weights.blocks, mods):
            u = torch.addcmul(shift, torch.layer_norm(h, shape, ln_weight, ln_bias, eps), scale1)
            h = torch.addcmul(h, gate, _linear(F.silu(_linear(u, first), inplace=True), second))
        shift, scale1 = mods[-1]
        u = torch.addcmul(shift, torch.layer_norm(h, shape, None, None, weights.final_eps), scale1)
        return _linear(u, weights.final)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Predict ``(N, out_channels)`` from noisy tokens ``x (N, C)``, timesteps ``t (N,)``, conditions ``c (N, D)``."""
        dtype = self.input_proj.weight.dtype
        h = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.res_blocks:
            h = checkpoint(block, h, y, use_reentrant=False) if use_ckpt else block(h, y)
        return self.final_layer(h, y)


class DiffusionHead(nn.Module):
    """MAR's ``diffloss`` module: a :class:`SimpleMLPAdaLN` (``net``) and its training loss (``forward``).

    The only state is ``net`` (so ``state_dict()`` keys are ``net.*``, matching
    ``mar.diffloss.net.*``); the diffusion schedules are parameter-free, cached objects built on
    the device of the inputs.

    Args:
        config: Head and diffusion hyper-parameters.
        token_dim: Channels C of a latent token (the VAE's latent channels × the MAR patch area).
        cond_dim: Width of the MAR decoder's condition vectors.
    """

    def __init__(self, config: DiffusionHeadConfig, *, token_dim: int = 16, cond_dim: int = 1280) -> None:
        super().__init__()
        self.config = config
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(
            token_dim=token_dim,
            width=config.width,
            cond_dim=cond_dim,
            depth=config.depth,
            out_channels=2 * token_dim if config.learn_sigma else token_dim,
            frequency_embedding_size=config.frequency_embedding_size,
            grad_checkpointing=config.grad_checkpointing,
        )

    @property
    def train_diffusion(self) -> GaussianDiffusion:
        """The un-respaced training process (``train_steps`` steps)."""
        c = self.config
        return get_diffusion(c.train_steps, None, c.noise_schedule, c.max_beta, c.learn_sigma)

    def forward(
        self,
        target: torch.Tensor,
        cond: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked mean training loss (scalar) for clean tokens ``target (N, C)`` and conditions ``cond (N, D)``.

        Every row is repeated ``diffusion_batch_mul`` times (independent t and noise per copy);
        ``mask (N,)`` weights rows (1 = token counts, e.g. masked/hidden tokens in MAR).
        """
        if target.dim() != 2 or target.shape[-1] != self.token_dim:
            raise ValueError(f"target must be (N, {self.token_dim}), got {tuple(target.shape)}")
        if cond.dim() != 2 or cond.shape[0] != target.shape[0]:
            raise ValueError(f"cond must be ({target.shape[0]}, D), got {tuple(cond.shape)}")
        mul = self.config.diffusion_batch_mul
        # The loss schedule arithmetic is done in float32 even if the head runs in bf16.
        x0 = target.float().repeat(mul, 1)
        z = cond.repeat(mul, 1)
        loss = self.train_diffusion.training_losses(self.net, x0, z, generator)
        if mask is None:
            return loss.mean()
        if mask.shape != target.shape[:1]:
            raise ValueError(f"mask must be ({target.shape[0]},), got {tuple(mask.shape)}")
        w = mask.to(loss.dtype).repeat(mul)
        # clamp: an all-zero mask gives loss 0 instead of NaN.
        return (loss * w).sum() / w.sum().clamp_min(1e-8)
