"""Does the generator read the tokens it can see? Losses with true and foreign visible tokens (issue 9).

For N text-to-image examples, one random order per example and a fixed masking ratio r, the
diffusion loss on the hidden tokens is computed twice with the same prompts, masks and noise: with
the image's own visible tokens, and with the visible tokens taken from another image of the batch.
A model that continues what it sees has a much lower loss with its own tokens, more so as r falls
(more is visible); equal losses mean the visible tokens are ignored. Also printed: the loss on hidden
tokens that touch a visible object token (8-neighbourhood), where seeing the object matters most.

    python research/experiments/context_dependence.py runs/shapes/pretrain/final --n 64 --ratios 0.9,0.5,0.1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from unipic.training.config import DataConfig
from unipic.training.data import BatchBuilder, TaskSource
from unipic.training.losses import object_tokens
from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.schedules import random_masking, sample_orders


def per_token_loss(model, tokens, z, generator) -> torch.Tensor:
    """(B, L) diffusion loss of every token under condition z, one noise draw per token."""
    head = model.mar.diffloss
    flat_x, flat_z = tokens.reshape(-1, tokens.shape[-1]), z.reshape(-1, z.shape[-1])
    losses = head.train_diffusion.training_losses(head.net, flat_x.float(), flat_z, generator)
    return losses.reshape(tokens.shape[:2])


def main() -> None:
    """Print hidden-token losses with own vs foreign visible tokens at each masking ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder")
    parser.add_argument("--n", type=int, default=64, help="examples (default 64)")
    parser.add_argument("--seed", type=int, default=11, help="world seed for the examples (default 11)")
    parser.add_argument("--ratios", default="0.9,0.5,0.1", help="comma-separated masking ratios")
    parser.add_argument("--repeats", type=int, default=4, help="noise draws per ratio (default 4)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_folder(args.model)
    model.eval()
    cfg = DataConfig(world_seed=args.seed, image_size=model.config.sampling.image_size, batch_size=16,
                     unconditional_prob=0.0, cache_latents=False)
    source = TaskSource("t2i", cfg, 0, 1)
    batch = BatchBuilder(model, tokenizer, cfg)("t2i", [source.get(k) for k in range(args.n)],
                                                np.random.default_rng(0))
    tokens = model.encode_images(batch["pixels"])  # (B, L, C)
    grid = model.grid_for(*batch["pixels"].shape[-2:])
    foreign = torch.roll(tokens, 1, dims=0)
    prefix = model.embed_text(batch["input_ids"])
    is_object = object_tokens(tokens).float()  # (B, L)
    for ratio in (float(r) for r in args.ratios.split(",")):
        orders = sample_orders(tokens.shape[0], tokens.shape[1], generator=torch.Generator().manual_seed(0))
        mask = random_masking(orders, ratio).float()  # (B, L), 1 = hidden
        # Hidden tokens with a visible object token among their 8 neighbours.
        visible_object = (is_object * (1 - mask)).reshape(-1, 1, *grid)
        near = (F.max_pool2d(visible_object, 3, stride=1, padding=1).reshape(mask.shape) > 0).float() * mask
        row = {}
        for name, context in (("own", tokens), ("foreign", foreign)):
            seen = torch.where(mask.unsqueeze(-1) > 0, tokens, context)  # hidden rows are never read
            x_enc = model.encode_with_llm(seen, mask, grid, batch["attention_mask"], prefix_embeds=prefix)
            z = model.mar.forward_decoder(x_enc, mask, grid)
            total, close = 0.0, 0.0
            for r in range(args.repeats):
                loss = per_token_loss(model, tokens, z, torch.Generator().manual_seed(r))
                total += float((loss * mask).sum() / mask.sum())
                close += float((loss * near).sum() / near.sum().clamp_min(1))
            row[name] = (total / args.repeats, close / args.repeats)
        print(f"ratio {ratio:.2f}: hidden loss own {row['own'][0]:.4f} foreign {row['foreign'][0]:.4f} | "
              f"next to a visible object ({int(near.sum())} tokens) own {row['own'][1]:.4f} "
              f"foreign {row['foreign'][1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
