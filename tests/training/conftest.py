"""Shared settings for the training tests: every stage shrunk to the tiny preset at 64 px."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Turns any run file into a few-second run of the tiny preset (4x4 token grid, byte tokenizer).
TINY = [
    "model.init_from=unipic1-tiny",
    "model.init_vae_from=null",
    "model.tokenizer=auto",
    "data.source=world",
    "data.image_size=64",
    "data.batch_size=2",
    "train.max_steps=3",
    "train.checkpoint_every=0",
    "train.num_threads=2",
    "optim.lr=1e-3",
    "optim.warmup_ratio=0",
    "log.progress=false",
    "log.every=1",
    "log.plot_every=0",
    "log.sample_every=0",
    "log.eval_every=0",
]


@pytest.fixture()
def tiny(tmp_path):
    """`tiny(path_or_None, *overrides)` → a validated TrainConfig writing under tmp_path."""
    from unipic.training.config import load_config

    def make(path, *overrides, out="run"):
        return load_config(path, [*TINY, f"out_dir={tmp_path / out}", *overrides])

    return make
