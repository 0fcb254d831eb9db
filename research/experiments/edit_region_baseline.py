"""The losses `loss.edit_region_readout` reaches without binding the instruction to an object.

    python research/experiments/edit_region_baseline.py --seed 41 --n 2000

Over world training edits that name a source object (add excluded), on the model's 8×8 token
grid: the binary cross-entropy of the prior alone (every cell named with the base rate), and of a
predictor that knows which cells hold an object but not which object is named (each
object-covered cell named with the share the named object takes). A read-out stuck at the second
value has learnt objects, not the instruction's object.
"""

from __future__ import annotations

import argparse
import math

from unipic.world.examples import edit_example
from unipic.world.scene import covered_cells


def binary_entropy(p: float) -> float:
    """Entropy in nats of a Bernoulli(p)."""
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=41, help="world seed of the training edits")
    parser.add_argument("--n", type=int, default=2000, help="edits to draw (add edits are skipped)")
    parser.add_argument("--grid", type=int, default=8, help="token grid side")
    args = parser.parse_args()

    rows = cols = args.grid
    object_cells = named_cells = cells = 0
    for index in range(args.n):
        edit = edit_example(args.seed, index)
        if edit.index is None:
            continue
        covered = set()
        for obj in edit.source.objects:
            covered |= set(covered_cells(obj.box, rows, cols))
        object_cells += len(covered)
        named_cells += len(covered_cells(edit.source.objects[edit.index].box, rows, cols))
        cells += rows * cols
    base, share, objects = named_cells / cells, named_cells / object_cells, object_cells / cells
    print(f"prior only: {binary_entropy(base):.3f} (named cells {base:.2f} of all)")
    print(f"object vs background only: {objects * binary_entropy(share):.3f} "
          f"(object cells {objects:.2f} of all; the named object {share:.2f} of those)")


if __name__ == "__main__":
    main()
