"""`unipic eval inpaint`: the cases, the success rule, and the oracle end to end (perfect, then wrong on purpose)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unipic.cli import main
from unipic.eval.inpaint import INPAINT_KINDS, inpaint_eval_set, inpaint_succeeded, run_inpaint_eval
from unipic.world.judge import judge
from unipic.world.oracle import ShapesOracle
from unipic.world.render import render


def test_cases_are_reproducible_and_masks_cover_only_the_removed_object():
    cases = inpaint_eval_set(10, seed=0)
    assert [c.kind for c in cases] == ["caption"] * 10 + ["object"] * 10
    assert cases == inpaint_eval_set(10, seed=0) and cases != inpaint_eval_set(10, seed=1)
    for case in cases:
        assert len(case.source) == len(case.scene) - 1
        mask = case.mask(128)
        for j, obj in enumerate(case.scene.objects):  # no other object's box reaches into the mask
            x0, y0, x1, y1 = (v * 128 for v in obj.box)
            inside = mask[int(np.ceil(y0)):int(y1), int(np.ceil(x0)):int(x1)]
            assert inside.all() if j == case.removed else not inside.any()
    removed = cases[10].scene.objects[cases[10].removed]
    assert cases[10].prompt == f"a photo of a {removed.color} {removed.shape}"


def test_success_rule():
    from unipic.world.scene import fits

    cases = [c for c in inpaint_eval_set(30, seed=0) if len(c.scene) >= 2]
    case = cases[0]
    assert inpaint_succeeded(case, judge(render(case.scene, 128)), 128) == (True, "")
    correct, reason = inpaint_succeeded(case, judge(render(case.source, 128)), 128)
    assert not correct and "expected objects" in reason
    # The restored object drawn elsewhere (mirrored through the centre, far from its mask) fails.
    checked = 0
    for case in cases:
        obj = case.scene.objects[case.removed]
        far = obj.moved(1 - obj.cx, 1 - obj.cy)
        others = [o for j, o in enumerate(case.scene.objects) if j != case.removed]
        if fits(far, others) and abs(far.cx - obj.cx) + abs(far.cy - obj.cy) > 0.4:
            correct, reason = inpaint_succeeded(case, judge(render(case.scene.replace(case.removed, far), 128)), 128)
            assert not correct and "not where" in reason
            checked += 1
    assert checked >= 3


def test_oracle_scores_perfectly_and_corruptions_fail(tmp_path):
    summary = run_inpaint_eval(ShapesOracle(), tmp_path / "good", n_per_kind=6, progress=False)
    assert summary["overall"] == 1.0 and set(summary["kinds"]) == set(INPAINT_KINDS)
    rows = [json.loads(line) for line in (tmp_path / "good" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["correct"] for r in rows)
    assert (tmp_path / "good" / "contact_sheet.png").is_file() and summary["seconds_per_image"] > 0
    bad = run_inpaint_eval(ShapesOracle(wrong_colors=True), tmp_path / "bad", n_per_kind=6, progress=False)
    assert bad["overall"] == 0.0


def test_cli_eval_inpaint(tmp_path, capsys):
    assert main(["eval", "inpaint", "--model", "shapes-oracle", "--out", str(tmp_path), "--n-per-kind", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "caption" in out and "object" in out and "1.000" in out
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 4


@pytest.mark.parametrize("n", [1])
def test_a_real_pipeline_runs_the_eval(tiny_pipeline, tmp_path, n):
    class Fast:
        """The tiny pipeline with few steps (the eval passes no sampling options)."""

        def inpaint(self, *args, **kwargs):
            return tiny_pipeline.inpaint(*args, steps=2, head_steps=2, **kwargs)

    summary = run_inpaint_eval(Fast(), tmp_path, n_per_kind=n, size=64, progress=False)
    assert summary["n"] == 2 and summary["kinds"]["caption"]["n"] == 1
