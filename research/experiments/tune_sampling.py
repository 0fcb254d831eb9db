"""Tune a model's saved sampling settings on a development prompt set (issue 9, item 4).

Each grid point copies the model folder, rewrites the `sampling` block of its `config.json`
and runs `unipic eval t2i` (or `edit`) with a seed other than the evaluation's, so the chosen
settings are not fitted to the prompts they are scored on.

    python research/experiments/tune_sampling.py runs/shapes/pretrain/final \
        --grid '{"temperature": [1.0, 0.7], "cfg": [3.0, 6.0]}' --n 10 --seed 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run_point(model: Path, settings: dict, task: str, n: int, seed: int, work: Path) -> dict:
    """Score one grid point: a copy of `model` with `settings` merged into its sampling block."""
    name = "-".join(f"{k}{v}" for k, v in settings.items())
    folder = work / f"model-{name}"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sampling"].update(settings)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    out = work / f"eval-{name}"
    count_flag = "--n-per-category" if task == "t2i" else "--n-per-kind"
    command = [sys.executable, "-m", "unipic", "eval", task, "--out", str(out), "--model", str(folder),
               count_flag, str(n), "--seed", str(seed), "--quiet"]
    if task == "t2i":
        command += ["--images-per-prompt", "1"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    """Run the grid and print one row per point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="unipic model folder (config.json + weights)")
    parser.add_argument("--grid", required=True, help='JSON: sampling key -> list of values, e.g. {"cfg": [3, 6]}')
    parser.add_argument("--task", choices=["t2i", "edit"], default="t2i", help="what to score (default t2i)")
    parser.add_argument("--n", type=int, default=10, help="prompts per category / edits per kind (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="development seed; the evaluation uses 0 (default 1)")
    args = parser.parse_args()
    grid = json.loads(args.grid)
    keys = list(grid)
    with tempfile.TemporaryDirectory() as work_dir:
        for values in itertools.product(*(grid[k] for k in keys)):
            settings = dict(zip(keys, values))
            summary = run_point(args.model, settings, args.task, args.n, args.seed, Path(work_dir))
            scores = {tag: round(entry.get("score", entry.get("success", 0.0)), 3)
                      for tag, entry in summary.get("categories", summary.get("kinds", {})).items()
                      if isinstance(entry, dict)}
            row = {"settings": settings, "overall": summary.get("overall"), "scores": scores}
            if "no_extra_objects" in summary:
                # GenEval's rules pass clutter; these two say whether a higher score is drawing or scattering.
                row["no_extra_objects"] = summary["no_extra_objects"]["overall"]
                row["objects_per_image"] = round(summary["objects_per_image"], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
