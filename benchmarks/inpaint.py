"""Inpainting benchmark: seconds per image against plain text-to-image generation at the same size.

Runs both on the same loaded pipeline, in the same process, with the same steps and batch size:
`text_to_image` on the Shapes-world case prompts, then `inpaint` on the `unipic eval inpaint`
cases (each masks one object's box plus a margin). Inpainting runs the same number of MAR steps
over fewer tokens, and adds one VAE encode and the feathered paste per image, so the ratio is
what masking costs or saves. Prints one JSON line.

    python benchmarks/inpaint.py --model default --size 128 --n 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from unipic.eval.inpaint import inpaint_eval_set
from unipic.loading import load_pipeline
from unipic.world.render import render


def main() -> None:
    """Parse the options, time both jobs and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model to load (default: the embedded model)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--n", type=int, default=8, help="images per job and repeat (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (default 1)")
    args = parser.parse_args()

    pipeline = load_pipeline(args.model, device="cpu", dtype="float32")
    cases = inpaint_eval_set(args.n, seed=0)[: args.n]
    prompts = [c.prompt for c in cases]
    sources = [render(c.source, args.size) for c in cases]
    masks = [c.mask(args.size) for c in cases]
    seeds = list(range(args.n))

    def generate() -> None:
        pipeline.text_to_image(prompts, height=args.size, width=args.size, seed=seeds, batch_size=args.batch_size)

    def inpaint() -> None:
        pipeline.inpaint(sources, masks, prompts, seed=seeds, batch_size=args.batch_size)

    seconds: dict[str, list[float]] = {"generate": [], "inpaint": []}
    for job in (generate, inpaint):
        job()  # warm-up: position tables, allocator
        for _ in range(args.repeats):
            start = time.perf_counter()
            job()
            seconds[job.__name__].append((time.perf_counter() - start) / args.n)
    result = {name: statistics.median(values) for name, values in seconds.items()}
    masked = [int(m.reshape(args.size // 16, 16, args.size // 16, 16).any(axis=(1, 3)).sum()) for m in masks]
    print(json.dumps({"model": args.model or "default", "size": args.size, "n": args.n,
                      "seconds_per_image": result, "ratio_inpaint_to_generate": result["inpaint"] / result["generate"],
                      "mean_masked_tokens": sum(masked) / len(masked), "tokens": (args.size // 16) ** 2}))


if __name__ == "__main__":
    main()
