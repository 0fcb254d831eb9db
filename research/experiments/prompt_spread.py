"""How far apart are the first MAR step's conditions `z` for prompts that differ in one word? (issue 9)

With every token hidden, `z` is all the generator knows about the prompt when it draws the first
tokens. For pairs of prompts that differ only in colour, only in shape, or in the number of
objects, this prints the mean relative distance ‖z_a − z_b‖ / ‖z_a‖. A model that has learnt the
layout but not the objects' identity shows a large count spread and near-zero colour and shape
spreads, and then draws the same picture for "a red circle" and "a green square".

    python research/experiments/prompt_spread.py runs/exp/canon/final
"""

from __future__ import annotations

import argparse
import itertools

import torch

from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.text_to_image import build_t2i_prefix
from unipic.world.spec import COLORS, PLURALS, SHAPES

COUNT_WORDS = ("a", "two", "three", "four")


def first_step_conditions(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """`z` (B, L, dec_dim) of the first MAR step (all tokens hidden), without guidance."""
    prefix, attention_mask = build_t2i_prefix(model, tokenizer, prompts, cfg=1.0, device=model.device)
    height = width = model.config.sampling.image_size
    grid = model.grid_for(height, width)
    length = grid[0] * grid[1]
    tokens = torch.zeros(len(prompts), length, model.config.token_dim, device=model.device)  # (B, L, C)
    mask = torch.ones(len(prompts), length, device=model.device)  # (B, L), all hidden
    x_enc = model.encode_with_llm(tokens, mask, grid, attention_mask, prefix_embeds=prefix)
    return model.mar.forward_decoder(x_enc, mask, grid).float()


def mean_spread(z: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    """Mean of ‖z_a − z_b‖ / ‖z_a‖ over index pairs."""
    return float(sum((z[a] - z[b]).norm() / z[a].norm() for a, b in pairs) / len(pairs))


def main() -> None:
    """Print the colour, shape and count spreads of the first step's `z`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_folder(args.model)
    model.eval()

    colour_prompts = [f"a photo of a {c} {s}" for s in SHAPES for c in COLORS]
    z = first_step_conditions(model, tokenizer, colour_prompts)
    n = len(COLORS)
    colour_pairs = [(s * n + a, s * n + b) for s in range(len(SHAPES)) for a, b in itertools.combinations(range(n), 2)]
    shape_pairs = [(a * n + c, b * n + c) for c in range(n) for a, b in itertools.combinations(range(len(SHAPES)), 2)]
    print(f"colour spread {mean_spread(z, colour_pairs):.4f}")
    print(f"shape spread  {mean_spread(z, shape_pairs):.4f}")

    count_prompts = [f"a photo of {w} {s if w == 'a' else PLURALS[s]}" for s in SHAPES for w in COUNT_WORDS]
    z = first_step_conditions(model, tokenizer, count_prompts)
    k = len(COUNT_WORDS)
    count_pairs = [(s * k + a, s * k + b) for s in range(len(SHAPES)) for a, b in itertools.combinations(range(k), 2)]
    print(f"count spread  {mean_spread(z, count_pairs):.4f}")


if __name__ == "__main__":
    main()
