"""Shape of a VAE's scaled latent distribution on world scenes (how heavy its tails are).

    python research/experiments/latent_stats.py runs/exp/v1-f8c4/vae.safetensors [...]

The MAR's diffusion head models each token with a unit-scale Gaussian diffusion; tokens many
standard deviations out (objects on a flat background) are rare, hard targets.
"""

from __future__ import annotations

import sys

import torch

# A sibling script: Python puts the running script's own folder first on sys.path.
from vae_probe import load_vae

from unipic.unipic1.sampling.prompts import images_to_tensor
from unipic.world import render
from unipic.world.examples import i2t_example


@torch.no_grad()
def latent_stats(vae, count: int = 64) -> dict[str, float]:
    """Std, max |z|, fraction beyond 3 std and excess kurtosis of the scaled latents."""
    pixels = images_to_tensor([render(i2t_example(0, i, train=False).scene, 128) for i in range(count)],
                              torch.device("cpu"))
    z = vae.encode(pixels).flatten()
    std = z.std()
    return {"std": float(std), "max_abs": float(z.abs().max()), "beyond_3std": float(((z - z.mean()).abs() > 3 * std).float().mean()),
            "kurtosis": float((((z - z.mean()) / std) ** 4).mean() - 3)}


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        print(spec, {k: round(v, 3) for k, v in latent_stats(load_vae(spec)).items()})
