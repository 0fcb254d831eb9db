"""Editing evaluation on the Shapes world (`unipic eval edit`).

`n_per_kind` edits of each kind (recolor, remove, add, replace, move) on evaluation scenes (all
60 color–shape pairs). The model edits the rendered source; the Shapes judge reads its output
and docs/world.md's success rule decides (`unipic.world.edits.edit_succeeded`). Writes:

    DIR/images/<i:05d>_source.png, <i:05d>_output.png, <i:05d>_expected.png
    DIR/results.jsonl        one line per edit: kind, instruction, correct, reason, objects found
    DIR/summary.json         success per kind, overall = mean of the five, held-out slice
    DIR/contact_sheet.png    source | output | expected, instruction and verdict
"""

from __future__ import annotations

import logging
from pathlib import Path

from unipic.api import UserError
from unipic.eval.contact_sheet import Tile, contact_sheet
from unipic.eval.report import announce_plan, kinds_table, output_folder, summarize_kinds
from unipic.io_utils import atomic_write_json, atomic_write_jsonl, save_image_atomic
from unipic.world.edits import edit_has_held_out, edit_succeeded
from unipic.world.examples import edit_eval_set
from unipic.world.judge import judge
from unipic.world.render import render
from unipic.world.spec import EDIT_KINDS, MIN_EVAL_SIZE

logger = logging.getLogger(__name__)


def run_edit_eval(pipeline, out_dir: str | Path, n_per_kind: int = 20, size: int = 128, seed: int = 0,
                  batch_size: int = 8, progress: bool = True) -> dict:
    """Have `pipeline` perform the ShapesEval edits and judge the results (see module docstring)."""
    from tqdm.auto import tqdm

    for value, name, minimum in ((n_per_kind, "--n-per-kind", 1), (size, "--size", 16), (batch_size, "--batch-size", 1)):
        if not isinstance(value, int) or value < minimum:
            raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    out = output_folder(out_dir)
    if size < MIN_EVAL_SIZE:
        logger.warning("--size %d < %d: the Shapes judge is only exact at S >= %d", size, MIN_EVAL_SIZE, MIN_EVAL_SIZE)
    edits = edit_eval_set(n_per_kind, seed)
    sources = [render(e.source, size) for e in edits]
    outputs = []
    announce_plan("edit eval", len(edits), noun="edited images to draw", progress=progress)
    with tqdm(total=len(edits), desc="edits", unit="image", disable=not progress) as bar:
        for start in range(0, len(edits), batch_size):
            batch = edits[start : start + batch_size]
            outputs += pipeline.edit_image(sources[start : start + batch_size], [e.instruction for e in batch],
                                           height=size, width=size, seed=seed)
            bar.update(len(batch))
    rows, tiles = [], []
    for i, (edit, source, output) in enumerate(zip(edits, sources, outputs)):
        output = output.convert("RGB")
        expected = render(edit.target, size)
        if output.width != output.height:
            found, (correct, reason) = [], (False, f"output is {output.width}x{output.height}, not square")
        else:
            found = judge(output)
            correct, reason = edit_succeeded(edit, found)
        names = {k: f"images/{i:05d}_{k}.png" for k in ("source", "output", "expected")}
        for key, image in (("source", source), ("output", output), ("expected", expected)):
            save_image_atomic(image, out / names[key], {"instruction": edit.instruction})
        rows.append({"index": i, "kind": edit.kind, "instruction": edit.instruction, **names, "correct": correct,
                     "reason": reason, "held_out": edit_has_held_out(edit),
                     "objects": [d.to_dict() for d in found], "edit": edit.to_dict()})
        tiles.append(Tile([source, output, expected], [edit.instruction, reason or "source | output | expected"],
                          correct))
    summary = summarize_edit(rows)
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    save_image_atomic(contact_sheet(tiles[:150]), out / "contact_sheet.png")
    return summary


def summarize_edit(rows: list[dict]) -> dict:
    """Success per edit kind, overall = mean of the five, held-out / seen slices."""
    return summarize_kinds(rows, "ShapesEval editing", EDIT_KINDS)


def edit_table(summary: dict) -> str:
    """The printed table of `summarize_edit`'s result."""
    return kinds_table(summary, "editing (success rate)", EDIT_KINDS)
