"""Does a direct shape signal in the understanding features teach the LLM shape? (issue 9)

Trains image-to-text alone from MODEL, as `unipic train configs/shapes/joint.yaml
"data.tasks={i2t: 1}"` does, plus an auxiliary loss: two linear read-outs (training only) name the
shape and the colour of every object from the understanding feature of the token under its
centre. The world knows both exactly. The auxiliary loss reaches the MAR encoder at full rate (the
answers reach it at `--grad-scale`). Writes a model folder to OUT for `unipic eval i2t`.

    python research/experiments/i2t_shape_aux.py runs/shapes/sft/final runs/exp/s10/i2t-aux --steps 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unipic.training.config import DataConfig
from unipic.training.data import BatchBuilder, TaskSource
from unipic.training.losses import image_to_text_loss
from unipic.unipic1.checkpoint import load_model_folder, save_model_folder
from unipic.world.examples import make_example
from unipic.world.spec import COLORS, SHAPES


def object_targets(example_ids: list[int], seed: int, grid: tuple[int, int]):
    """(batch row, token index, shape index, colour index) of every object of the batch's scenes."""
    rows, cells, shapes, colours = [], [], [], []
    colour_names = list(COLORS)
    for row, example_id in enumerate(example_ids):
        for obj in make_example("i2t", seed, example_id).scene.objects:
            r, c = min(int(obj.cy * grid[0]), grid[0] - 1), min(int(obj.cx * grid[1]), grid[1] - 1)
            rows.append(row)
            cells.append(r * grid[1] + c)
            shapes.append(SHAPES.index(obj.shape))
            colours.append(colour_names.index(obj.color))
    return tuple(torch.tensor(v) for v in (rows, cells, shapes, colours))


def main() -> None:
    """Train answers + the shape/colour read-outs, print losses, save the model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder to start from")
    parser.add_argument("out", help="model folder to write")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of 16 examples (default 2000)")
    parser.add_argument("--aux", type=float, default=1.0, help="weight of the read-out loss (default 1.0; 0 = control)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4, as joint.yaml)")
    parser.add_argument("--grad-scale", type=float, default=0.1, help="answers' gradient into the features (default 0.1)")
    parser.add_argument("--seed", type=int, default=4, help="world seed of the training examples (default 4)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_folder(args.model)
    model.train()
    for p in model.vae.parameters():
        p.requires_grad_(False)
    hidden = model.config.llm.hidden_size
    readouts = nn.ModuleDict({"shape": nn.Linear(hidden, len(SHAPES)), "colour": nn.Linear(hidden, len(COLORS))})
    params = [p for p in model.parameters() if p.requires_grad] + list(readouts.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.02)
    cfg = DataConfig(world_seed=args.seed, image_size=model.config.sampling.understanding_image_size, batch_size=16,
                     unconditional_prob=0.0, cache_latents=False)
    source = TaskSource("i2t", cfg, 0, 1)
    build = BatchBuilder(model, tokenizer, cfg)
    rng = np.random.default_rng(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        examples = [source.get((step - 1) * 16 + i) for i in range(16)]
        batch = build("i2t", examples, rng)
        with torch.no_grad():
            tokens = model.encode_images(batch["pixels"])
        answer = image_to_text_loss(model, batch["pixels"], batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], tokens=tokens, grad_scale=args.grad_scale)
        loss = answer
        if args.aux > 0:
            features = model.understanding_features(batch["pixels"], tokens=tokens)  # (B, L + buf, hidden)
            rows, cells, shapes, colours = object_targets([e["example_id"] for e in examples], args.seed,
                                                          model.grid_for(*batch["pixels"].shape[-2:]))
            picked = features[rows, cells]  # (objects, hidden)
            aux = F.cross_entropy(readouts["shape"](picked), shapes) + F.cross_entropy(readouts["colour"](picked), colours)
            loss = loss + args.aux * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            extra = f" read-out {float(aux):.3f}" if args.aux > 0 else ""
            print(f"step {step} answer {float(answer):.3f}{extra} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    save_model_folder(model, tokenizer, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
