"""An edit without a size gets the same output size from the command line, the server and Python: the
input's aspect ratio at the model's resolution, decided by the pipeline (issue 39: one rule)."""

from __future__ import annotations

from PIL import Image
from serve_helpers import decode_b64_png, multipart, png_bytes

from unipic.cli import main
from unipic.images import aspect_size


def test_aspect_size_keeps_the_ratio_on_the_stride():
    assert aspect_size(200, 100, 128, 16) == (96, 176)  # a 2:1 photo
    assert aspect_size(100, 100, 128, 16) == (128, 128)
    height, width = aspect_size(1, 1000, 128, 16)
    assert width == 16 and height % 16 == 0  # never below one stride


def test_cli_server_and_python_agree_on_an_edits_size(tiny_server, reference_pipeline, tmp_path):
    photo = Image.new("RGB", (200, 100), (120, 40, 40))
    path = tmp_path / "wide.png"
    photo.save(path)
    out = tmp_path / "edited.png"
    assert main(["edit", str(path), "Make it blue.", "--model", "tiny-random", "--steps", "1", "--head-steps", "2",
                 "--quiet", "-o", str(out)]) == 0
    body, content_type = multipart({"prompt": "Make it blue.", "num_inference_steps": "1"},
                                   {"image": ("wide.png", png_bytes(photo), "image/png")})
    reply = tiny_server.request("POST", "/v1/images/edits", body, {"Content-Type": content_type})
    assert reply.status == 200, reply.body[:300]
    served = decode_b64_png(reply.json()["data"][0]["b64_json"])
    [direct] = reference_pipeline.edit_image([photo], ["Make it blue."], seed=0, steps=1, head_steps=2)
    side, stride = reference_pipeline.config.sampling.image_size, reference_pipeline.config.pixel_stride
    height, width = aspect_size(200, 100, side, stride)
    assert Image.open(out).size == served.size == direct.size == (width, height)
    assert width > height
