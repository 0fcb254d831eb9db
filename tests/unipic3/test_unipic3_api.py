"""The UnifiedPipeline adapter: input checks (one-line UserErrors), unsupported jobs, options, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from unipic.api import UnifiedPipeline, UnsupportedTaskError, UserError
from unipic.unipic3.adapter import UniPic3UnifiedPipeline

AREA = 64**2


@pytest.fixture(scope="module")
def api(tiny_pipe):
    return UniPic3UnifiedPipeline(tiny_pipe, variant="dmd", name="tiny", budget_area=AREA)


def _one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_implements_the_protocol_and_refuses_other_jobs(api):
    assert isinstance(api, UnifiedPipeline)
    for call in (lambda: api.text_to_image(["a cat"]), lambda: api.image_to_text([None], ["?"]),
                 lambda: api.check_inputs("text_to_image", ["a cat"])):
        with pytest.raises(UnsupportedTaskError, match="UniPic-3"):
            call()


def test_image_counts_per_instruction(api, images_of):
    seven, six = images_of([(32, 32)] * 7), images_of([(32, 32)] * 6)
    message = _one_line_error(lambda: api.check_inputs("edit_image", ["x"], [seven]), "images\\[0\\] has 7 images")
    assert "1 to 6" in message
    _one_line_error(lambda: api.check_inputs("edit_image", ["x"], [[]]), "images\\[0\\] has 0 images")
    _one_line_error(lambda: api.check_inputs("edit_image", ["x", "y"], [six]), "one entry per instruction")
    request = api.check_inputs("edit_image", ["x", "y"], [six, seven[0]])  # a lone image is a group of one
    assert [len(group) for group in request.images] == [6, 1]


def test_other_bad_inputs(api, images_of):
    image = images_of([(64, 64)])
    cases = [
        ({"cfg": float("nan")}, "cfg"), ({"steps": 0}, "num_inference_steps"), ({"height": 100, "width": 64}, "16"),
        ({"height": 64}, "both height and width"), ({"seed": [1, 2]}, "seeds for 1"),
        ({"negative_prompt": 3}, "negative_prompt"), ({"guidance": 2}, "unknown edit option"),
        ({"images_per_prompt": 2}, "one image per instruction"),
    ]
    for kwargs, match in cases:
        _one_line_error(lambda: api.check_inputs("edit_image", ["x"], [image], **kwargs), match)
    _one_line_error(lambda: api.check_inputs("edit_image", [""], [image]), "instructions\\[0\\] is empty")
    base = UniPic3UnifiedPipeline(api.pipeline, variant="base", budget_area=AREA)
    _one_line_error(lambda: base.check_inputs("edit_image", ["x"], [image], steps=1), "at least 2 steps")


def test_settings_and_defaults(api, images_of):
    request = api.check_inputs("edit_image", ["x"], [images_of([(96, 64), (64, 64)])], true_cfg_scale=3)
    settings = request.settings
    assert settings["cfg"] == 3 and settings["num_inference_steps"] == 8 and settings["sampler"] == "consistency"
    assert settings["negative_prompt"] == " " and settings["output_sizes"] == [[64, 32]]  # 64²-px budget
    defaults = api.sampling_defaults()
    assert defaults["num_inference_steps"] == 8 and defaults["cfg"] == 4.0 and defaults["max_input_images"] == 6
    assert UniPic3UnifiedPipeline(api.pipeline).sampling_defaults()["num_inference_steps"] == 50


def test_seed_lists_make_each_instruction_independent(api, images_of):
    a, b = images_of([(64, 64)]), images_of([(48, 80)], seed=5)
    together = api.edit_image([a, b], ["make it red", "make it blue"], seed=[3, 4], steps=2)
    alone = api.edit_image([b], ["make it blue"], seed=[4], steps=2)
    again = api.edit_image([a, b], ["make it red", "make it blue"], seed=[3, 4], steps=2)
    assert np.array_equal(np.asarray(together[1]), np.asarray(alone[0]))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(together, again))
    other = api.edit_image([a], ["make it red"], seed=[9], steps=2)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(together[0]))
