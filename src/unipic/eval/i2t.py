"""Image-to-text evaluation on the Shapes world (`unipic eval i2t`).

`n_per_kind` questions of each kind (caption, count, color, shape, relation) about evaluation
scenes (all 60 color–shape pairs), asked of the model in batches. Writes:

    DIR/images/<i:05d>.png   the question images
    DIR/results.jsonl        one line per question: kind, question, answer, prediction, correct
                             (captions also: multiset, strict), held_out
    DIR/summary.json         accuracy per kind, caption multiset and strict scores,
                             overall = mean of the five kinds (captions by multiset),
                             held-out slice (scenes holding a held-out pair)
    DIR/contact_sheet.png    image, question, expected and predicted answers, verdict
"""

from __future__ import annotations

from pathlib import Path

from unipic.api import UserError
from unipic.eval.contact_sheet import Tile, contact_sheet
from unipic.eval.report import announce_plan, by_group, format_table, mean_of, output_folder, score
from unipic.io_utils import atomic_write_json, atomic_write_jsonl, save_image_atomic
from unipic.world.examples import i2t_eval_set
from unipic.world.questions import QUESTION_KINDS, score_answer
from unipic.world.render import render


def _check(n: int, name: str, minimum: int = 1) -> None:
    if not isinstance(n, int) or n < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {n!r}")


def run_i2t_eval(pipeline, out_dir: str | Path, n_per_kind: int = 50, size: int = 128, seed: int = 0,
                 batch_size: int = 16, progress: bool = True) -> dict:
    """Ask `pipeline` the ShapesEval questions and score the answers (see module docstring)."""
    from tqdm.auto import tqdm

    _check(n_per_kind, "--n-per-kind")
    _check(size, "--size", 16)
    _check(batch_size, "--batch-size")
    out = output_folder(out_dir)
    examples = i2t_eval_set(n_per_kind, seed)
    images = [render(e.scene, size) for e in examples]
    predictions: list[str] = []
    announce_plan("i2t eval", len(examples), noun="questions to answer", progress=progress)
    with tqdm(total=len(examples), desc="questions", unit="answer", disable=not progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            answers = pipeline.image_to_text(images[start : start + batch_size],
                                             [e.question.question for e in batch], seed=seed)
            predictions += [str(a) for a in answers]
            bar.update(len(batch))
    rows = []
    for i, (example, image, prediction) in enumerate(zip(examples, images, predictions)):
        name = f"images/{i:05d}.png"
        save_image_atomic(image, out / name, {"question": example.question.question})
        q = example.question
        rows.append({"index": i, "image": name, "kind": q.kind, "question": q.question, "answer": q.answer,
                     "prediction": prediction, **score_answer(q, prediction),
                     "held_out": example.scene.has_held_out(), "scene": example.scene.to_dict()})
    summary = summarize_i2t(rows)
    atomic_write_jsonl(out / "results.jsonl", rows)
    atomic_write_json(out / "summary.json", summary)
    tiles = [Tile([img], [r["question"], f"expected: {r['answer']}", f"got: {r['prediction']}"], r["correct"])
             for img, r in zip(images, rows)]
    save_image_atomic(contact_sheet(tiles[:240], text_lines=5), out / "contact_sheet.png")
    return summary


def summarize_i2t(rows: list[dict]) -> dict:
    kinds = by_group(rows, lambda r: r["kind"], QUESTION_KINDS)
    captions = [r for r in rows if r["kind"] == "caption"]
    return {
        "benchmark": "ShapesEval image to text",
        "overall": mean_of(kinds, QUESTION_KINDS),
        "kinds": kinds,
        "caption_multiset": score(captions, "multiset")["score"] if captions else None,
        "caption_strict": score(captions, "strict")["score"] if captions else None,
        "held_out": score([r for r in rows if r["held_out"]]),
        "seen": score([r for r in rows if not r["held_out"]]),
        "n": len(rows),
    }


def i2t_table(summary: dict) -> str:
    entries = [(kind, e["score"], e["n"]) for kind, e in summary["kinds"].items()]
    entries += [("caption (strict order)", summary["caption_strict"], None),
                ("overall (mean of 5)", summary["overall"], None),
                ("held-out pairs", summary["held_out"]["score"], summary["held_out"]["n"]),
                ("seen pairs", summary["seen"]["score"], summary["seen"]["n"])]
    return format_table("image to text (accuracy)", entries)
