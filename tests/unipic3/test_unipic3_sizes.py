"""The shared pixel budget, the vision-encoder sizes, the output size and img_shapes."""

from __future__ import annotations

import math

import pytest

from unipic.unipic3 import sizes


def _upstream_budget(image_sizes, area=1024**2):
    """The budget as upstream's __call__ states it: ratio, round, then the nearest multiple of 32."""
    total = sum(w * h for w, h in image_sizes)
    ratio = math.sqrt(area) / total**0.5
    first = [(round(w * ratio), round(h * ratio)) for w, h in image_sizes]
    return [(round(w / 32) * 32, round(h / 32) * 32) for w, h in first]


@pytest.mark.parametrize(("inputs", "expected"), [
    ([(1024, 1024)], [(1024, 1024)]),
    ([(512, 512)], [(1024, 1024)]),  # small inputs are scaled up to the budget
    ([(1920, 1080)], [(1376, 768)]),  # 1365.3 x 768 -> 1376 x 768
    ([(800, 600), (600, 800)], [(832, 640), (640, 832)]),  # ratio 1.045: 836 x 627 -> 832 x 640
    ([(1000, 1000)] * 4, [(512, 512)] * 4),
    ([(640, 480), (300, 900), (1024, 256)], [(704, 544), (320, 992), (1152, 288)]),  # 1006 -> 992
    ([(500, 333)] * 6, [(512, 352)] * 6),  # six inputs: 512.3 x 341.2 each
])
def test_budget_sizes_table(inputs, expected):
    assert sizes.budget_sizes(inputs) == expected
    assert sizes.budget_sizes(inputs) == _upstream_budget(inputs)


def test_budget_area_is_a_parameter():
    assert sizes.budget_sizes([(256, 128)], area=128**2) == [(192, 96)]  # 181 x 90.5 -> nearest 32s
    assert sizes.budget_sizes([(64, 64)] * 6, area=128**2) == [(64, 64)] * 6  # 52.3 -> 64


def test_degenerate_sides_never_reach_zero():
    strip = sizes.budget_sizes([(4000, 10), (4000, 4000)])
    assert all(side >= 32 for size in strip for side in size)


def test_budget_images_resize_twice_to_the_table_sizes(images_of):
    budgeted = sizes.budget_images(images_of([(300, 200), (150, 450)]), area=128**2)
    assert [im.size for im in budgeted] == sizes.budget_sizes([(300, 200), (150, 450)], area=128**2)


@pytest.mark.parametrize(("size", "expected"), [((1024, 1024), (896, 896)), ((1376, 768), (1204, 672)),
                                                 ((64, 96), (56, 84)), ((32, 32), (28, 28))])
def test_encoder_sizes_are_28_32_of_the_budgeted_size(size, expected):
    assert sizes.encoder_size(size) == expected
    assert all(side % 28 == 0 for side in sizes.encoder_size(size))  # 14-px patches, merged 2x2


def test_output_size_rule():
    budgeted = [(1376, 768), (512, 512)]
    assert sizes.output_size(budgeted) == (1376, 768)  # the first input's size
    assert sizes.output_size(budgeted, 1024, 1024) == (1024, 1024)  # upstream's scripts
    assert sizes.output_size([(200, 100)], None, None) == (192, 96)  # floored to multiples of 16
    assert sizes.output_size(budgeted, height=512, width=None) == (1376, 768)  # a lone side is ignored, as upstream


def test_img_shapes_list_target_then_inputs():
    assert sizes.img_shapes((1024, 1024), [(1376, 768), (512, 512)]) == [(1, 64, 64), (1, 48, 86), (1, 32, 32)]
    assert sizes.token_grid((128, 64)) == (1, 4, 8)  # (frames, rows, cols)
