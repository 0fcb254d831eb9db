"""What the judge reads on anti-aliased renders (supersample=4) and blurred renders of each shape, by size.

    python research/experiments/judge_soft_edges.py

One object per canvas (S=128), every colour, sizes from 0.16·S to 0.28·S, centred at a few
sub-pixel offsets; prints the fraction read as the right shape (and the most common wrong reading).
"""

from __future__ import annotations

from collections import Counter

from PIL import ImageFilter

from unipic.world import judge, render
from unipic.world.scene import Scene, WorldObject
from unipic.world.spec import COLORS, SHAPES

SIZES = (0.16, 0.18, 0.20, 0.24, 0.28)
OFFSETS = (0.0, 0.3, 0.55)


def readings(shape: str, size: float, variant: str) -> Counter:
    """Judge readings of one shape at one size over colours and offsets."""
    out = Counter()
    for color in COLORS:
        for dx in OFFSETS:
            scene = Scene((WorldObject(color, shape, 0.5 + dx / 128, 0.5 + dx / 128, size),))
            if variant == "hard":
                image = render(scene, 128)
            elif variant == "aa4":
                image = render(scene, 128, supersample=4)
            else:  # a Gaussian blur of radius 0.7 px on the anti-aliased render: a soft decoder's edge
                image = render(scene, 128, supersample=4).filter(ImageFilter.GaussianBlur(0.7))
            found = judge(image)
            out[found[0].shape if len(found) == 1 else f"{len(found)} objects"] += 1
    return out


def main() -> None:
    for variant in ("hard", "aa4", "blur0.7"):
        print(f"== {variant}")
        for shape in SHAPES:
            cells = []
            for size in SIZES:
                r = readings(shape, size, variant)
                total = sum(r.values())
                wrong = [(k, v) for k, v in r.most_common() if k != shape]
                cells.append(f"{size:.2f}: {r[shape] / total:.2f}" + (f" ({wrong[0][0]})" if wrong else ""))
            print(f"{shape:9s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
