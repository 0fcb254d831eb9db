"""Fixtures for the UniPic-3 tests: a tiny random pipeline and folder, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
