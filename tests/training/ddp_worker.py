"""Launched by test_distributed.py under `accelerate launch`: train, then record this replica's weights digest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from unipic.training.config import load_config
from unipic.training.trainer import train

if __name__ == "__main__":
    config = load_config(sys.argv[1], sys.argv[2:])
    result = train(config)
    rank = os.environ.get("RANK", "0")
    (Path(config.out_dir) / f"digest-rank{rank}.txt").write_text(f"{result.step} {result.weights_digest}\n")
