"""Would editing succeed if the model regenerated only what it should? Edits with a keep mask.

    python research/experiments/masked_edit_probe.py --model default --n 40 --seed 1

Editing models here change every object, not only the named one (docs/training.md, fourteenth
session). This probe runs the edit sampler with the token cells of the untouched objects held at
the source's own tokens (visible from the first MAR step, as in inpainting) and every other cell
regenerated under the instruction, and judges the result. The kept cells are those the boxes of
the source's objects other than the named one cover, minus the named object's cells: what a
predictor that reads the source and the instruction could know. (The head also learns to free
the cells the edited object covers in the target; the oracle here does not know where that is.)
`--mask oracle` takes them from the scene; `--mask head` from the keep head of a model with `edit_keep_mask` (what its sampler
uses), and it also reports how many cells the head gets right against the oracle; `--mask none`
is the plain edit sampler, for comparison on the same edits and seeds.
"""

from __future__ import annotations

import argparse

import torch

from unipic.unipic1.sampling.edit import edit_tokens_keeping
from unipic.unipic1.sampling.prompts import images_to_tensor, tensor_to_images
from unipic.world import judge, render
from unipic.world.edits import edit_succeeded
from unipic.world.examples import edit_eval_set
from unipic.world.scene import cells_left


def oracle_keep(edit, rows: int, cols: int) -> torch.Tensor:
    """(rows·cols,) bool: cells an untouched source object's box covers and the named one's does not."""
    named = [] if edit.index is None else [edit.source.objects[edit.index].box]
    untouched = [o.box for i, o in enumerate(edit.source.objects) if i != edit.index]
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[sorted(cells_left(untouched, named, rows, cols))] = True
    return keep


@torch.no_grad()
def masked_edit(model, tokenizer, pixels: torch.Tensor, instruction: str, keep: torch.Tensor | None, *, steps: int,
                cfg: float, temperature: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One edit (pixels (1, 3, H, W)) with the `keep` cells fixed at the source's tokens (None: the
    model's keep head decides); returns (pixels, the keep mask used)."""
    grid = model.grid_for(pixels.shape[-2], pixels.shape[-1])
    source_tokens = model.encode_images(pixels)  # (1, L, token_dim)
    x_con, z_src = model.extract_visual_feature(source_tokens, None, grid)
    tokens, keep = edit_tokens_keeping(model, tokenizer, source_tokens, instruction, x_con, z_src, grid, keep=keep,
                                       steps=steps, cfg=cfg, temperature=temperature, generator=generator)
    return model.decode_tokens(tokens, grid), keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder or built-in name")
    parser.add_argument("--n", type=int, default=40, help="edits (a multiple of 5 is spread over the kinds)")
    parser.add_argument("--seed", type=int, default=1, help="edit evaluation-set seed")
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels")
    parser.add_argument("--mask", choices=("none", "oracle", "head"), nargs="+", default=["none", "oracle"],
                        help="which keep masks to run")
    parser.add_argument("--cfg", type=float, nargs="+", default=None, help="guidance scales (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="MAR steps (default: the model's)")
    args = parser.parse_args()

    from unipic.loading import load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    model = pipe.model.eval()
    sampling = model.config.sampling
    edits = edit_eval_set((args.n + 4) // 5, seed=args.seed)[: args.n]
    grid = model.grid_for(args.size, args.size)
    kinds = list(dict.fromkeys(e.kind for e in edits))
    for cfg in args.cfg or [sampling.edit_cfg]:
        for mode in args.mask:
            if mode == "head" and model.edit_keep is None:
                parser.error(f"--mask head: {args.model} has no keep head (edit_keep_mask)")
            wins = dict.fromkeys(kinds, 0)
            agree = wrongly_kept = wrongly_free = 0
            for k, edit in enumerate(edits):
                pixels = images_to_tensor([render(edit.source, args.size)], model.device)
                oracle = oracle_keep(edit, *grid)
                keep = {"oracle": oracle, "head": None}.get(mode, torch.zeros_like(oracle))
                generator = torch.Generator().manual_seed(k)
                out, used = masked_edit(model, pipe.tokenizer, pixels, edit.instruction, keep, steps=args.steps or sampling.num_iter,
                                        cfg=cfg, temperature=sampling.edit_temperature, generator=generator)
                wins[edit.kind] += edit_succeeded(edit, judge(tensor_to_images(out)[0]))[0]
                agree += int((used == oracle).sum())
                wrongly_kept += int((used & ~oracle).sum())
                wrongly_free += int((~used & oracle).sum())
            by_kind = " · ".join(f"{kind} {wins[kind]}" for kind in kinds)
            cells = len(edits) * grid[0] * grid[1]
            agreement = (f"; cells as the oracle {agree}/{cells}, kept but not the oracle's {wrongly_kept}, "
                         f"the oracle's but regenerated {wrongly_free}") if mode == "head" else ""
            print(f"cfg {cfg:g}, mask {mode}: success {sum(wins.values())}/{len(edits)} ({by_kind}){agreement}",
                  flush=True)


if __name__ == "__main__":
    main()
