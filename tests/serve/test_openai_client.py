"""The real `openai` client against `unipic serve` on a loopback port: images, edits, chat (plain, streamed)."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import data_url, decode_b64_png, png_bytes

openai = pytest.importorskip("openai", reason="the openai client (a test dependency) is not installed")

FAST = {"num_inference_steps": 2}  # two MAR steps: the tiny model answers in tens of milliseconds


@pytest.fixture(scope="module")
def client(tiny_server):
    """An `openai.OpenAI` client for the tiny server (no retries: every answer is seen as it is)."""
    return openai.OpenAI(base_url=tiny_server.url + "v1", api_key=tiny_server.api_key, max_retries=0, timeout=120)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-random"]


def test_generations_decode_match_size_and_carry_their_settings(client):
    result = client.images.generate(model="tiny-random", prompt="a red circle", n=2, size="48x32",
                                    response_format="b64_json", extra_body={"seed": 7, **FAST})
    assert result.created > 0 and len(result.data) == 2
    images = [decode_b64_png(item.b64_json) for item in result.data]
    assert all(im.format == "PNG" and im.size == (48, 32) for im in images)
    assert images[0].text["prompt"] == "a red circle"
    assert [im.text["seed"] for im in images] == ["7", "8"]  # image k uses seed + k
    assert images[0].text["software"] == "unipic" and images[0].text["model"] == "tiny-random"
    assert '"num_iter": 2' in images[0].text["settings"] or '"steps": 2' in images[0].text["settings"]
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1])), "the two images of a request must differ"


def test_png_records_are_the_clis_with_the_settings_the_pipeline_resolved(client, reference_pipeline):
    """One record per image, as the CLI writes it: the image's own seed and each setting once (steps, not num_iter)."""
    import json

    from unipic.io_utils import output_record

    result = client.images.generate(prompt="a red circle", n=2, size="48x32",
                                    extra_body={"seed": 7, "guidance_scale": 2.5, **FAST})
    expected = reference_pipeline.check_inputs("text_to_image", ["a red circle"] * 2, height=32, width=48,
                                               seed=[7, 8], steps=2, cfg=2.5)
    for k, item in enumerate(result.data):
        record = decode_b64_png(item.b64_json).text
        resolved = {**expected.settings, "device": "cpu", "dtype": "float32"}  # device and dtype change pixels
        assert record == output_record("tiny-random", 7 + k, resolved, prompt="a red circle", index=k)
        settings = json.loads(record["settings"])
        assert settings["steps"] == 2 and settings["cfg"] == 2.5 and "num_iter" not in settings


def test_same_seed_same_image_and_image_k_is_seed_plus_k(client):
    def one(seed: int, n: int = 1):
        result = client.images.generate(prompt="two blue stars", n=n, size="32x32", extra_body={"seed": seed, **FAST})
        return [_pixels(decode_b64_png(item.b64_json)) for item in result.data]

    first, again, other = one(11)[0], one(11)[0], one(12)[0]
    assert np.array_equal(first, again), "the same seed must give the same image"
    assert not np.array_equal(first, other)
    pair = one(11, n=2)
    # Each image has its own generator: image 1 of seed 11 is the image of seed 12 (up to rounding).
    assert np.abs(pair[0] - first).max() <= 2 and np.abs(pair[1] - other).max() <= 2


def test_default_size_is_the_models(client):
    result = client.images.generate(prompt="a green square", extra_body={"seed": 1, **FAST})
    assert decode_b64_png(result.data[0].b64_json).size == (128, 128)  # the tiny preset's image_size


def test_edits_with_and_without_size(client):
    source = Image.new("RGBA", (96, 48), (200, 30, 30, 255))
    result = client.images.edit(image=("source.png", png_bytes(source), "image/png"), prompt="make it blue",
                                size="32x32", extra_body={"seed": 3, **FAST})
    [edited] = [decode_b64_png(item.b64_json) for item in result.data]
    assert edited.size == (32, 32) and edited.text["instruction"] == "make it blue" and edited.text["seed"] == "3"
    again = client.images.edit(image=("source.png", png_bytes(source), "image/png"), prompt="make it blue",
                               size="32x32", extra_body={"seed": 3, **FAST})
    assert np.array_equal(_pixels(edited), _pixels(decode_b64_png(again.data[0].b64_json)))
    # No size: the input's 2:1 aspect at the model's 128 px resolution, in multiples of 16.
    wide = client.images.edit(image=("source.png", png_bytes(source), "image/png"), prompt="make it blue", n=2,
                              extra_body={"seed": 3, **FAST})
    sizes = [decode_b64_png(item.b64_json).size for item in wide.data]
    assert sizes == [(176, 96)] * 2


def test_chat_plain_and_streamed_give_the_same_answer(client):
    image = Image.new("RGB", (64, 64), (30, 70, 220))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What color is the image?"},
                                             {"type": "image_url", "image_url": {"url": data_url(image)}}]}]
    plain = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=8, temperature=0)
    assert plain.object == "chat.completion" and plain.model == "tiny-random"
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finishes, usage = [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
        usage = chunk.usage or usage
    assert "".join(pieces) == choice.message.content  # greedy decoding: the same answer
    assert finishes == [choice.finish_reason]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


def test_chat_image_only_message_asks_for_a_description(client):
    image = Image.new("RGB", (128, 128), "white")
    reply = client.chat.completions.create(
        model="tiny-random", max_tokens=4,
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}])
    assert isinstance(reply.choices[0].message.content, str)  # the model's own description prompt was asked


@pytest.mark.slow  # waits on a busy model thread; the other client tests stay in the default tier
def test_health_answers_while_the_model_works(tiny_server, client):
    """Generation runs off the event loop: /health answers at once, again and again, during a long request."""
    finished = threading.Event()

    def long_request():
        try:
            client.images.generate(prompt="many shapes", n=4, size="256x256",
                                   extra_body={"seed": 0, "num_inference_steps": 64})
        finally:
            finished.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while tiny_server.metrics()["running"] == 0 and not finished.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        during = []  # latencies of the answers that came back while the long request still ran
        while not finished.is_set() and len(during) < 5:
            started = time.monotonic()
            reply = tiny_server.request("GET", "/health")
            latency = time.monotonic() - started
            assert reply.status == 200 and reply.json()["status"] == "ready"
            if not finished.is_set():
                during.append(latency)
        # A blocked event loop would answer once, after the request: here several answers come during it.
        assert len(during) >= 3, f"only {len(during)} health answers came back during the long request"
        assert max(during) < 1.5, during
    finally:
        thread.join(timeout=300)


def test_b64_json_is_plain_base64_png(client):
    result = client.images.generate(prompt="a circle", size="16x16", extra_body={"seed": 5, "num_inference_steps": 1})
    raw = base64.b64decode(result.data[0].b64_json, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(raw)).mode == "RGB"
