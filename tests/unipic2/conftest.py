"""Fixtures for the UniPic-2 tests: tiny random pipelines and folders, built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("diffusers")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference_tiny_config() -> dict:
    """The tiny configuration shipped with the spec (copied into tests/unipic2/data)."""
    return json.loads((DATA / "unipic2_tiny_config.json").read_text())


@pytest.fixture(scope="session")
def kontext_pipe():
    """A tiny random StableDiffusion3KontextPipeline (float32, CPU)."""
    from unipic.unipic2.tiny import build_tiny_kontext_pipeline

    return build_tiny_kontext_pipeline(seed=0)


@pytest.fixture(scope="session")
def mq_pipe():
    """A tiny random UniPic2MetaQueryPipeline with its tiny Qwen2.5-VL."""
    from unipic.unipic2.tiny import build_tiny_metaquery_pipeline

    return build_tiny_metaquery_pipeline(seed=0)


@pytest.fixture(scope="session")
def kontext_folder(tmp_path_factory) -> Path:
    from unipic.unipic2.tiny import save_tiny_kontext

    return save_tiny_kontext(tmp_path_factory.mktemp("unipic2") / "kontext-tiny")


@pytest.fixture(scope="session")
def mq_folder(tmp_path_factory) -> Path:
    """A MetaQuery folder with Qwen saved inside (mllm/, mllm_tokenizer/, mllm_image_processor/)."""
    from unipic.unipic2.tiny import save_tiny_metaquery

    return save_tiny_metaquery(tmp_path_factory.mktemp("unipic2") / "mq-tiny")


@pytest.fixture(scope="session")
def mq_split_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(MetaQuery folder without Qwen, stand-alone Qwen folder)."""
    from unipic.unipic2.tiny import save_tiny_metaquery

    root = tmp_path_factory.mktemp("unipic2")
    folder = save_tiny_metaquery(root / "mq-noqwen", qwen_folder=root / "qwen-tiny")
    return folder, root / "qwen-tiny"

