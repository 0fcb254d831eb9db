"""Shared settings for the training tests: every stage shrunk to the tiny preset at 64 px."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_overrides import TINY

CONFIGS = Path(__file__).resolve().parents[2] / "configs"



@pytest.fixture()
def tiny(tmp_path):
    """`tiny(path_or_None, *overrides)` → a validated TrainConfig writing under tmp_path."""
    from unipic.training.config import load_config

    def make(path, *overrides, out="run"):
        return load_config(path, [*TINY, f"out_dir={tmp_path / out}", *overrides])

    return make
