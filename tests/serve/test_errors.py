"""Every refusal has its status and OpenAI's error body, and the server keeps serving afterwards."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from serve_helpers import assert_openai_error, data_url, multipart, png_bytes

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
CHAT = "/v1/chat/completions"
OK_GEN = {"prompt": "a red circle", "size": "16x16", "num_inference_steps": 1, "seed": 0}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side white pixels: a few KB that decode to side² pixels."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    parts += [compressor.compress(row * (side % 1000)), compressor.flush()]
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def noise_png(width: int = 64, height: int = 64) -> bytes:
    """Incompressible PNG bytes."""
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))


def edit_body(image: bytes | None, prompt: str = "make it blue", **fields: str) -> tuple[bytes, dict]:
    files = {"image": ("in.png", image, "image/png")} if image is not None else {}
    body, ctype = multipart({"prompt": prompt, "size": "16x16", "num_inference_steps": "1", **fields}, files)
    return body, {"Content-Type": ctype}


def chat_payload(content, **extra) -> dict:
    return {"model": "tiny-random", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


SMALL_IMAGE = Image.new("RGB", (32, 32), "red")

# (name, method, path, body, extra headers, status, code, param)
CASES = [
    ("malformed JSON", "POST", GEN, b'{"prompt": "a cat",', {"Content-Type": "application/json"}, 400,
     "invalid_json", None),
    ("empty body", "POST", GEN, b"", {"Content-Type": "application/json"}, 400, "invalid_json", None),
    ("JSON that is not an object", "POST", GEN, b'["a cat"]', {"Content-Type": "application/json"}, 400,
     "invalid_request", None),
    ("missing prompt", "POST", GEN, {"size": "16x16"}, {}, 400, "missing_required_parameter", "prompt"),
    ("prompt of the wrong type", "POST", GEN, {"prompt": 5}, {}, 400, "invalid_type", "prompt"),
    ("n of the wrong type", "POST", GEN, {**OK_GEN, "n": "two"}, {}, 400, "invalid_type", "n"),
    ("seed of the wrong type", "POST", GEN, {**OK_GEN, "seed": 1.5}, {}, 400, "invalid_type", "seed"),
    ("empty prompt", "POST", GEN, {**OK_GEN, "prompt": "  "}, {}, 400, "invalid_value", "prompt"),
    ("prompt too long", "POST", GEN, {**OK_GEN, "prompt": "x" * 501}, {}, 400, "prompt_too_long", "prompt"),
    ("size not a multiple of 16", "POST", GEN, {**OK_GEN, "size": "100x100"}, {}, 400, "invalid_size", "size"),
    ("size too large", "POST", GEN, {**OK_GEN, "size": "1024x1024"}, {}, 400, "invalid_size", "size"),
    ("size malformed", "POST", GEN, {**OK_GEN, "size": "big"}, {}, 400, "invalid_size", "size"),
    ("n too large", "POST", GEN, {**OK_GEN, "n": 5}, {}, 400, "invalid_value", "n"),
    ("n zero", "POST", GEN, {**OK_GEN, "n": 0}, {}, 400, "invalid_value", "n"),
    ("too many steps", "POST", GEN, {**OK_GEN, "num_inference_steps": 65}, {}, 400, "invalid_value",
     "num_inference_steps"),
    ("steps beyond the image tokens", "POST", GEN, {**OK_GEN, "num_inference_steps": 2}, {}, 400, "invalid_value",
     None),  # a 16x16 image has one token: the pipeline's own check, reported as a 400
    ("negative guidance", "POST", GEN, {**OK_GEN, "guidance_scale": -1}, {}, 400, "invalid_value", "guidance_scale"),
    ("negative seed", "POST", GEN, {**OK_GEN, "seed": -3}, {}, 400, "invalid_value", "seed"),
    ("seed beyond 2**64 - max_n", "POST", GEN, {**OK_GEN, "seed": 2**64 - 2}, {}, 400, "invalid_value", "seed"),
    ("NaN guidance", "POST", GEN, b'{"prompt": "a red circle", "size": "16x16", "guidance_scale": NaN}',
     {"Content-Type": "application/json"}, 400, "invalid_value", "guidance_scale"),
    ("temperature too high", "POST", GEN, {**OK_GEN, "temperature": 11}, {}, 400, "invalid_value", "temperature"),
    ("response_format url", "POST", GEN, {**OK_GEN, "response_format": "url"}, {}, 400,
     "unsupported_response_format", "response_format"),
    ("unknown model", "POST", GEN, {**OK_GEN, "model": "dall-e-3"}, {}, 404, "model_not_found", "model"),
    ("unknown model id", "GET", "/v1/models/dall-e-3", None, {}, 404, "model_not_found", "model"),
    ("unknown endpoint", "GET", "/v1/nothing", None, {}, 404, "unknown_url", None),
    ("wrong method", "GET", GEN, None, {}, 405, "method_not_allowed", None),
    ("edit without an image", "POST", EDIT, edit_body(None), None, 400, "missing_required_parameter", "image"),
    ("edit as JSON", "POST", EDIT, {"prompt": "x"}, {}, 415, "unsupported_media_type", None),
    ("edit with a non-image", "POST", EDIT, edit_body(b"hello, I am text, not a picture"), None, 400,
     "invalid_image", "image"),
    ("edit with a truncated PNG", "POST", EDIT, edit_body(noise_png()[:3000]), None, 400, "invalid_image", "image"),
    ("edit with an empty file", "POST", EDIT, edit_body(b""), None, 400, "invalid_image", "image"),
    ("decompression bomb (over the server's pixel limit)", "POST", EDIT, edit_body(bomb_png(2000)), None, 413,
     "image_too_large", "image"),
    ("decompression bomb (over PIL's own limit)", "POST", EDIT, edit_body(bomb_png(20000)), None, 413,
     "image_too_large", "image"),
    ("edit n of the wrong type", "POST", EDIT, edit_body(png_bytes(SMALL_IMAGE), n="many"), None, 400,
     "invalid_type", "n"),
    ("chat without an image", "POST", CHAT, chat_payload("what is this?"), {}, 400, "missing_image", "messages"),
    ("chat with a remote image URL", "POST", CHAT, chat_payload([_image_part("https://example.com/cat.png")]), {},
     400, "invalid_image_url", "messages[0].content[0].image_url.url"),
    ("chat with broken base64", "POST", CHAT, chat_payload([_image_part("data:image/png;base64,@@@@")]), {}, 400,
     "invalid_image_url", None),
    ("chat with a non-image data URL", "POST", CHAT,
     chat_payload([_image_part("data:image/png;base64,aGVsbG8gd29ybGQ=")]), {}, 400, "invalid_image", None),
    ("chat with two images", "POST", CHAT,
     chat_payload([_image_part(data_url(SMALL_IMAGE)), _image_part(data_url(SMALL_IMAGE))]), {}, 400,
     "too_many_images", None),
    ("chat max_tokens too large", "POST", CHAT, chat_payload([_image_part(data_url(SMALL_IMAGE))], max_tokens=65),
     {}, 400, "invalid_value", "max_tokens"),
    ("chat with a negative seed", "POST", CHAT, chat_payload([_image_part(data_url(SMALL_IMAGE))], seed=-1), {},
     400, "invalid_value", "seed"),
    ("chat temperature over OpenAI's 2", "POST", CHAT,
     chat_payload([_image_part(data_url(SMALL_IMAGE))], temperature=2.5), {}, 400, "invalid_value", "temperature"),
    ("chat messages of the wrong type", "POST", CHAT, {"model": "tiny-random", "messages": "hi"}, {}, 400,
     "invalid_type", "messages"),
    ("chat with an unknown part type", "POST", CHAT, chat_payload([{"type": "audio", "audio": "x"}]), {}, 400,
     "invalid_value", "messages[0].content[0].type"),
    ("chat with an unknown model", "POST", CHAT, {**chat_payload([_image_part(data_url(SMALL_IMAGE))]),
                                                  "model": "gpt-4o"}, {}, 404, "model_not_found", "model"),
]


def _still_serving(server) -> None:
    health = server.request("GET", "/health")
    assert health.status == 200 and health.json()["status"] == "ready"
    reply = server.post_json(GEN, OK_GEN)
    assert reply.status == 200, reply.body[:300]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_paths(tiny_server, case):
    name, method, path, body, headers, status, code, param = case
    if isinstance(body, tuple):  # (bytes, headers) from edit_body
        body, headers = body
    elif isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers = {"Content-Type": "application/json", **headers}
    reply = tiny_server.request(method, path, body, headers)
    assert_openai_error(reply, status, code=code, param=param)
    _still_serving(tiny_server)


def test_a_mask_without_transparency_is_refused(tiny_server):
    """OpenAI's masks mark what to redraw by transparency: an opaque mask marks nothing, and says so."""
    body, ctype = multipart({"prompt": "x"}, {"image": ("a.png", png_bytes(SMALL_IMAGE), "image/png"),
                                              "mask": ("m.png", png_bytes(SMALL_IMAGE), "image/png")})
    reply = tiny_server.request("POST", EDIT, body, {"Content-Type": ctype})
    assert_openai_error(reply, 400, code="invalid_mask", param="mask")
    wrong_size = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    body, ctype = multipart({"prompt": "x"}, {"image": ("a.png", png_bytes(SMALL_IMAGE), "image/png"),
                                              "mask": ("m.png", png_bytes(wrong_size), "image/png")})
    reply = tiny_server.request("POST", EDIT, body, {"Content-Type": ctype})
    assert_openai_error(reply, 400, code="invalid_mask", param="mask")


@pytest.mark.parametrize("given", [None, "Bearer wrong-key", "Basic dGVzdDp0ZXN0", "test-key-123"])
def test_bad_or_missing_api_key(tiny_server, given):
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/health", None), ("GET", "/metrics", None),
                               ("POST", GEN, json.dumps(OK_GEN))):
        headers = {"Content-Type": "application/json"}
        if given is not None:
            headers["Authorization"] = given
        reply = tiny_server.request(method, path, body, headers, auth=False)
        error = assert_openai_error(reply, 401, code="invalid_api_key")
        assert error["type"] == "authentication_error"
        assert reply.headers.get("www-authenticate") == "Bearer"
    page = tiny_server.request("GET", "/", auth=False)  # the page itself holds no data and asks for the key
    assert page.status == 200 and b"<html" in page.body
    _still_serving(tiny_server)


def test_oversized_body_with_content_length(tiny_server):
    """A body over the limit is refused with 413 (the client sends it all and still reads the answer)."""
    body, ctype = multipart({"prompt": "x"}, {"image": ("big.png", b"\x89PNG" + b"\x00" * 2_000_000, "image/png")})
    reply = tiny_server.request("POST", EDIT, body, {"Content-Type": ctype})
    assert_openai_error(reply, 413, code="request_too_large")
    _still_serving(tiny_server)


def test_oversized_body_refused_before_it_is_sent(tiny_server):
    """With `Expect: 100-continue` the 413 comes before the client sends the body at all."""
    with socket.create_connection((tiny_server.host, tiny_server.port), timeout=30) as sock:
        sock.sendall(f"POST {EDIT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tiny_server.api_key}\r\n"
                     f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 50000000\r\n"
                     f"Expect: 100-continue\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["error"]["code"] == "request_too_large"
    _still_serving(tiny_server)


def test_oversized_chunked_body(tiny_server):
    """A chunked body (no Content-Length) is counted as it arrives and refused past the limit."""
    import http.client

    def chunks():
        for _ in range(16):
            yield b"x" * 100_000  # 1.6 MB in all; the limit is about 1.4 MB

    connection = http.client.HTTPConnection(tiny_server.host, tiny_server.port, timeout=60)
    try:
        connection.request("POST", GEN, body=chunks(), encode_chunked=True,
                           headers={**tiny_server.auth(), "Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    assert response.status == 413
    assert json.loads(payload)["error"]["code"] == "request_too_large"
    _still_serving(tiny_server)


def test_any_image_mode_is_accepted(tiny_server):
    """Palette, greyscale, 16-bit, transparency and JPEG uploads are converted, not refused."""
    images = {
        "palette": Image.new("P", (40, 24), 3),
        "grey": Image.new("L", (40, 24), 128),
        "16-bit": Image.fromarray(np.full((24, 40), 40000, dtype=np.uint16)),
        "rgba": Image.new("RGBA", (40, 24), (0, 0, 255, 0)),
        "bilevel": Image.new("1", (40, 24), 1),
        "la": Image.new("LA", (40, 24), (100, 200)),
    }
    for name, image in images.items():
        body, headers = edit_body(png_bytes(image))
        reply = tiny_server.request("POST", EDIT, body, headers)
        assert reply.status == 200, (name, reply.body[:300])
    buffer = io.BytesIO()
    Image.new("CMYK", (40, 24), (0, 255, 0, 0)).save(buffer, format="JPEG")
    body, headers = edit_body(buffer.getvalue())
    assert tiny_server.request("POST", EDIT, body, headers).status == 200
