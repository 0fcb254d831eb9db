"""Text-to-image evaluation through the full `eval geneval` + `eval judge` path, with the exact
oracle (scores 1.0) and corrupted oracles (fail exactly the categories they should)."""

from __future__ import annotations

import json

import pytest

from unipic.api import UnifiedPipeline, UserError
from unipic.eval.t2i import generate_geneval, judge_folder, load_metadata, run_t2i_eval, shapes_eval_metadata
from unipic.world.oracle import ShapesOracle
from unipic.world.text import TAGS

METADATA = shapes_eval_metadata(8, seed=0)


def _run(tmp_path, oracle, metadata=METADATA, images=2):
    generate_geneval(oracle, metadata, tmp_path, images_per_prompt=images, size=128, seed=0, progress=False)
    return judge_folder(tmp_path, progress=False)


def test_oracle_is_a_pipeline():
    assert isinstance(ShapesOracle(), UnifiedPipeline)


def test_oracle_scores_one_everywhere(tmp_path):
    summary = _run(tmp_path, ShapesOracle())
    assert {t: e["score"] for t, e in summary["categories"].items()} == dict.fromkeys(TAGS, 1.0)
    assert summary["overall"] == 1.0 and summary["n_images"] == len(METADATA) * 2
    assert all(e["n_prompts"] == 8 and e["n_images"] == 16 for e in summary["categories"].values())
    assert set(summary["held_out"]) >= {"score", "n", "n_prompts"}
    # GenEval's layout and our outputs.
    assert json.loads((tmp_path / "00005" / "metadata.jsonl").read_text()) == METADATA[5]
    assert (tmp_path / "00005" / "samples" / "0001.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(METADATA) * 2
    assert set(rows[0]) >= {"filename", "tag", "prompt", "correct", "objects"}
    assert rows[0]["filename"] == "00000/samples/0000.png" and rows[0]["objects"][0]["shape"]
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == 1.0


@pytest.mark.parametrize("corruption,failing", [
    ({"wrong_colors": True}, {"colors", "color_attr"}),
    ({"drop_object": True}, set(TAGS)),
    ({"mirror_positions": True}, {"position"}),
])
def test_corrupted_oracle_fails_exactly_its_categories(tmp_path, corruption, failing):
    summary = _run(tmp_path, ShapesOracle(**corruption), images=1)
    scores = {t: e["score"] for t, e in summary["categories"].items()}
    assert scores == {t: (0.0 if t in failing else 1.0) for t in TAGS}, scores


def test_held_out_slice(tmp_path):
    metadata = [r for r in shapes_eval_metadata(60, seed=0) if r["tag"] == "colors"]
    summary = _run(tmp_path, ShapesOracle(), metadata, images=1)
    assert summary["held_out"]["n_prompts"] == 8  # every held-out pair once among the 60 colors prompts
    assert summary["seen"]["n_prompts"] == 52 and summary["overall"] is None  # five categories missing


def test_generation_is_resumable(tmp_path):
    metadata = METADATA[:6]
    first = generate_geneval(ShapesOracle(), metadata, tmp_path, images_per_prompt=2, progress=False)
    sample = tmp_path / "00003" / "samples" / "0001.png"
    before = sample.read_bytes()
    sample.unlink()
    second = generate_geneval(ShapesOracle(), metadata, tmp_path, images_per_prompt=2, progress=False)
    assert first == {"generated": 6, "skipped": 0} and second == {"generated": 1, "skipped": 5}
    assert sample.read_bytes() == before  # same seed, same image
    with pytest.raises(UserError, match="fresh --out"):
        generate_geneval(ShapesOracle(), METADATA[6:12], tmp_path, images_per_prompt=2, progress=False)


def test_generation_shards_across_processes(tmp_path, monkeypatch):
    metadata = METADATA[:7]
    done = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        done.append(generate_geneval(ShapesOracle(), metadata, tmp_path, images_per_prompt=1,
                                     progress=False)["generated"])
    assert done == [3, 2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:05d}" for i in range(7)]


def test_real_geneval_prompts_are_packaged_but_not_shapes_judgeable(tmp_path):
    records = load_metadata(None)
    assert len(records) == 553 and records[0]["prompt"] == "a photo of a bench"
    generate_geneval(ShapesOracle(blank_unknown=True), records[:2], tmp_path, images_per_prompt=1, progress=False)
    with pytest.raises(UserError, match="official evaluator"):
        judge_folder(tmp_path, progress=False)


def test_bad_inputs_are_user_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "prompt": "a photo of a red circle"}\n')
    with pytest.raises(UserError, match="line 1: missing key 'include'"):
        load_metadata(bad)
    with pytest.raises(UserError, match="not found"):
        load_metadata(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no GenEval prompt folders"):
        judge_folder(tmp_path, progress=False)
    with pytest.raises(UserError, match="images-per-prompt"):
        generate_geneval(ShapesOracle(), METADATA, tmp_path, images_per_prompt=0, progress=False)


def test_eval_t2i_end_to_end(tmp_path):
    summary = run_t2i_eval(ShapesOracle(), tmp_path, n_per_category=2, images_per_prompt=1, progress=False)
    assert summary["overall"] == 1.0
    for name in ("evaluation_metadata.jsonl", "results.jsonl", "summary.json", "contact_sheet.png"):
        assert (tmp_path / name).is_file(), name


def test_clutter_passes_geneval_rules_but_not_the_no_extra_check(tmp_path):
    """GenEval accepts unrequested objects; the summary's clutter checks must see them."""
    import numpy as np

    from unipic.world.geneval import scene_for_record, single_object
    from unipic.world.render import render

    record = single_object("circle")
    for index, distractors in enumerate((0, 3)):
        scene = scene_for_record(np.random.default_rng(index), record, allow_held_out=False, distractors=distractors)
        folder = tmp_path / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        render(scene, 128).save(folder / "samples" / "0000.png")
        (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    summary = judge_folder(tmp_path, progress=False)
    assert summary["categories"]["single_object"]["score"] == 1.0  # both pass GenEval's rule
    assert summary["no_extra_objects"]["categories"]["single_object"]["score"] == 0.5  # the cluttered one does not
    assert summary["objects_per_image"] == 2.5  # (1 + 4) / 2


def test_oracle_draws_no_extra_objects(tmp_path):
    summary = _run(tmp_path, ShapesOracle(), images=1)
    assert summary["no_extra_objects"]["overall"] == 1.0
    expected = sum(sum(e["count"] for e in r["include"]) for r in METADATA) / len(METADATA)
    assert summary["objects_per_image"] == pytest.approx(expected)
