"""Fixtures for the UniPic-3 tests: a tiny random pipeline and folder, built once per session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("diffusers")


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random UniPic3Pipeline (float32, CPU)."""
    from unipic.unipic3.tiny import build_tiny_unipic3_pipeline

    return build_tiny_unipic3_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny UniPic-3 folder in the diffusers layout, as `save_pretrained` writes it."""
    from unipic.unipic3.tiny import save_tiny_unipic3

    return save_tiny_unipic3(tmp_path_factory.mktemp("unipic3") / "tiny")


@pytest.fixture(scope="session")
def images_of():
    """A function: random RGB images of the given (width, height) sizes."""
    from unipic.unipic2.tiny import random_image

    def make(sizes: list[tuple[int, int]], seed: int = 0):
        return [random_image(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)]

    return make


def _transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def _ema_subfolder(tiny_folder: Path, target: Path, shift: float = 0.5) -> dict[str, torch.Tensor]:
    """target/ema_transformer/ as the DMD release ships it: config.json + a pickled .bin (weights + shift)."""
    state = {k: v + shift for k, v in _transformer_state(tiny_folder).items()}
    (target / "ema_transformer").mkdir(parents=True)
    shutil.copyfile(tiny_folder / "transformer" / "config.json", target / "ema_transformer" / "config.json")
    torch.save(state, target / "ema_transformer" / "diffusion_pytorch_model.bin")
    return state


@pytest.fixture(scope="session")
def layouts(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The three release layouts built from the tiny folder: base, DMD (pickled EMA .bin), CM (transformers only)."""
    root = tmp_path_factory.mktemp("layouts")
    base = root / "base"  # Skywork/Unipic3: a Qwen-Image-Edit diffusers folder
    shutil.copytree(tiny_folder, base)
    (base / "unipic3.json").unlink()
    index = json.loads((base / "model_index.json").read_text())
    index["_class_name"] = "QwenImageEditPipeline"
    (base / "model_index.json").write_text(json.dumps(index))
    dmd = root / "dmd"  # Skywork/Unipic3-DMD: transformer/ + ema_transformer/ (.bin) + components, no scheduler
    shutil.copytree(tiny_folder / "transformer", dmd / "transformer")
    for name in ("vae", "text_encoder", "tokenizer", "processor"):
        shutil.copytree(tiny_folder / name, dmd / name)
    _ema_subfolder(tiny_folder, dmd)
    cm = root / "cm"  # Skywork/Unipic3-Consistency-Model: transformer/ + ema_transformer/ only
    shutil.copytree(tiny_folder / "transformer", cm / "transformer")
    _ema_subfolder(tiny_folder, cm, shift=0.25)
    return {"base": base, "dmd": dmd, "cm": cm, "root": root}


@pytest.fixture(scope="session")
def tiny_transformer_state(tiny_folder) -> dict[str, torch.Tensor]:
    """The tiny folder's transformer weights (the reference the layouts' transformers are checked against)."""
    return _transformer_state(tiny_folder)
