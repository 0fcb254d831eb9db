"""Does the generator continue an object it can see? One hidden token per scene (issue 9).

For each scene, the token under one object's centre is hidden and regenerated with every other
token visible and the scene's own prompt (`UniPicPipeline.inpaint`, no grow, no feather, so only
that token's 16×16 pixels change). The judge then reads the whole image. Printed: the fraction of
scenes still judged right after the model's fill, and after filling the token with background
(what a generator that draws no object there scores), so the first number means something only
when the second is well below it.

    python research/experiments/token_completion.py runs/shapes/pretrain/final --n 64
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from PIL import Image

from unipic.loading import load_pipeline
from unipic.world import judge, render
from unipic.world.examples import t2i_example


def scene_pairs_match(image: Image.Image, scene) -> bool:
    """The judge reads the scene's (colour, shape) multiset from `image`."""
    return Counter(d.pair for d in judge(image)) == Counter(scene.pairs)


def main() -> None:
    """Print the judged rate after the model's fill and after a background fill."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="unipic model folder, or 'default'")
    parser.add_argument("--n", type=int, default=64, help="scenes (default 64)")
    parser.add_argument("--seed", type=int, default=11, help="world seed of the scenes (default 11)")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu")
    size, stride = pipe.config.sampling.image_size, pipe.config.pixel_stride
    images, masks, prompts, scenes, blanked = [], [], [], [], []
    rng = np.random.default_rng(args.seed)
    for index in range(args.n):
        example = t2i_example(args.seed, index, train=False)
        source = render(example.scene, size)
        target = example.scene.objects[int(rng.integers(len(example.scene.objects)))]
        row, col = int(target.cy * size) // stride, int(target.cx * size) // stride
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[row * stride:(row + 1) * stride, col * stride:(col + 1) * stride] = 255
        blank = np.asarray(source).copy()
        blank[mask > 0] = (128, 128, 128)
        images.append(source)
        masks.append(Image.fromarray(mask))
        prompts.append(example.text)
        scenes.append(example.scene)
        blanked.append(Image.fromarray(blank))
    filled = pipe.inpaint(images, masks, prompts, seed=0, grow=0, feather=0)
    source_rate = np.mean([scene_pairs_match(im, s) for im, s in zip(images, scenes)])
    model_rate = np.mean([scene_pairs_match(im, s) for im, s in zip(filled, scenes)])
    blank_rate = np.mean([scene_pairs_match(im, s) for im, s in zip(blanked, scenes)])
    print(f"scenes {args.n}: source {source_rate:.3f}, model's fill {model_rate:.3f}, background fill {blank_rate:.3f}")


if __name__ == "__main__":
    main()
