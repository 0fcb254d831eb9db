"""Can shape be read from what the understanding path sees? A small probe says (issue 9).

Renders N one-object scenes, takes the frozen VAE's tokens and the MAR encoder's understanding
features (`understanding_features`, what the LLM's `<image>` rows receive), and trains the same
small convolutional probe (two 3×3 convolutions over the token grid, max-pooled, linear) on each to
name the object's shape; prints held-out accuracy (chance 1/6). If the tokens allow it and the
features do not, the MAR encoder loses shape; if both allow it, the LLM is what fails to learn it.

    python research/experiments/shape_probe.py MODEL --n 3000 --steps 1500
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from unipic.unipic1.checkpoint import build_model, load_model_folder
from unipic.unipic1.sampling.prompts import images_to_tensor
from unipic.world import render
from unipic.world.scene import rng_for, sample_scene
from unipic.world.spec import SHAPES


def probe_accuracy(grid_features: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0) -> float:
    """Train a conv probe on (N, D, h, w) features (first 80%) and return accuracy on the rest."""
    torch.manual_seed(seed)
    n_train = int(0.8 * len(labels))
    mean, std = grid_features[:n_train].mean((0, 2, 3), keepdim=True), grid_features[:n_train].std((0, 2, 3), keepdim=True)
    x = (grid_features - mean) / (std + 1e-6)
    net = nn.Sequential(nn.Conv2d(x.shape[1], 128, 3, padding=1), nn.GELU(), nn.Conv2d(128, 128, 3, padding=1),
                        nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, len(SHAPES)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=generator)
        loss = nn.functional.cross_entropy(net(x[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((net(x[n_train:]).argmax(-1) == labels[n_train:]).float().mean())


def main() -> None:
    """Print the probe's shape accuracy on VAE tokens and on the understanding features."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder")
    parser.add_argument("--n", type=int, default=3000, help="one-object scenes (default 3000)")
    parser.add_argument("--steps", type=int, default=1500, help="probe training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=5, help="world seed of the scenes (default 5)")
    parser.add_argument("--fresh-mar", action="store_true",
                        help="probe a freshly initialised MAR and proj_in (same VAE): what training adds or loses")
    args = parser.parse_args()
    model, _ = load_model_folder(args.model)
    if args.fresh_mar:
        torch.manual_seed(0)
        fresh = build_model(model.config)
        model.mar.load_state_dict(fresh.mar.state_dict())
        model.proj_in.load_state_dict(fresh.proj_in.state_dict())
    model.eval()
    size = model.config.sampling.understanding_image_size
    scenes = [sample_scene(rng_for(args.seed, 0, i), n_objects=1) for i in range(args.n)]
    labels = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    grid = model.grid_for(size, size)
    token_rows, feature_rows = [], []
    with torch.no_grad():
        for start in range(0, args.n, 64):
            pixels = images_to_tensor([render(s, size) for s in scenes[start:start + 64]], torch.device("cpu"))
            tokens = model.encode_images(pixels)  # (b, L, C)
            features = model.understanding_features(pixels, tokens=tokens)  # (b, L + buf, hidden)
            token_rows.append(tokens)
            feature_rows.append(features[:, :tokens.shape[1]])  # image rows first, buffers last
    as_grid = lambda rows: torch.cat(rows).transpose(1, 2).reshape(args.n, -1, *grid).float()  # noqa: E731
    print({"vae_tokens": probe_accuracy(as_grid(token_rows), labels, args.steps),
           "understanding_features": probe_accuracy(as_grid(feature_rows), labels, args.steps),
           "chance": round(1 / len(SHAPES), 3)}, flush=True)


if __name__ == "__main__":
    main()
