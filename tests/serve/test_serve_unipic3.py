"""UniPic-3 behind the server: POST /v1/images/edits with several `image[]` parts composes them, as
OpenAI's API takes several images for one edit; a one-image family refuses a second image (issue 38)."""

from __future__ import annotations

import json

import pytest
from serve_helpers import ServerProcess, assert_openai_error, decode_b64_png, multipart, png_bytes

from unipic.unipic2.tiny import random_image

EDIT = "/v1/images/edits"


@pytest.fixture(scope="module")
def unipic3_server():
    server = ServerProcess("--model", "unipic3-tiny-random", "--variant", "dmd", "--max-n", "2")
    yield server
    server.stop()


def _edit(server, images, **fields):
    parts = [("image[]" if len(images) > 1 else "image", (f"in{i}.png", png_bytes(im), "image/png"))
             for i, im in enumerate(images)]
    body, content_type = multipart({"prompt": "Put the second picture into the first.", **fields}, parts)
    return server.request("POST", EDIT, body, {"Content-Type": content_type})


def test_several_images_compose_into_one_and_match_the_python_api(unipic3_server):
    import numpy as np
    import torch

    from unipic.loading import load_pipeline

    torch.set_num_threads(1)  # as the server runs (OMP_NUM_THREADS=1): the same reduction order
    images = [random_image(96, 64, seed=1), random_image(64, 64, seed=2), random_image(48, 80, seed=3)]
    reply = _edit(unipic3_server, images, seed="5", num_inference_steps="2")
    assert reply.status == 200, reply.body[:500]
    [item] = reply.json()["data"]
    served = decode_b64_png(item["b64_json"])
    settings = json.loads(served.text["settings"])
    assert settings["variant"] == "dmd" and served.size == tuple(settings["output_sizes"][0])
    pipeline = load_pipeline("unipic3-tiny-random", device="cpu", variant="dmd")
    [direct] = pipeline.edit_image([images], ["Put the second picture into the first."], seed=[5], steps=2)
    difference = np.abs(np.asarray(served.convert("RGB"), dtype=int) - np.asarray(direct, dtype=int))
    assert difference.max() <= 1, difference.max()  # float rounding of a batched call at most


def test_seven_images_are_refused_naming_the_limit(unipic3_server):
    reply = _edit(unipic3_server, [random_image(32, 32, seed=i) for i in range(7)])
    error = assert_openai_error(reply, 400, code="too_many_images", param="image")
    assert "at most 6" in error["message"]


def test_a_one_image_family_refuses_a_second_image(tiny_server):
    reply = _edit(tiny_server, [random_image(32, 32, seed=1), random_image(32, 32, seed=2)])
    error = assert_openai_error(reply, 400, code="too_many_images", param="image")
    assert "one image per request" in error["message"]
