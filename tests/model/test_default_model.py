"""The shipped default model: it is in the package, loads strictly, and still draws, answers and
edits as recorded when it was packaged (tests/data/default_model_probe.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unipic.loading import default_model_folder, load_pipeline

RECORD = Path(__file__).parents[1] / "data" / "default_model_probe.json"


@pytest.fixture(scope="module")
def default_pipeline():
    return load_pipeline("default", device="cpu")


def test_default_model_is_shipped_within_budget() -> None:
    folder = default_model_folder()
    assert folder is not None, "the embedded default model is not in the package"
    for name in ("config.json", "model.safetensors", "MODEL.md"):
        assert (folder / name).is_file(), f"{name} missing from the embedded model"
    assert (folder / "model.safetensors").stat().st_size <= 40_000_000
    card = (folder / "MODEL.md").read_text()
    assert "unipic train configs/shapes/vae.yaml" in card and "ShapesEval" in card


def test_default_model_is_the_trained_shapes_model(default_pipeline) -> None:
    model = default_pipeline.model
    assert default_pipeline.config.vae.patch_size == 4
    assert default_pipeline.config.sampling.image_size == 128
    # Trained, not the random-init fallback: the world tokenizer spells a colour as one token.
    assert len(default_pipeline.tokenizer.encode(" purple", add_special_tokens=False)) == 1
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_default_model_verdicts_stay_as_recorded(default_pipeline) -> None:
    from unipic.eval.probe import probe_verdicts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when recorded: same reduction order
    try:
        got = probe_verdicts(default_pipeline)
    finally:
        torch.set_num_threads(threads)
    expected = json.loads(RECORD.read_text())
    for task in ("t2i", "i2t", "edit"):
        assert [r["correct"] for r in got[task]] == [r["correct"] for r in expected[task]], task
    assert [r["answer"] for r in got["i2t"]] == [r["answer"] for r in expected["i2t"]]
    assert [r["objects"] for r in got["t2i"]] == [r["objects"] for r in expected["t2i"]]
    assert [r["objects"] for r in got["edit"]] == [r["objects"] for r in expected["edit"]]


def test_generate_without_model_uses_the_embedded_model(tmp_path: Path) -> None:
    from PIL import Image

    from unipic.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "a photo of a red circle left of a blue star", "-o", str(out), "--seed", "0"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)  # the embedded model's own default size
    assert image.text.get("model") == "default"


def test_missing_embedded_model_is_a_clear_user_error(monkeypatch) -> None:
    import unipic.loading as loading
    from unipic.api import UserError

    monkeypatch.setattr(loading, "default_model_folder", lambda: None)
    with pytest.raises(UserError, match="embedded default model is missing"):
        loading.load_pipeline("default", device="cpu")
