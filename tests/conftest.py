"""Shared fixtures: tiny random UniPic-1 models built once per session (seconds, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    """An untrained tiny-preset model (fixed seed) and the toy byte tokenizer."""
    from unipic.loading import tiny_random_model

    torch.set_num_threads(2)
    return tiny_random_model(seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_and_tokenizer):
    """A `UniPicPipeline` over the tiny model."""
    from unipic.unipic1.pipeline import UniPicPipeline

    model, tokenizer = tiny_model_and_tokenizer
    return UniPicPipeline(model, tokenizer)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tiny_model_and_tokenizer):
    """The tiny model saved as a unipic model folder."""
    from unipic.unipic1.checkpoint import save_model_folder

    model, tokenizer = tiny_model_and_tokenizer
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model_folder(model, tokenizer, folder)
    return folder
