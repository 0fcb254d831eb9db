"""Inpainting evaluation on the Shapes world (`unipic eval inpaint`).

A case takes an evaluation scene (1 to 4 objects, all 60 color–shape pairs), removes one object
from its render and masks that object's box plus a margin of `MASK_MARGIN`*S (half the world's
gap between boxes, so a mask never reaches another object's box). The model inpaints the mask
from one of two prompts, the case kinds:

- `caption`: the full scene's canonical caption (`a red circle, a blue star and a white cross`);
- `object`: the removed object alone, `a photo of a {color} {shape}`.

The Shapes judge reads the output. A case succeeds when the objects it finds are the original
scene's (same multiset of color–shape pairs), every object outside the mask is within
`EDIT_TOL`*S of its old centre, and the restored object's centre lies inside the mask's box.
Writes:

    DIR/images/<i:05d>_source.png, _mask.png, _output.png, _expected.png
    DIR/results.jsonl        one line per case: kind, prompt, correct, reason, objects found
    DIR/summary.json         success per kind, overall = mean of the two, seconds per image
    DIR/contact_sheet.png    source | mask | output | expected, prompt and verdict
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unipic.api import UnsupportedTaskError, UserError
from unipic.eval.contact_sheet import Tile, contact_sheet
from unipic.eval.report import announce_plan, kinds_table, output_folder, summarize_kinds
from unipic.io_utils import atomic_write_json, atomic_write_jsonl, save_image_atomic
from unipic.world.edits import visual_centre
from unipic.world.judge import judge, perfect_matching
from unipic.world.render import render
from unipic.world.scene import Scene, rng_for, sample_scene
from unipic.world.spec import EDIT_TOL, HELD_OUT, MIN_EVAL_SIZE
from unipic.world.text import canonical_caption, prompt_colors

logger = logging.getLogger(__name__)

INPAINT_KINDS = ("caption", "object")
MASK_MARGIN = 0.015  # mask = removed box + this much of S on every side (half the world's GAP)
_INPAINT_KEY = 1004  # generator key of the inpainting cases (disjoint from the other tasks' streams)


@dataclass(frozen=True)
class InpaintCase:
    """One case: the full scene, which object is removed and masked, and the prompt kind."""

    kind: str
    scene: Scene
    removed: int

    @property
    def source(self) -> Scene:
        """The scene the model sees: the original without the removed object."""
        return self.scene.replace(self.removed, None)

    @property
    def prompt(self) -> str:
        """The full caption (`caption`) or the removed object (`object`)."""
        if self.kind == "caption":
            return canonical_caption(self.scene)
        obj = self.scene.objects[self.removed]
        return prompt_colors(obj.color, obj.shape)

    def mask_box(self, size: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), x1/y1 exclusive: the removed object's box plus the margin."""
        x0, y0, x1, y1 = self.scene.objects[self.removed].box
        m = MASK_MARGIN
        return (max(0, math.floor((x0 - m) * size)), max(0, math.floor((y0 - m) * size)),
                min(size, math.ceil((x1 + m) * size)), min(size, math.ceil((y1 + m) * size)))

    def mask(self, size: int) -> np.ndarray:
        """The bool (size, size) mask, True inside `mask_box`."""
        x0, y0, x1, y1 = self.mask_box(size)
        mask = np.zeros((size, size), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return mask

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scene": self.scene.to_dict(), "removed": self.removed}


def inpaint_case(seed: int, index: int, kind: str) -> InpaintCase:
    """Case `index` of the stream `seed`: a random evaluation scene and one of its objects, uniform."""
    if kind not in INPAINT_KINDS:
        raise ValueError(f"unknown inpainting case kind {kind!r}; expected one of {', '.join(INPAINT_KINDS)}")
    rng = rng_for(seed, _INPAINT_KEY, index)
    scene = sample_scene(rng, allow_held_out=True)
    return InpaintCase(kind, scene, int(rng.integers(len(scene))))


def inpaint_eval_set(n_per_kind: int, seed: int = 0) -> list[InpaintCase]:
    """`n_per_kind` cases of each kind; case j of every kind shares its scene and removed object."""
    return [inpaint_case(seed, j, kind) for kind in INPAINT_KINDS for j in range(n_per_kind)]


def inpaint_succeeded(case: InpaintCase, found: list, size: int) -> tuple[bool, str]:
    """The module docstring's rule for the judge's objects `found` in the inpainted image."""
    expected = case.scene.objects
    x0, y0, x1, y1 = (v / size for v in case.mask_box(size))
    if sorted(o.pair for o in expected) != sorted(f.pair for f in found):
        want = ", ".join(f"{c} {s}" for c, s in sorted(o.pair for o in expected))
        got = ", ".join(f"{c} {s}" for c, s in sorted(f.pair for f in found))
        return False, f"expected objects [{want}], found [{got}]"

    def ok(i: int, j: int) -> bool:
        e, f = expected[i], found[j]
        if e.pair != f.pair:
            return False
        if i == case.removed:
            return x0 <= f.cx <= x1 and y0 <= f.cy <= y1
        ex, ey = visual_centre(e)
        return math.hypot(f.cx - ex, f.cy - ey) <= EDIT_TOL

    if perfect_matching(len(expected), len(found), ok) is None:
        return False, "the objects are not where they were (or the restored one is outside the mask)"
    return True, ""


def run_inpaint_eval(pipeline, out_dir: str | Path, n_per_kind: int = 50, size: int = 128, seed: int = 0,
                     batch_size: int = 8, progress: bool = True) -> dict:
    """Have `pipeline` inpaint the ShapesEval cases and judge the results (see module docstring)."""
    from tqdm.auto import tqdm

    for value, name, minimum in ((n_per_kind, "--n-per-kind", 1), (size, "--size", 16), (batch_size, "--batch-size", 1)):
        if not isinstance(value, int) or value < minimum:
            raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not callable(getattr(pipeline, "inpaint", None)):  # duck-typed: tests wrap pipelines
        raise UnsupportedTaskError(f"this model ({type(pipeline).__name__}) cannot inpaint")
    out = output_folder(out_dir)
    if size < MIN_EVAL_SIZE:
        logger.warning("--size %d < %d: the Shapes judge is only exact at S >= %d", size, MIN_EVAL_SIZE, MIN_EVAL_SIZE)
    cases = inpaint_eval_set(n_per_kind, seed)
    sources = [render(c.source, size) for c in cases]
    masks = [c.mask(size) for c in cases]
    outputs: list[Image.Image] = []
    announce_plan("inpaint eval", len(cases), noun="images to inpaint", progress=progress)
    started = time.perf_counter()
    with tqdm(total=len(cases), desc="inpainting", unit="image", disable=not progress) as bar:
        for start in range(0, len(cases), batch_size):
            stop = min(start + batch_size, len(cases))
            # One seed per case, so a case's result does not depend on the batch it shares.
            outputs += pipeline.inpaint(sources[start:stop], masks[start:stop], [c.prompt for c in cases[start:stop]],
                                        seed=[seed + i for i in range(start, stop)])
            bar.update(stop - start)
    seconds = time.perf_counter() - started
    rows, tiles = [], []
    for i, (case, source, mask, output) in enumerate(zip(cases, sources, masks, outputs)):
        output = output.convert("RGB")
        found = judge(output)
        correct, reason = inpaint_succeeded(case, found, size)
        expected = render(case.scene, size)
        mask_image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        names = {k: f"images/{i:05d}_{k}.png" for k in ("source", "mask", "output", "expected")}
        for key, image in (("source", source), ("mask", mask_image), ("output", output), ("expected", expected)):
            save_image_atomic(image, out / names[key], {"prompt": case.prompt})
        rows.append({"index": i, "kind": case.kind, "prompt": case.prompt, **names, "correct": correct,
                     "reason": reason, "mask_box": list(case.mask_box(size)),
                     "held_out": any(p in HELD_OUT for p in case.scene.pairs),
                     "objects": [d.to_dict() for d in found], "case": case.to_dict()})
        tiles.append(Tile([source, mask_image.convert("RGB"), output, expected],
                          [case.prompt, reason or "source | mask | output | expected"], correct))
    summary = summarize_inpaint(rows)
    summary["seconds_per_image"] = seconds / len(cases)
    summary["size"] = size
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    save_image_atomic(contact_sheet(tiles[:150]), out / "contact_sheet.png")
    return summary


def summarize_inpaint(rows: list[dict]) -> dict:
    """Success per case kind, their mean, and the held-out / seen slices."""
    return summarize_kinds(rows, "ShapesEval inpainting", INPAINT_KINDS)


def inpaint_table(summary: dict) -> str:
    """The printed table of `summarize_inpaint`'s result."""
    text = kinds_table(summary, "inpainting (success rate)", INPAINT_KINDS)
    if summary.get("seconds_per_image") is not None:
        text += f"\n{summary['seconds_per_image']:.3f} s per inpainted image"
    return text
