"""The server and the CLI give an edit without a size the same output size: the pipeline's rule
(`unipic.unipic1.pipeline.default_edit_size`, decided in `check_inputs`), not one of their own."""

from __future__ import annotations

import base64
import io

from PIL import Image
from serve_helpers import multipart, png_bytes

from unipic.cli import main
from unipic.unipic1.pipeline import default_edit_size


def test_server_and_cli_give_a_non_square_edit_the_same_size(tiny_server, tmp_path):
    source = Image.new("RGB", (100, 60), (200, 30, 30))  # 5:3
    height, width = default_edit_size(100, 60, side=128, stride=16)  # the tiny preset draws 128 px
    assert (width, height) == (160, 96)

    body, ctype = multipart({"prompt": "make it blue", "num_inference_steps": "1", "seed": "3"},
                            {"image": ("source.png", png_bytes(source), "image/png")})
    reply = tiny_server.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
    assert reply.status == 200, reply.body
    [item] = reply.json()["data"]
    served = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert reply.json()["size"] == "160x96"

    source.save(tmp_path / "source.png")
    out = tmp_path / "edited.png"
    assert main(["edit", str(tmp_path / "source.png"), "make it blue", "-o", str(out), "--model", "tiny-random",
                 "--steps", "1", "--seed", "3", "--quiet"]) == 0
    with Image.open(out) as edited:
        assert edited.size == served.size == (width, height)
