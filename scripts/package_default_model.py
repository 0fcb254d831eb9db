"""Copy a trained model folder into the package as the embedded default model.

    python scripts/package_default_model.py runs/shapes/remix/final

Checks that the folder loads strictly and that its weights fit the 40 MB budget, then replaces
`src/unipic/assets/default_model/` (config.json, model.safetensors, tokenizer files; a run's
training-only probe files are left out). MODEL.md, the model card, is kept. Each file is written
atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from unipic.io_utils import atomic_write_bytes
from unipic.training.jobs import TRAINING_ONLY_FILES
from unipic.unipic1.checkpoint import load_model_folder

TARGET = Path(__file__).resolve().parents[1] / "src" / "unipic" / "assets" / "default_model"
BUDGET_BYTES = 40_000_000  # "40 MB at most", in decimal megabytes (the stricter reading)
KEEP = {"MODEL.md"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a unipic model folder, e.g. runs/shapes/remix/final")
    args = parser.parse_args()
    source = Path(args.folder)
    load_model_folder(source)  # strict: refuses anything that does not load
    weights = sum(p.stat().st_size for p in source.glob("model*.safetensors"))
    if weights > BUDGET_BYTES:
        print(f"weights are {weights / 1e6:.1f} MB, over the 40 MB budget", file=sys.stderr)
        return 1
    TARGET.mkdir(parents=True, exist_ok=True)
    for stale in TARGET.iterdir():
        if stale.name not in KEEP:
            stale.unlink() if stale.is_file() else shutil.rmtree(stale)
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name not in TRAINING_ONLY_FILES:  # a run's probe is not part of the model
            atomic_write_bytes(TARGET / file.name, file.read_bytes())
    print(f"packaged {source} into {TARGET} ({weights / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
