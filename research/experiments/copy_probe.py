"""Can a model's editing path copy its source? Three measurements on world edit sources.

    python research/experiments/copy_probe.py --model default --n 24 --seed 1

1. Copy: the edit sampler with the instruction "Repeat this image." (the guidance prompt editing
   trains with `data.edit_repeat_prob`), judged against the source scene (`matches_scene`), next
   to the VAE's own reconstruction of the same sources (the ceiling).
2. Identity in `x_con`: a ridge regression, fitted on half the scenes and scored (R²) on the
   other half, of each token from the MAR-encoder feature at its own position (`x_con`, the
   decoder's starting point for every hidden target position) and from the projected rows the
   LLM reads (`z_src`). A feature that does not hold its token cannot be copied from it.
3. The same sources under their real instructions, at guidance 1 and 3: edit success, the
   fraction of untouched objects the judge still finds (same colour and shape within 0.05·S of
   where it sees them in the source), and how often the instructed change itself is there,
   whatever happens to the rest (`edited_part_done`).
"""

from __future__ import annotations

import argparse

import torch

from unipic.unipic1.sampling.prompts import images_to_tensor, tensor_to_images
from unipic.world import judge, matches_scene, render
from unipic.world.edits import edit_succeeded, moved_far_enough, near_centre, visual_centre
from unipic.world.examples import edit_eval_set


def untouched_kept(edit, found) -> tuple[int, int]:
    """(kept, total): the source's untouched objects that `found` still holds in place."""
    pool = list(found)
    kept = total = 0
    for i, obj in enumerate(edit.source.objects):
        if i == edit.index:
            continue
        total += 1
        centre = visual_centre(obj)
        for j, f in enumerate(pool):
            if f.pair == obj.pair and near_centre(f, centre):
                kept += 1
                del pool[j]
                break
    return kept, total


def edited_part_done(edit, found) -> bool:
    """Whether `found` shows the instructed change, ignoring the untouched objects: the new object
    at the old centre (recolor, replace), no object of the removed pair there (remove), one more of
    the added pair (add), the object at least 0.15·S further in its direction (move)."""
    if edit.kind in ("recolor", "replace"):
        new = edit.target.objects[edit.new_index]
        return any(f.pair == new.pair and near_centre(f, visual_centre(new)) for f in found)
    if edit.kind == "remove":
        old = edit.source.objects[edit.index]
        return not any(f.pair == old.pair and near_centre(f, visual_centre(old)) for f in found)
    if edit.kind == "add":
        pair = edit.target.objects[edit.new_index].pair
        return sum(f.pair == pair for f in found) >= sum(o.pair == pair for o in edit.target.objects)
    pair = edit.source.objects[edit.index].pair  # move
    return any(f.pair == pair and moved_far_enough(edit, f) for f in found)


def ridge_r2(features: torch.Tensor, targets: torch.Tensor, split: int, ridge: float = 1e-2) -> float:
    """R² on rows [split:] of a ridge fit (with bias) on rows [:split]."""
    x = torch.cat([features, torch.ones(len(features), 1)], dim=1).double()
    y = targets.double()
    a, b = x[:split], y[:split]
    weights = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    residual = y[split:] - x[split:] @ weights
    return float(1 - residual.pow(2).sum() / (y[split:] - y[split:].mean(0)).pow(2).sum())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder or built-in name")
    parser.add_argument("--n", type=int, default=24, help="edit sources (a multiple of 5 is spread over the kinds)")
    parser.add_argument("--seed", type=int, default=1, help="edit evaluation-set seed")
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    parser.add_argument("--steps", type=int, default=None, help="MAR steps (default: the model's)")
    args = parser.parse_args()

    from unipic.loading import load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    model = pipe.model.eval()
    edits = edit_eval_set((args.n + 4) // 5, seed=args.seed)[: args.n]
    scenes = [e.source for e in edits]
    images = [render(s, args.size) for s in scenes]
    pixels = images_to_tensor(images, torch.device("cpu"))
    grid = model.grid_for(args.size, args.size)
    tokens = model.encode_images(pixels)  # (N, L, token_dim)
    recon = tensor_to_images(model.decode_tokens(tokens, grid))
    ceiling = sum(matches_scene(judge(im), s) for im, s in zip(recon, scenes))
    steps = {} if args.steps is None else {"steps": args.steps}
    # Guidance contrasts the instruction with this same prompt, so the copy runs unguided.
    copies = pipe.edit_image(images, ["Repeat this image."] * len(images), seed=0, cfg=1.0, **steps)
    copied = sum(matches_scene(judge(im), s) for im, s in zip(copies, scenes))
    print(f"copy with 'Repeat this image.': {copied}/{len(scenes)} exact (VAE reconstruction: {ceiling})")

    x_con, z_src = model.extract_visual_feature(tokens, None, grid)
    length = tokens.shape[1]
    split = len(scenes) // 2 * length
    flat_tokens = tokens.reshape(-1, tokens.shape[-1])  # (N·L, token_dim)
    # x_con keeps the MAR's buffer rows first, z_src moves them last.
    for name, grid_rows in (("x_con", x_con[:, -length:]), ("z_src", z_src[:, :length])):
        rows = grid_rows.reshape(-1, grid_rows.shape[-1])  # (N·L, dim)
        print(f"token from {name} at its own position: held-out R² {ridge_r2(rows, flat_tokens, split):.3f}")

    for cfg in (1.0, 3.0):
        outputs = pipe.edit_image(images, [e.instruction for e in edits], seed=0, cfg=cfg, **steps)
        found = [judge(im) for im in outputs]
        success = sum(edit_succeeded(e, f)[0] for e, f in zip(edits, found))
        kept = [untouched_kept(e, f) for e, f in zip(edits, found)]
        done = [edited_part_done(e, f) for e, f in zip(edits, found)]
        by_kind = " · ".join(f"{kind} {sum(d for e, d in zip(edits, done) if e.kind == kind)}"
                             for kind in dict.fromkeys(e.kind for e in edits))
        print(f"real instructions, cfg {cfg:g}: success {success}/{len(edits)}, untouched objects kept "
              f"{sum(k for k, _ in kept)}/{sum(t for _, t in kept)}, instructed change there "
              f"{sum(done)}/{len(edits)} ({by_kind})")


if __name__ == "__main__":
    main()
