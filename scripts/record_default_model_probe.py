"""Record the shipped default model's probe verdicts, the reference of tests/model/test_default_model.py.

    python scripts/record_default_model_probe.py

Run after `scripts/package_default_model.py` replaces the shipped weights (and only then: the
record is what the test holds the model to). Writes tests/data/default_model_probe.json atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unipic.eval.probe import probe_verdicts
from unipic.io_utils import atomic_write_json
from unipic.loading import load_pipeline

TARGET = Path(__file__).resolve().parents[1] / "tests" / "data" / "default_model_probe.json"


def main() -> int:
    torch.set_num_threads(1)  # the test runs single-threaded too, so reductions happen in the same order
    verdicts = probe_verdicts(load_pipeline("default", device="cpu"))
    atomic_write_json(TARGET, verdicts)
    for task, rows in verdicts.items():
        print(f"{task}: {sum(r['correct'] for r in rows)}/{len(rows)} correct")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
