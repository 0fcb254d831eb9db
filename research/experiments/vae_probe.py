"""Judge a VAE's reconstructions of world scenes, clean and with Gaussian noise on the scaled latents.

    python research/experiments/vae_probe.py --vae default --count 96 --noise 0,0.1,0.2,0.3,0.5
    python research/experiments/vae_probe.py --vae runs/x/vae.safetensors

Prints, per noise level (in units of the scaled latents the MAR predicts, whose std is ~1): the
fraction of scenes the judge reads exactly and the recall of objects per shape.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from unipic.unipic1.sampling.prompts import images_to_tensor, tensor_to_images
from unipic.world import judge, matches_scene, render
from unipic.world.examples import i2t_example


def load_vae(spec: str):
    """The VAE of a model folder / built-in name, or of a `stage: vae` file."""
    if spec.endswith(".safetensors"):
        from unipic.training.build import load_vae_file, load_vae_state
        from unipic.unipic1.models.vae import AutoencoderKL

        config, state = load_vae_file(spec)
        vae = AutoencoderKL(config)
        load_vae_state(vae, state)
        return vae.eval()
    from unipic.loading import load_pipeline

    return load_pipeline(spec, device="cpu").model.vae.eval()


@torch.no_grad()
def probe(vae, count: int, size: int, noise_levels: list[float], seed: int = 0) -> list[dict]:
    """Exact-scene rate and per-shape object recall at each latent noise level."""
    scenes = [i2t_example(seed, i, train=False).scene for i in range(count)]
    pixels = images_to_tensor([render(s, size) for s in scenes], torch.device("cpu"))
    latents = torch.cat([vae.encode(pixels[i:i + 32]) for i in range(0, count, 32)])  # scaled
    gen = torch.Generator().manual_seed(1234)
    rows = []
    for sigma in noise_levels:
        noisy = latents + sigma * torch.randn(latents.shape, generator=gen)
        recon = torch.cat([vae.decode(noisy[i:i + 32]).float().clamp(-1, 1) for i in range(0, count, 32)])
        images = tensor_to_images(recon)
        exact, kept, total = [], Counter(), Counter()
        for image, scene in zip(images, scenes):
            found = judge(image)
            exact.append(matches_scene(found, scene))
            found_pairs = Counter(d.pair for d in found)
            for pair in scene.pairs:
                total[pair[1]] += 1
                if found_pairs[pair] > 0:
                    found_pairs[pair] -= 1
                    kept[pair[1]] += 1
        rows.append({"sigma": sigma, "exact": float(np.mean(exact)),
                     "recall": {s: kept[s] / total[s] for s in sorted(total)}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="default", help="model folder / built-in name, or a vae.safetensors")
    parser.add_argument("--count", type=int, default=96, help="evaluation scenes")
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    parser.add_argument("--noise", default="0,0.1,0.2,0.3,0.5", help="comma-separated latent noise stds")
    args = parser.parse_args()
    vae = load_vae(args.vae)
    for row in probe(vae, args.count, args.size, [float(x) for x in args.noise.split(",")]):
        recall = " ".join(f"{k} {v:.2f}" for k, v in row["recall"].items())
        print(f"sigma {row['sigma']:.2f}  exact {row['exact']:.3f}  recall: {recall}")


if __name__ == "__main__":
    main()
