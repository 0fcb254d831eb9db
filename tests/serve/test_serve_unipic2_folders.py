"""`unipic serve` over UniPic-2 folders (tiny random Kontext and MetaQuery): the same endpoints work.

Kontext generates and edits but cannot answer questions, which the server reports as a 400
`unsupported_task`; MetaQuery does all three. Without a size an edit keeps UniPic-2's own
longer-edge rule.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from serve_helpers import ServerProcess, assert_openai_error, data_url, decode_b64_png, multipart, png_bytes

pytestmark = pytest.mark.slow  # a server per UniPic-2 folder; in-process UniPic-2 tests stay in the default tier

pytest.importorskip("diffusers", reason="the unipic2 extra (diffusers) is not installed")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from unipic.unipic2.tiny import save_tiny_kontext, save_tiny_metaquery

    root = tmp_path_factory.mktemp("unipic2-serve")
    return save_tiny_kontext(root / "kontext-tiny"), save_tiny_metaquery(root / "mq-tiny")


@pytest.mark.parametrize("which", ["kontext", "metaquery"])
def test_unipic2_folder_served(folders, which):
    folder = folders[0] if which == "kontext" else folders[1]
    server = ServerProcess("--model", str(folder), "--device", "cpu", "--dtype", "float32", api_key=None)
    try:
        assert server.request("GET", "/v1/models").json()["data"][0]["id"] == folder.name
        reply = server.post_json("/v1/images/generations", {"prompt": "a cat", "size": "64x32", "n": 2, "seed": 1,
                                                            "num_inference_steps": 2})
        assert reply.status == 200, reply.body[:300]
        images = [decode_b64_png(item["b64_json"]) for item in reply.json()["data"]]
        assert [im.size for im in images] == [(64, 32)] * 2 and images[1].text["seed"] == "2"
        again = server.post_json("/v1/images/generations", {"prompt": "a cat", "size": "64x32", "seed": 2,
                                                            "num_inference_steps": 2})
        alone = np.asarray(decode_b64_png(again.json()["data"][0]["b64_json"]), np.int16)
        assert np.abs(alone - np.asarray(images[1], np.int16)).max() <= 2  # image k of seed s = seed s + k alone
        body, ctype = multipart({"prompt": "make it red", "seed": "3", "num_inference_steps": "2",
                                 "guidance_scale": "2.0"},
                                {"image": ("s.png", png_bytes(Image.new("RGB", (96, 48), "blue")), "image/png")})
        reply = server.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
        assert reply.status == 200, reply.body[:300]
        assert decode_b64_png(reply.json()["data"][0]["b64_json"]).size == (512, 256)  # the longer-edge rule
        reply = server.post_json("/v1/images/generations", {"prompt": "a cat", "size": "64x64", "temperature": 0.5})
        assert_openai_error(reply, 400, code="invalid_value")  # UniPic-2 has no temperature option
        chat = server.post_json("/v1/chat/completions", {"model": folder.name, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (32, 32)))}}]}]})
        if which == "kontext":
            assert_openai_error(chat, 400, code="unsupported_task")
        else:
            assert chat.status == 200 and isinstance(chat.json()["choices"][0]["message"]["content"], str)
        assert server.request("GET", "/health").status == 200
    finally:
        server.stop()
