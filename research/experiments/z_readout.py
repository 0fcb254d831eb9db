"""Does the MAR decoder's condition `z` already hold the scene? A linear read-out says (issue 9).

For N text-to-image examples of a world seed, every token is hidden (the first MAR step's view:
prompt only), the model computes the per-token conditions z, and a ridge regression from z to
the true token is fitted. The fitted tokens are decoded by the VAE and judged. If the read-out
draws the scenes while the model's own sampler does not, the scene is in z and the diffusion head
is what fails to sample it; if the read-out fails too, the MAR/LLM path has not learned it.

    python research/experiments/z_readout.py MODEL --n 32 --seed 7          # the memorisation set
    python research/experiments/z_readout.py MODEL --n 32 --seed 7 --fit-seed 8   # fitted on other scenes

The multiset rule of `overfit_eval.py` decides "right". Writes an optional sheet (targets above,
read-outs below) with --sheet.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
from PIL import Image

from unipic.training.config import DataConfig
from unipic.training.data import BatchBuilder, TaskSource
from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.prompts import tensor_to_images
from unipic.world.judge import judge


def conditions(model, tokenizer, seed: int, n: int, visible: int = 0):
    """(tokens (n, L, C), z (n, L, D), grid, mask (n, L)) for the true prompts, all tokens hidden
    but `visible` random ones per image (the same positions in every image)."""
    cfg = DataConfig(world_seed=seed, image_size=model.config.sampling.image_size, batch_size=n,
                     unconditional_prob=0.0, cache_latents=False)
    source = TaskSource("t2i", cfg, 0, 1)
    examples = [source.get(k) for k in range(n)]
    batch = BatchBuilder(model, tokenizer, cfg)("t2i", examples, np.random.default_rng(0))
    tokens = model.encode_images(batch["pixels"])
    grid = model.grid_for(*batch["pixels"].shape[-2:])
    mask = torch.ones(tokens.shape[:2])
    if visible:
        shown = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))[:visible]
        mask[:, shown] = 0.0
    x_enc = model.encode_with_llm(tokens, mask, grid, batch["attention_mask"],
                                  prefix_embeds=model.embed_text(batch["input_ids"]))
    z = model.mar.forward_decoder(x_enc, mask, grid)
    return tokens, z, grid, mask


def decoded_scenes(model, tokens: torch.Tensor, grid) -> tuple[list[Image.Image], list[Counter]]:
    """Decode (n, L, C) tokens with the model's VAE and judge each image: (images, (colour, shape) multisets)."""
    images = tensor_to_images(model.decode_tokens(tokens, grid))
    return images, [Counter(d.pair for d in judge(image)) for image in images]


def with_bias(z: torch.Tensor) -> torch.Tensor:
    """(n, L, D) conditions → (n·L, D + 1) float64 rows with a constant 1 for the read-out's offset."""
    rows = z.reshape(-1, z.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1)], 1).double()


def main() -> None:
    """Fit the read-out, decode, judge, print the fraction right."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder")
    parser.add_argument("--n", type=int, default=32, help="examples (default 32)")
    parser.add_argument("--seed", type=int, default=7, help="world seed of the judged examples (default 7)")
    parser.add_argument("--fit-seed", type=int, default=None, help="fit on this seed's examples instead (default: the same)")
    parser.add_argument("--fit-n", type=int, default=256, help="examples to fit on with --fit-seed (default 256)")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty (default 1e-3)")
    parser.add_argument("--visible", type=int, default=0,
                        help="tokens left visible per image (default 0: the first MAR step's view)")
    parser.add_argument("--sheet", default=None, help="write a PNG sheet of targets and read-outs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_folder(args.model)
    model.eval()
    tokens, z, grid, mask = conditions(model, tokenizer, args.seed, args.n, args.visible)
    fit_tokens, fit_z, fit_mask = tokens, z, mask
    if args.fit_seed is not None:
        fit_tokens, fit_z, _, fit_mask = conditions(model, tokenizer, args.fit_seed, args.fit_n, args.visible)
    hidden = fit_mask.reshape(-1) > 0  # fit on hidden tokens only
    x = with_bias(fit_z)[hidden]
    y = fit_tokens.reshape(-1, fit_tokens.shape[-1])[hidden].double()
    weights = torch.linalg.solve(x.T @ x + args.ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)  # (D+1, C)
    predicted = (with_bias(z) @ weights).float().reshape(tokens.shape)
    predicted = torch.where(mask.unsqueeze(-1) > 0, predicted, tokens)  # visible tokens stay as they are
    error = float((((predicted - tokens) ** 2).mean(-1) * mask).sum() / mask.sum())
    images, read = decoded_scenes(model, predicted, grid)
    truths, expected = decoded_scenes(model, tokens, grid)
    right = sum(a == b for a, b in zip(read, expected))
    print({"readout_mse": round(error, 4), "token_var": round(float(tokens.var()), 4),
           "right": f"{right}/{args.n}"})
    if args.sheet:
        sheet = Image.new("RGB", (min(args.n, 8) * 130, 260), "white")
        for i in range(min(args.n, 8)):
            sheet.paste(truths[i], (i * 130, 0))
            sheet.paste(images[i], (i * 130, 130))
        sheet.save(args.sheet)


if __name__ == "__main__":
    main()
