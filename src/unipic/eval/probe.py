"""A small fixed probe of a Shapes-world model: judged verdicts item by item.

`probe_verdicts` draws one ShapesEval prompt per GenEval category, asks one question of each
understanding kind and performs one edit of each kind (fixed seed, S=128), and returns what the
judge made of each. The shipped default model's verdicts are recorded in
`tests/data/default_model_probe.json` (by `scripts/record_default_model_probe.py`) and a test
checks that they stay as recorded, so any change that alters what the model draws, answers or
edits is seen.
"""

from __future__ import annotations

from collections.abc import Sequence

from unipic.world.edits import edit_succeeded
from unipic.world.examples import edit_eval_set, i2t_eval_set
from unipic.world.geneval import evaluate_record, shapes_eval_metadata
from unipic.world.judge import judge
from unipic.world.questions import score_answer
from unipic.world.render import render


def _pairs(found) -> list[list[str]]:
    """The judge's objects as a sorted list of [color, shape] (positions left out: they are checked by the verdict)."""
    return sorted(list(d.pair) for d in found)


def probe_verdicts(pipeline, per_kind: int = 1, size: int = 128, seed: int = 0,
                   tasks: Sequence[str] = ("t2i", "i2t", "edit"), **options) -> dict[str, list[dict]]:
    """Per-item outcomes: t2i prompt → objects and verdict; question → answer and verdict; edit → objects and verdict.

    `per_kind` items of each GenEval category / question kind / edit kind; `options` (num_iter,
    head_steps, cfg) go to the image samplers.
    """
    verdicts: dict[str, list[dict]] = {}
    if "t2i" in tasks:
        records = shapes_eval_metadata(per_kind, seed)
        images = pipeline.text_to_image([r["prompt"] for r in records], height=size, width=size, seed=seed,
                                        **options)
        verdicts["t2i"] = []
        for record, per_prompt in zip(records, images):
            found = judge(per_prompt[0])
            verdicts["t2i"].append({"prompt": record["prompt"], "objects": _pairs(found),
                                    "correct": bool(evaluate_record(record, found)[0])})
    if "i2t" in tasks:
        items = i2t_eval_set(per_kind, seed)
        answers = pipeline.image_to_text([render(x.scene, size) for x in items],
                                         [x.question.question for x in items])
        verdicts["i2t"] = [{"question": x.question.question, "answer": answer,
                            "correct": bool(score_answer(x.question, answer)["correct"])}
                           for x, answer in zip(items, answers)]
    if "edit" in tasks:
        edits = edit_eval_set(per_kind, seed)
        outputs = pipeline.edit_image([render(e.source, size) for e in edits], [e.instruction for e in edits],
                                      height=size, width=size, seed=seed, **options)
        verdicts["edit"] = []
        for case, output in zip(edits, outputs):
            found = judge(output)
            verdicts["edit"].append({"instruction": case.instruction, "objects": _pairs(found),
                                     "correct": bool(edit_succeeded(case, found)[0])})
    return verdicts
