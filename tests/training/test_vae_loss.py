"""The VAE stage's optional terms: the world-palette cross-entropy and the decoder's latent noise."""

from __future__ import annotations

import torch

from unipic.training.jobs import VAELoss
from unipic.unipic1.models.vae import AutoencoderKL, VAEConfig
from unipic.world.spec import BACKGROUND, COLORS


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), embed_dim=4, patch_size=4))


def _flat(rgb, size: int = 16) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0)[None, :, None, None].expand(1, 3, size, size)


def test_palette_loss_punishes_a_pixel_nearer_the_wrong_colour():
    loss = VAELoss(_vae(), 1.0, 1.0, 1e-6, palette=1.0)
    red, orange = _flat(COLORS["red"]), _flat(COLORS["orange"])
    assert float(loss.palette_loss(red, red)) < 1e-3
    assert float(loss.palette_loss(_flat(BACKGROUND), _flat(BACKGROUND))) < 1e-3
    # Two thirds of the way from red to orange: close in L1, but the judge reads orange.
    nearer_orange = red + (orange - red) * 0.67
    slightly_off = red + (orange - red) * 0.2
    assert float(loss.palette_loss(nearer_orange, red)) > 10 * float(loss.palette_loss(slightly_off, red))


def test_palette_term_and_latent_noise_enter_the_loss():
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = VAELoss(_vae(), 1.0, 1.0, 1e-6)
    with_palette = VAELoss(_vae(), 1.0, 1.0, 1e-6, palette=0.5)
    noisy = VAELoss(_vae(), 1.0, 1.0, 1e-6, latent_noise=0.5)
    batch = {"pixels": pixels}
    base = plain("t2i", batch, torch.Generator().manual_seed(0))
    pal = with_palette("t2i", batch, torch.Generator().manual_seed(0))
    assert "loss_palette" in pal and "loss_palette" not in base
    assert torch.allclose(pal["loss"], base["loss"] + 0.5 * pal["loss_palette"])
    noise = noisy("t2i", batch, torch.Generator().manual_seed(0))
    assert not torch.allclose(noise["loss_l1"], base["loss_l1"])  # the decoder saw other latents
