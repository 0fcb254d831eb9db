"""Save/load round trips of the diffusers model_index.json layout, folder detection, Qwen lookup."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from unipic.api import UserError
from unipic.loading import load_pipeline
from unipic.unipic2 import detect_unipic2_family, is_unipic2_folder, load_unipic2_pipeline
from unipic.unipic2.adapters import KontextUnifiedPipeline, MetaQueryUnifiedPipeline
from unipic.unipic2.loading import load_kontext_pipeline, load_metaquery_pipeline, resolve_qwen_folders
from unipic.unipic2.pipeline_kontext import StableDiffusion3KontextPipeline
from unipic.unipic2.pipeline_metaquery import UniPic2MetaQueryPipeline
from unipic.unipic2.tiny import build_tiny_kontext_pipeline, build_tiny_metaquery_pipeline, random_image


def _assert_same_weights(a, b) -> None:
    for name, module in a.components.items():
        if isinstance(module, torch.nn.Module):
            other = getattr(b, name).state_dict()
            for key, tensor in module.state_dict().items():
                assert torch.equal(other[key], tensor), f"{name}.{key}"


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    # Reloaded weights are bit-identical, but BLAS may take another kernel for memory-mapped
    # tensors, so outputs can differ in the last bits (measured: 2e-6 after two steps).
    diff = np.abs(a - b).max()
    assert diff < 1e-4, f"max abs diff {diff}"


def _edit(pipe, size: int = 64) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="make it red", image=random_image(size, size, seed=2), num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_kontext_layout(kontext_folder):
    index = json.loads((kontext_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3KontextPipeline"
    assert index["transformer"] == ["unipic.unipic2.transformer_sd3_kontext", "SD3Transformer2DKontextModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    for sub in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (kontext_folder / sub).is_dir(), sub
    transformer_config = json.loads((kontext_folder / "transformer" / "config.json").read_text())
    assert transformer_config["_class_name"] == "SD3Transformer2DKontextModel"


def test_kontext_round_trip_diffusers_and_ours(kontext_folder):
    original = build_tiny_kontext_pipeline(seed=0)  # the weights save_tiny_kontext wrote
    via_diffusers = StableDiffusion3KontextPipeline.from_pretrained(kontext_folder)
    via_ours = load_kontext_pipeline(kontext_folder)
    _assert_same_weights(original, via_diffusers)
    _assert_same_weights(original, via_ours)
    expected = _edit(original)
    _assert_close(_edit(via_diffusers), expected)
    _assert_close(_edit(via_ours), expected)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(via_ours, name)("a cat").input_ids == getattr(original, name)("a cat").input_ids


def test_metaquery_round_trip_with_qwen_inside(mq_folder):
    index = json.loads((mq_folder / "model_index.json").read_text())
    assert index["_class_name"] == "UniPic2MetaQueryPipeline"
    assert index["conditioner"] == ["unipic.unipic2.conditioner", "StableDiffusion3Conditioner"]
    assert index["mllm"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    original = build_tiny_metaquery_pipeline(seed=0)
    via_diffusers = UniPic2MetaQueryPipeline.from_pretrained(mq_folder)
    via_ours = load_metaquery_pipeline(mq_folder)
    _assert_same_weights(original, via_diffusers)
    _assert_same_weights(original, via_ours)
    expected = _edit(original)
    _assert_close(_edit(via_diffusers), expected)
    _assert_close(_edit(via_ours), expected)


def test_metaquery_with_separate_qwen_folder(mq_split_folders, tmp_path):
    folder, qwen = mq_split_folders
    index = json.loads((folder / "model_index.json").read_text())
    assert index["mllm"] == [None, None]
    with pytest.raises(UserError, match="qwen_path"):
        load_metaquery_pipeline(folder)
    expected = _edit(build_tiny_metaquery_pipeline(seed=0))
    _assert_close(_edit(load_metaquery_pipeline(folder, qwen_path=qwen)), expected)
    # A "_qwen_path" key (relative to the folder) is found without arguments and ignored by diffusers.
    linked = tmp_path / "mq-linked"
    shutil.copytree(folder, linked)
    index["_qwen_path"] = os.path.relpath(qwen, linked)
    (linked / "model_index.json").write_text(json.dumps(index))
    assert resolve_qwen_folders(linked)[0].resolve() == qwen.resolve()
    assert UniPic2MetaQueryPipeline.from_pretrained(linked).mllm is None
    with pytest.raises(UserError, match="no config.json"):
        resolve_qwen_folders(linked, qwen_path=tmp_path)


def test_kontext_release_layout_without_model_index(kontext_folder, tmp_path):
    # The release folder as snapshot from the hub: component subfolders, no model_index.json.
    bare = tmp_path / "UniPic2-SD3.5M-Kontext-2B"
    shutil.copytree(kontext_folder, bare, ignore=shutil.ignore_patterns("model_index.json"))
    assert not (bare / "model_index.json").exists()
    assert detect_unipic2_family(bare) == "kontext"
    pipe = load_pipeline(str(bare), device="cpu", dtype="float32")  # the CLI's --model dispatch
    assert isinstance(pipe, KontextUnifiedPipeline)
    _assert_same_weights(load_kontext_pipeline(kontext_folder), pipe.pipeline)
    # Without the text encoders it is neither Kontext nor MetaQuery.
    shutil.rmtree(bare / "text_encoder_3")
    assert detect_unipic2_family(bare) is None
    with pytest.raises(UserError, match="text_encoder"):
        load_unipic2_pipeline(bare, device="cpu", dtype=torch.float32)


def test_folder_detection(kontext_folder, mq_folder, mq_split_folders, tmp_path):
    assert detect_unipic2_family(kontext_folder) == "kontext"
    assert detect_unipic2_family(mq_folder) == "metaquery"
    assert is_unipic2_folder(mq_split_folders[0])
    assert not is_unipic2_folder(mq_split_folders[1])  # a Qwen folder is not a UniPic-2 folder
    assert not is_unipic2_folder(tmp_path) and not is_unipic2_folder(tmp_path / "missing")
    # Upstream's bare MetaQuery layout (no model_index.json) is recognised too.
    bare = tmp_path / "bare"
    for sub in ("transformer", "conditioner", "vae", "scheduler"):
        shutil.copytree(mq_folder / sub, bare / sub)
    assert detect_unipic2_family(bare) == "metaquery"
    assert isinstance(load_pipeline(str(bare), device="cpu", dtype="float32", qwen_path=str(mq_split_folders[1])),
                      MetaQueryUnifiedPipeline)
    # Any other diffusers pipeline is not.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    assert not is_unipic2_folder(tmp_path / "other")
