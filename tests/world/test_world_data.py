"""Datasets: the on-disk layout (export, resume, readers, validation) and the seeded streams
(determinism, sharding over processes and DataLoader workers)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from unipic.api import UserError
from unipic.data.datasets import FolderDataset, ShapesMixedStream, ShapesStream, pil_collate
from unipic.data.disk import export, read_folder
from unipic.world.examples import edit_example, t2i_example


def _rows(folder):
    return [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task,keys", [("t2i", {"image", "text"}), ("i2t", {"image", "question", "answer"}),
                                       ("edit", {"source", "instruction", "target"})])
def test_export_layout_and_reader(tmp_path, task, keys):
    out = export(task, 6, tmp_path / task, seed=2, size=64, progress=False)
    rows = _rows(out)
    assert len(rows) == 6 and all(keys <= set(r) for r in rows)
    for row in rows:
        for key in keys & {"image", "source", "target"}:
            assert (out / row[key]).is_file() and row[key].startswith("images/")
    ds = FolderDataset(out)
    assert ds.task == task and len(ds) == 6
    item = ds[3]
    image_key = "source" if task == "edit" else "image"
    assert isinstance(item[image_key], Image.Image) and item[image_key].size == (64, 64)
    # The stream yields the same example i with the same keys and content.
    streamed = ShapesStream(task, seed=2, size=64, length=6, rank=0, world_size=1).example(3)
    text_key = {"t2i": "text", "i2t": "question", "edit": "instruction"}[task]
    assert streamed[text_key] == item[text_key]
    assert streamed[image_key].tobytes() == item[image_key].tobytes()


def test_export_resumes_without_rewriting_finished_images(tmp_path):
    out = tmp_path / "edit"
    export("edit", 8, out, seed=1, size=64, progress=False)
    before = _rows(out)
    kept = out / before[2]["source"]
    stamp = kept.stat().st_mtime_ns
    os.remove(out / before[5]["target"])  # simulate an interrupted run
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in before[:3]))
    export("edit", 10, out, seed=1, size=64, progress=False)  # resume and extend
    after = _rows(out)
    assert after[:8] == before and len(after) == 10
    assert kept.stat().st_mtime_ns == stamp  # finished images are not re-rendered
    assert (out / before[5]["target"]).is_file()
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries
    assert after[9]["instruction"] == edit_example(1, 9).instruction  # example i = f(seed, i)


def test_export_refuses_a_folder_from_other_settings(tmp_path):
    export("t2i", 2, tmp_path / "x", seed=1, size=64, progress=False)
    with pytest.raises(UserError, match="seed"):
        export("t2i", 2, tmp_path / "x", seed=2, size=64, progress=False)
    with pytest.raises(UserError, match="--n"):
        export("t2i", 0, tmp_path / "y", progress=False)


def test_users_own_folder_and_clear_errors(tmp_path):
    folder = tmp_path / "mine"
    (folder / "pics").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(folder / "pics" / "a.png")
    (folder / "data.jsonl").write_text(json.dumps({"image": "pics/a.png", "question": "What color?",
                                                   "answer": "red"}) + "\n")
    assert read_folder(folder).task == "i2t"  # detected from the keys, no info.json needed
    assert FolderDataset(folder, task="i2t")[0]["answer"] == "red"
    with pytest.raises(UserError, match="line 1.*missing text"):
        read_folder(folder, task="t2i")
    (folder / "data.jsonl").write_text('{"image": "pics/missing.png", "text": "x"}\n')
    with pytest.raises(UserError, match="line 1: image 'pics/missing.png' not found"):
        read_folder(folder)
    (folder / "data.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        read_folder(folder)
    with pytest.raises(UserError, match="no data.jsonl"):
        read_folder(tmp_path)


def test_streams_shard_over_processes_and_workers():
    def indices(**kw):
        return [x["index"] for x in ShapesStream("t2i", seed=4, size=32, length=12, **kw)]

    shards = [indices(rank=r, world_size=3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(12)) and all(len(s) == 4 for s in shards)
    loader = DataLoader(ShapesStream("t2i", seed=4, size=32, length=12, rank=1, world_size=2), batch_size=None,
                        num_workers=2)
    assert sorted(x["index"] for x in loader) == [1, 3, 5, 7, 9, 11]
    first = next(iter(ShapesStream("t2i", seed=4, size=32, rank=0, world_size=1)))
    assert first["text"] == t2i_example(4, 0).text


def test_mixed_stream_weights_and_collate():
    stream = ShapesMixedStream({"t2i": 3, "edit": 1}, seed=0, size=32, length=400, rank=0, world_size=1)
    tasks = [stream.task_of(i) for i in range(400)]
    assert set(tasks) == {"t2i", "edit"} and 0.65 < tasks.count("t2i") / 400 < 0.85
    batch = pil_collate([stream.example(i) for i in range(4)])
    assert len(batch["task"]) == 4
    with pytest.raises(ValueError, match="weights"):
        ShapesMixedStream({"video": 1})
