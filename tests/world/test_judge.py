"""The Shapes judge against WORLD.md: exact on ground-truth renders, robust to noise, and each
rule (background threshold, noise components, IoU floor, 8-connectivity) doing what it says."""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unipic.world.judge import judge, matches_scene, shape_ious
from unipic.world.render import render
from unipic.world.scene import LATTICE, Scene, WorldObject, rng_for, sample_scene
from unipic.world.spec import BACKGROUND, COLOR_NAMES, COLORS, MAX_BOX, MIN_BOX, SHAPES

N_SCENES = 500


def _jpeg(image: Image.Image, **kwargs) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75, **kwargs)
    return Image.open(buffer).convert("RGB")


def _noisy(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
    array = np.asarray(image).astype(np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _same_colors_and_count(found, scene: Scene) -> bool:
    return Counter(d.color for d in found) == Counter(o.color for o in scene.objects)


# 256 px judges the same 500 scenes again (12 s of the default tier): the slow tier runs it.
@pytest.fixture(scope="module", params=[128, pytest.param(256, marks=pytest.mark.slow)], ids=["S128", "S256"])
def judged(request):
    """Judge 500 random evaluation scenes (all 60 pairs) clean, noisy and JPEG'd at size S."""
    size = request.param
    stats = Counter()
    for i in range(N_SCENES):
        rng = rng_for(7, size, i)
        scene = sample_scene(rng, allow_held_out=True)
        image = render(scene, size)
        stats["clean"] += matches_scene(judge(image), scene)
        stats["noise"] += matches_scene(judge(_noisy(image, rng)), scene)
        found = judge(_jpeg(image))  # PIL's defaults at quality 75 (4:2:0 chroma subsampling)
        stats["jpeg"] += matches_scene(found, scene)
        stats["jpeg_colors_counts"] += _same_colors_and_count(found, scene)
    return size, {k: v / N_SCENES for k, v in stats.items()}


def test_exact_on_clean_renders(judged):
    size, rates = judged
    assert rates["clean"] == 1.0, f"S={size}: {rates}"


def test_robust_to_gaussian_noise(judged):
    size, rates = judged
    assert rates["noise"] >= 0.99, f"S={size}: {rates}"


def test_jpeg_keeps_colors_and_counts(judged):
    # Even where JPEG erodes a shape, the judge still sees every object in its color.
    size, rates = judged
    assert rates["jpeg_colors_counts"] >= 0.99, f"S={size}: {rates}"


def test_jpeg_quality_75(judged):
    size, rates = judged
    if size == 128:
        # Measured: 0.94 with PIL's 4:2:0 default (0.77 under the old unit-box rule of step 3).
        # JPEG q75 wipes the chroma of 1-2 px star tips and rings stray pixels onto box edges,
        # which still costs a few small shapes. Kept as a regression floor; see
        # test_jpeg_at_128_meets_issue_bar.
        assert rates["jpeg"] >= 0.93, f"S={size}: {rates}"
    else:
        assert rates["jpeg"] >= 0.99, f"S={size}: {rates}"


@pytest.mark.xfail(strict=True, reason="WORLD.md's judge cannot read small stars through JPEG q75 at S=128 "
                                       "(see test_jpeg_quality_75); the issue asked for >= 99%")
def test_jpeg_at_128_meets_issue_bar():
    hits = 0
    for i in range(200):
        rng = rng_for(7, 128, i)
        scene = sample_scene(rng, allow_held_out=True)
        hits += matches_scene(judge(_jpeg(render(scene, 128))), scene)
    assert hits / 200 >= 0.99


@pytest.mark.parametrize("size", [128, 256])
def test_every_lattice_object_is_read_with_margin(size):
    """Every (shape, side, color) the generators can draw is read exactly at S=128 and 256, and its
    shape wins by an IoU margin (renders on the lattice are translation invariant, so this is all
    of them)."""
    worst = {}
    for shape in SHAPES:
        for k in range(math.ceil(MIN_BOX * LATTICE), math.floor(MAX_BOX * LATTICE) + 1):
            # Hard-edged renders are the same pixels in any color: every color at S=128, one
            # (rotating) color per shape and side at S=256.
            for color in COLOR_NAMES if size == 128 else COLOR_NAMES[k % 10 : k % 10 + 1]:
                side = k / LATTICE
                corner = 40 / LATTICE  # on the lattice
                obj = WorldObject(color, shape, corner + side / 2, corner + side / 2, side)
                array = np.asarray(render(Scene((obj,)), size))
                mask = np.any(array != BACKGROUND, axis=2)
                rows, cols = np.nonzero(mask)
                component = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                found = judge(array)
                assert [d.pair for d in found] == [obj.pair], (shape, k, color, found)
                # IoU margin of the right shape over the runner-up.
                ious = shape_ious(component, rows.min(), cols.min())
                right = SHAPES.index(shape)
                worst[shape] = min(worst.get(shape, 1.0), ious[right] - np.delete(ious, right).max())
    assert min(worst.values()) >= 0.05, worst


# ---------------------------------------------------------------------------------------------
# The individual rules
# ---------------------------------------------------------------------------------------------


def _canvas(size=128):
    return np.full((size, size, 3), BACKGROUND, dtype=np.uint8)


def test_background_threshold_is_inclusive_at_40():
    near = _canvas()
    near[40:80, 40:80] = (128 + 40, 128, 128)  # distance exactly 40: background
    assert judge(near) == []
    far = _canvas()
    far[40:80, 40:80] = (128 + 41, 128, 128)  # distance 41: a colored pixel (pink is nearest)
    found = judge(far)
    assert [(d.shape, d.color) for d in found] == [("square", "pink")]


def test_small_components_are_noise():
    size = 128
    assert 100 < (0.08 * size) ** 2 < 121  # the limit is 104.86 px at S = 128
    small = _canvas(size)
    small[10:20, 10:20] = COLORS["red"]  # a 100 px square: below the limit
    assert judge(small) == []
    big = _canvas(size)
    big[10:21, 10:21] = COLORS["red"]  # a 121 px square: kept
    assert [d.pair for d in judge(big)] == [("red", "square")]


def test_low_iou_components_are_not_objects():
    ring = _canvas()
    ring[30:70, 30:70] = COLORS["blue"]
    ring[33:67, 33:67] = BACKGROUND  # a square outline: best IoU far below 0.5
    assert judge(ring) == []


def test_eight_connectivity_joins_diagonal_neighbours():
    # Two squares touching only at a corner form one 8-connected component (not two squares).
    image = _canvas()
    image[20:40, 20:40] = COLORS["green"]
    image[40:60, 40:60] = COLORS["green"]
    found = judge(image)
    assert len(found) <= 1, found
    apart = _canvas()
    apart[20:40, 20:40] = COLORS["green"]
    apart[41:61, 41:61] = COLORS["green"]
    assert [d.pair for d in judge(apart)] == [("green", "square"), ("green", "square")]


def test_colors_are_separate_classes():
    image = _canvas()
    image[20:40, 20:40] = COLORS["red"]
    image[20:40, 40:60] = COLORS["orange"]  # touching, but a different color class
    assert sorted(d.pair for d in judge(image)) == [("orange", "square"), ("red", "square")]


def test_centres_and_order():
    scene = Scene((WorldObject("red", "circle", 0.75, 0.25, 0.25), WorldObject("blue", "square", 0.25, 0.75, 0.25)))
    found = judge(render(scene, 128))
    assert [d.pair for d in found] == [("blue", "square"), ("red", "circle")]  # left to right
    assert found[0].cx == pytest.approx(0.25) and found[0].cy == pytest.approx(0.75)
    assert found[1].to_object().size == pytest.approx(0.25)


def test_rejects_non_square_images():
    with pytest.raises(ValueError, match="square"):
        judge(Image.new("RGB", (128, 100), BACKGROUND))


# ---------------------------------------------------------------------------------------------
# Step 3: each template fits its own outline box
# ---------------------------------------------------------------------------------------------

SIZES_OF_SIDE = np.linspace(MIN_BOX, MAX_BOX, 24)  # 24 box sides from 0.16*S to 0.28*S


def _single_object(shape: str, side: float, index: int, size: int, condition: str) -> np.ndarray:
    """One object off the lattice (sub-pixel corner) in a rotating colour, drawn as `condition` says."""
    color = COLOR_NAMES[index % len(COLOR_NAMES)]
    centre = 0.5 + 0.37 * (index % 7) / size  # sub-pixel offsets vary the sampling phase
    scene = Scene((WorldObject(color, shape, centre, centre, float(side)),))
    if condition == "hard":
        return np.asarray(render(scene, size))
    smooth = np.asarray(render(scene, size, supersample=4)).astype(np.float64)
    if condition == "blurred":  # a 0.7 px Gaussian blur on top of the anti-aliased render
        smooth = ndimage.gaussian_filter(smooth, sigma=(0.7, 0.7, 0))
    return np.clip(np.rint(smooth), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("condition", ["hard", "antialiased", "blurred"])
def test_every_shape_and_size_is_read_in_every_condition(condition):
    """6 shapes x 24 sides in [0.16, 0.28]*S x S in {128, 256}: 288 of 288 read right. Under the
    old unit-box rule, blurred small stars read as diamonds 30-47 % of the time."""
    wrong = []
    for size in (128, 256):
        for shape in SHAPES:
            for index, side in enumerate(SIZES_OF_SIDE):
                found = judge(_single_object(shape, side, index, size, condition))
                if [d.shape for d in found] != [shape]:
                    wrong.append((size, shape, round(float(side), 3), [d.pair for d in found]))
    assert wrong == [], f"{len(wrong)} of 288 misread: {wrong[:10]}"


def _old_unit_box_star_iou(component: np.ndarray) -> float:
    """The star's IoU under the superseded rule (template in the box enlarged to a square)."""
    from unipic.world.geometry import shape_mask

    h, w = component.shape
    side = max(h, w)
    pad_r, pad_c = (side - h) / 2, (side - w) / 2
    rows = np.arange(-int(np.ceil(pad_r)), h + int(np.ceil(pad_r)))
    cols = np.arange(-int(np.ceil(pad_c)), w + int(np.ceil(pad_c)))
    window = np.zeros((rows.size, cols.size), dtype=bool)
    window[-rows[0] : -rows[0] + h, -cols[0] : -cols[0] + w] = component
    star = shape_mask("star", ((cols + 0.5 + pad_c) / side)[None, :], ((rows + 0.5 + pad_r) / side)[:, None])
    return (star & window).sum() / (star | window).sum()


def test_star_template_fits_its_outline_box_not_its_unit_box():
    """A hard-edged star's component is the star's outline, not its unit box: the fitted template
    matches it (IoU near 1), the old unit-box template does not."""
    array = np.asarray(render(Scene((WorldObject("yellow", "star", 0.5, 0.5, 0.25),)), 256))
    mask = np.any(array != BACKGROUND, axis=2)
    rows, cols = np.nonzero(mask)
    component = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    ious = shape_ious(component, rows.min(), cols.min())
    star = ious[SHAPES.index("star")]
    assert star >= 0.95, ious
    assert star - _old_unit_box_star_iou(component) >= 0.1


def test_template_pixels_outside_the_component_box_count_in_the_union():
    """A 2:1 rectangle: the square template fills the longer side, so half of it lies outside the
    component's box; counting those pixels gives IoU 0.5, not 1.0."""
    image = _canvas()
    image[40:60, 30:70] = COLORS["red"]  # 20 rows x 40 columns
    component = np.ones((20, 40), dtype=bool)
    ious = shape_ious(component, 40, 30)
    assert ious[SHAPES.index("square")] == pytest.approx(0.5)
    assert all(d.shape != "square" or d.iou < 0.6 for d in judge(image))


def test_template_is_not_clipped_to_the_canvas():
    """A square cut by the canvas edge to 10 x 20 px is compared with a 20 x 20 template that runs
    off the canvas: IoU 0.5, as a window holding both gives."""
    component = np.ones((20, 10), dtype=bool)  # columns 0..9 at the left edge
    assert shape_ious(component, 50, 0)[SHAPES.index("square")] == pytest.approx(0.5)
