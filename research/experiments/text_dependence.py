"""Does each path use the other modality? Losses with true and shuffled pairings (issue 9).

Text-to-image: the same images, masks and diffusion noise scored with the true prompts, the
prompts shuffled across images, and the null prompt; a model that ignores the prompt gives equal
losses. Image-to-text (`--task i2t`): the answers' cross-entropy with the true images and with the
images shuffled across questions; a model that ignores the image gives equal losses.

    python research/experiments/text_dependence.py runs/shapes/pretrain/final --n 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from unipic.training.config import DataConfig
from unipic.training.data import BatchBuilder, TaskSource
from unipic.training.losses import image_to_text_loss, text_to_image_loss
from unipic.unipic1.checkpoint import load_model_folder
from unipic.unipic1.sampling.prompts import tokenize_chat


def main() -> None:
    """Print the mean t2i loss for true, shuffled and null prompts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder")
    parser.add_argument("--n", type=int, default=64, help="examples (default 64)")
    parser.add_argument("--seed", type=int, default=11, help="world seed for the examples (default 11)")
    parser.add_argument("--task", choices=["t2i", "i2t"], default="t2i", help="which path to probe (default t2i)")
    parser.add_argument("--repeats", type=int, default=4, help="mask/noise draws per example (default 4)")
    parser.add_argument("--layout", default="random", help="world layout of the t2i scenes: random or canonical")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model_folder(args.model)
    cfg = DataConfig(world_seed=args.seed, image_size=model.config.sampling.image_size, batch_size=16,
                     unconditional_prob=0.0, cache_latents=False,
                     world_layout=args.layout)
    build = BatchBuilder(model, tokenizer, cfg)
    shuffle = torch.roll(torch.arange(args.n), 1)
    if args.task == "i2t":
        source = TaskSource("i2t", cfg, 0, 1)
        batch = build("i2t", [source.get(k) for k in range(args.n)], np.random.default_rng(0))
        for name, pixels in (("true", batch["pixels"]), ("shuffled", batch["pixels"][shuffle])):
            loss = image_to_text_loss(model, pixels, batch["input_ids"], batch["attention_mask"], batch["labels"])
            print(f"{name:9s} answer loss {float(loss):.5f}")
        return
    source = TaskSource("t2i", cfg, 0, 1)
    examples = [source.get(k) for k in range(args.n)]
    batch = build("t2i", examples, np.random.default_rng(0))
    null_ids, null_mask = tokenize_chat(model.config, tokenizer, [model.config.sampling.cfg_prompt] * args.n,
                                        device=torch.device("cpu"))
    variants = {"true": (batch["input_ids"], batch["attention_mask"]),
                "shuffled": (batch["input_ids"][shuffle], batch["attention_mask"][shuffle]),
                "null": (null_ids, null_mask)}
    tokens = model.encode_images(batch["pixels"])
    for name, (ids, mask) in variants.items():
        losses = []
        for r in range(args.repeats):
            generator = torch.Generator().manual_seed(r)
            losses.append(float(text_to_image_loss(model, batch["pixels"], ids, mask, generator=generator,
                                                   tokens=tokens)))
        print(f"{name:9s} loss {np.mean(losses):.5f}")


if __name__ == "__main__":
    main()
