"""Does each source cell know its object's shape? A per-cell linear probe says (issue 9).

Binding an edit instruction to its object ("Remove the star.") needs every source cell to know
whether it belongs to a star: the world's instructions name objects by shape alone. This probe
renders N edit sources (several objects), takes, for every token cell that exactly one object
covers, four features of that cell: its VAE token, the source's MAR-encoder feature `x_con`, what the LLM's
`<image>` row receives (`z_src`), and that row's final LLM state in the model's edit prompt
(under "Repeat this image."); it trains a linear read-out of the object's shape and of its colour
on 80% of the scenes and prints held-out accuracy next to the majority class.

    python research/experiments/cell_shape_probe.py --model default --n 600
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from unipic.unipic1.sampling.prompts import edit_user_text, images_to_tensor, tokenize_chat
from unipic.world import render
from unipic.world.examples import edit_example
from unipic.world.scene import sole_covered_cells
from unipic.world.spec import COLORS, SHAPES


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, scene_of: torch.Tensor, classes: int,
                          steps: int = 300) -> float:
    """Held-out accuracy of a linear soft-max read-out of `labels` (K,) from `features` (K, D),
    trained on the cells of the first 80% of scenes (`scene_of`, (K,)) and tested on the rest."""
    cut = int(0.8 * (int(scene_of.max()) + 1))
    train, test = scene_of < cut, scene_of >= cut
    x = features.float()
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    probe = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(x[train]), labels[train]) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe(x[test]).argmax(-1) == labels[test]).float().mean())


def majority(labels: torch.Tensor, scene_of: torch.Tensor) -> float:
    """Held-out accuracy of always answering the training cells' most common label."""
    cut = int(0.8 * (int(scene_of.max()) + 1))
    common = torch.mode(labels[scene_of < cut]).values
    return float((labels[scene_of >= cut] == common).float().mean())


@torch.no_grad()
def cell_features(pipe, n: int, seed: int, size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """({feature point: (K, D)}, shape labels (K,), colour labels (K,), scene index (K,)) over the
    cells that exactly one object covers."""
    model, tokenizer = pipe.model, pipe.tokenizer
    grid = model.grid_for(size, size)
    length = grid[0] * grid[1]
    buf = model.config.mar.buffer_size
    points: dict[str, list[torch.Tensor]] = {"vae_token": [], "x_con": [], "z_src": [], "llm_row": []}
    shapes, colors, scene_of = [], [], []
    for start in range(0, n, 32):
        edits = [edit_example(seed, i, train=False) for i in range(start, min(n, start + 32))]
        pixels = images_to_tensor([render(e.source, size) for e in edits], model.device)
        tokens = model.encode_images(pixels)  # (b, L, token_dim)
        x_con, z_src = model.extract_visual_feature(tokens, None, grid)
        # The edit prompt under "Repeat this image.", in the model's own layout, run once.
        texts = [edit_user_text(model.config, model.config.sampling.edit_cfg_prompt)] * len(edits)
        ids, mask = tokenize_chat(model.config, tokenizer, texts, device=model.device, image_rows=length + buf)
        prefix = model.fill_image_rows(ids, z_src)
        hidden = model.llm.model(inputs_embeds=prefix.to(model.dtype), attention_mask=mask.long()).last_hidden_state
        llm_rows = model.image_rows(hidden, ids)[:, :length]  # (b, L, hidden): grid cells first
        for b, edit in enumerate(edits):
            objects = edit.source.objects
            for obj, cells in zip(objects, sole_covered_cells([o.box for o in objects], *grid)):
                for cell in cells:
                    points["vae_token"].append(tokens[b, cell])
                    points["x_con"].append(x_con[b, buf + cell])
                    points["z_src"].append(z_src[b, cell])
                    points["llm_row"].append(llm_rows[b, cell])
                    shapes.append(SHAPES.index(obj.shape))
                    colors.append(list(COLORS).index(obj.color))
                    scene_of.append(start + b)
    stacked = {name: torch.stack(rows) for name, rows in points.items()}
    return stacked, torch.tensor(shapes), torch.tensor(colors), torch.tensor(scene_of)


def main() -> None:
    """Print per-cell shape and colour probe accuracy at x_con, z_src and the LLM's source rows."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder or built-in name (default: default)")
    parser.add_argument("--n", type=int, default=600, help="edit sources (default 600)")
    parser.add_argument("--seed", type=int, default=5, help="world seed of the sources (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()

    from unipic.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    pipe.model.eval()
    features, shapes, colors, scene_of = cell_features(pipe, args.n, args.seed, 128)
    print(f"{len(shapes)} cells of {args.n} sources; majority: shape {majority(shapes, scene_of):.3f}, "
          f"colour {majority(colors, scene_of):.3f}")
    for name, rows in features.items():
        shape = linear_probe_accuracy(rows, shapes, scene_of, len(SHAPES))
        color = linear_probe_accuracy(rows, colors, scene_of, len(COLORS))
        print(f"{name:8s} shape {shape:.3f}  colour {color:.3f}", flush=True)


if __name__ == "__main__":
    main()
