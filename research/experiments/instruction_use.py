"""Does a model's diffusion loss depend on its text? The loss with each example's own prompt
against the loss with the prompts shifted by one example in the batch.

    python research/experiments/instruction_use.py --model runs/exp/s14/edit-only-recolor/final --task edit --edit-kinds recolor
    python research/experiments/instruction_use.py --model default --task t2i

edit: the loss on the tokens the edit changes (`changed_weight=1000`); t2i: on the objects' tokens
(`object_weight=1000`), the tokens a prompt decides. Six batches of 16 world training examples
(seed 77), three noise draws each; the same draws for both prompt orders.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from unipic.training.config import DataConfig
from unipic.training.data import BatchBuilder, TaskSource
from unipic.training.losses import edit_loss, text_to_image_loss


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder or built-in name")
    parser.add_argument("--task", choices=("edit", "t2i"), default="edit", help="which path's loss")
    parser.add_argument("--edit-kinds", default="", help="comma-separated edit kinds (default: all five)")
    parser.add_argument("--batches", type=int, default=6, help="batches of 16 examples")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()

    from unipic.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    model = pipe.model.eval()
    kinds = [k for k in args.edit_kinds.split(",") if k]
    data = DataConfig(world_seed=77, image_size=128, batch_size=16, cache_latents=False, edit_repeat_prob=0.0,
                      edit_kinds=kinds)
    source, builder = TaskSource(args.task, data, 0, 1), BatchBuilder(model, pipe.tokenizer, data, [])
    shift = torch.roll(torch.arange(16), 1)
    losses: dict[str, list[float]] = {"own prompts": [], "prompts shifted by one": []}
    for b in range(args.batches):
        batch = builder(args.task, [source.get(b * 16 + k) for k in range(16)], np.random.default_rng(b))
        for name, order in (("own prompts", torch.arange(16)), ("prompts shifted by one", shift)):
            ids, mask = batch["input_ids"][order], batch["attention_mask"][order]
            for draw in range(3):
                generator = torch.Generator().manual_seed(100 * b + draw)
                if args.task == "edit":
                    loss = edit_loss(model, batch["source"], batch["target"], ids, mask, generator=generator,
                                     changed_weight=1000.0)
                else:
                    loss = text_to_image_loss(model, batch["pixels"], ids, mask, generator=generator,
                                              object_weight=1000.0)
                losses[name].append(loss.item())
    for name, values in losses.items():
        print(f"{name}: {np.mean(values):.4f}")


if __name__ == "__main__":
    main()
