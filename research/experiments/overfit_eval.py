"""Judge a model on the first N training examples of each task (the memorisation check).

    unipic data export --task t2i --n 32 --seed 7 --out runs/exp/data/t2i      # the fixed set
    unipic train configs/shapes/pretrain.yaml data.source=folder data.folders.t2i=runs/exp/data/t2i ...
    python research/experiments/overfit_eval.py --model runs/exp/of-t2i/final --tasks t2i --n 32 --seed 7

t2i: the judge's (color, shape) multiset equals the scene's; i2t: the answer is right; edit: the
world's edit-success rule on the output.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from unipic.loading import load_pipeline
from unipic.world import judge, render
from unipic.world.edits import edit_succeeded
from unipic.world.examples import make_example
from unipic.world.questions import score_answer


def overfit_scores(pipe, tasks: list[str], n: int, seed: int, size: int = 128, **options) -> dict[str, float]:
    """Fraction of the first `n` training examples of each task that the model gets right."""
    scores = {}
    if "t2i" in tasks or "edit" in tasks:
        # The ceiling: how many of the target images the model's own VAE gives back as the judge reads them.
        import torch

        from unipic.unipic1.sampling.prompts import images_to_tensor, tensor_to_images

        key = "t2i" if "t2i" in tasks else "edit"
        scenes = [(x.scene if key == "t2i" else x.target) for x in (make_example(key, seed, i) for i in range(n))]
        with torch.no_grad():
            vae = pipe.model.vae
            recon = vae.decode(vae.encode(images_to_tensor([render(s, size) for s in scenes], torch.device("cpu"))))
        scores[f"{key}_vae_ceiling"] = float(np.mean([
            Counter(d.pair for d in judge(im)) == Counter(s.pairs) for im, s in zip(tensor_to_images(recon), scenes)]))
    if "t2i" in tasks:
        items = [make_example("t2i", seed, i) for i in range(n)]
        images = pipe.text_to_image([x.text for x in items], height=size, width=size, seed=0, **options)
        scores["t2i"] = float(np.mean([Counter(d.pair for d in judge(im[0])) == Counter(x.scene.pairs)
                                       for x, im in zip(items, images)]))
    if "i2t" in tasks:
        items = [make_example("i2t", seed, i) for i in range(n)]
        answers = pipe.image_to_text([render(x.scene, size) for x in items], [x.question.question for x in items])
        scores["i2t"] = float(np.mean([score_answer(x.question, a)["correct"] for x, a in zip(items, answers)]))
    if "edit" in tasks:
        items = [make_example("edit", seed, i) for i in range(n)]
        outputs = pipe.edit_image([render(x.source, size) for x in items], [x.instruction for x in items],
                                  height=size, width=size, seed=0, **options)
        scores["edit"] = float(np.mean([edit_succeeded(x, judge(o))[0] for x, o in zip(items, outputs)]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--tasks", default="t2i,i2t,edit", help="comma-separated tasks")
    parser.add_argument("--n", type=int, default=32, help="examples per task")
    parser.add_argument("--seed", type=int, default=7, help="the export seed of the fixed set")
    parser.add_argument("--steps", type=int, default=None, help="MAR steps (default: the model's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None, help="head temperature (default: the model's)")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, device="cpu")
    options = {k: v for k, v in (("num_iter", args.steps), ("cfg", args.cfg), ("temperature", args.temperature)) if v is not None}
    print(overfit_scores(pipe, args.tasks.split(","), args.n, args.seed, **options))


if __name__ == "__main__":
    main()
