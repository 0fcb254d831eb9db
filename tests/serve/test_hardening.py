"""The server safe by default and strict about what it is sent (issue 41, server items 1 and 4-8):
JSON only as JSON, only the Host names it is bound to, CORS only when asked, every malformed request a
4xx, unsupported parameters named, chat `stop` honoured, Prometheus metrics, and start-up mistakes in
one line. Every test talks raw HTTP or the `openai` client to a real `unipic serve` on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from serve_helpers import SRC, ServerProcess, assert_openai_error, data_url

from unipic.unipic2.tiny import random_image

GEN = "/v1/images/generations"
CHAT = "/v1/chat/completions"


def _chat(server, **extra):
    payload = {"model": "tiny-random", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What color is the circle?"},
        {"type": "image_url", "image_url": {"url": data_url(random_image(32, 32, seed=1))}}]}], **extra}
    return server.post_json(CHAT, payload)


def test_json_endpoints_refuse_what_a_page_on_another_site_can_send(tiny_server):
    """text/plain and form bodies go cross-site without a preflight: they are a 415, never a generation."""
    body = json.dumps({"prompt": "a red circle", "size": "32x32"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        reply = tiny_server.request("POST", GEN, body, {"Content-Type": content_type} if content_type else {})
        assert_openai_error(reply, 415, code="unsupported_media_type")
    assert tiny_server.post_json(GEN, {"prompt": "a red circle", "size": "32x32", "num_inference_steps": 1}).status == 200


def test_only_the_bound_host_names_are_answered(tiny_server):
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name as Host."""
    reply = tiny_server.request("GET", "/v1/models", headers={"Host": "evil.example:8000"})
    error = assert_openai_error(reply, 400, code="invalid_host")
    assert "evil.example" in error["message"]
    for host in ("localhost", f"127.0.0.1:{tiny_server.port}", f"[::1]:{tiny_server.port}"):
        assert tiny_server.request("GET", "/v1/models", headers={"Host": host}).status == 200, host


def test_cors_only_for_the_origins_named():
    server = ServerProcess("--model", "shapes-oracle", "--allowed-origins", "https://app.example")
    try:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        reply = server.request("OPTIONS", GEN, headers=preflight, auth=False)
        assert reply.status == 200 and reply.headers["access-control-allow-origin"] == "https://app.example"
        other = server.request("OPTIONS", GEN, headers={**preflight, "Origin": "https://evil.example"}, auth=False)
        assert "access-control-allow-origin" not in other.headers
        simple = server.request("GET", "/v1/models", headers={"Origin": "https://app.example"})
        assert simple.headers.get("access-control-allow-origin") == "https://app.example"
    finally:
        server.stop()


def test_no_cors_headers_by_default(tiny_server):
    reply = tiny_server.request("GET", "/v1/models", headers={"Origin": "https://app.example"})
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers


def test_deeply_nested_json_is_a_400_not_a_500(tiny_server):
    for depth in (40, 990, 5000):
        reply = tiny_server.request("POST", GEN, "[" * depth + "]" * depth, {"Content-Type": "application/json"})
        assert_openai_error(reply, 400, code="invalid_json")
    assert "500" not in tiny_server.metrics()["errors"]


def test_size_errors_name_size_and_suggest_one_that_fits(tiny_server):
    reply = tiny_server.post_json(GEN, {"prompt": "a red circle", "size": "4096x4096"})
    error = assert_openai_error(reply, 400, param="size")
    assert "512" in error["message"]


@pytest.mark.parametrize("endpoint, field, value", [
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "logprobs", True),
    (CHAT, "response_format", {"type": "json_object"}),
    (GEN, "quality", "hd"),
    (GEN, "style", "vivid"),
])
def test_unsupported_parameters_are_a_400_naming_them(tiny_server, endpoint, field, value):
    if endpoint == CHAT:
        reply = _chat(tiny_server, **{field: value})
    else:
        reply = tiny_server.post_json(GEN, {"prompt": "a red circle", field: value})
    error = assert_openai_error(reply, 400, code="unsupported_parameter", param=field)
    assert field in error["message"]


def test_chat_stop_cuts_the_answer_through_the_openai_client():
    """The embedded model captions a rendered scene; `stop` cuts the caption before the stop string."""
    from openai import OpenAI

    from unipic.world.render import render
    from unipic.world.scene import Scene, WorldObject

    server = ServerProcess("--model", "default")
    try:
        client = OpenAI(base_url=server.url + "v1", api_key=server.api_key, max_retries=0)
        scene = Scene((WorldObject("red", "circle", 0.3, 0.5, 0.25), WorldObject("blue", "star", 0.7, 0.5, 0.25)))
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "Describe the image."},
            {"type": "image_url", "image_url": {"url": data_url(render(scene, 128))}}]}]
        full = client.chat.completions.create(model="default", messages=messages, seed=0)
        answer = full.choices[0].message.content
        assert " " in answer.strip(), answer
        stop = answer.strip().split(" ")[1]  # the caption's second word
        cut = client.chat.completions.create(model="default", messages=messages, seed=0, stop=[stop])
        assert cut.choices[0].message.content == answer[: answer.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    finally:
        server.stop()


def test_metrics_in_prometheus_text_format(tiny_server):
    from prometheus_client.parser import text_string_to_metric_families

    tiny_server.request("GET", "/v1/models")
    reply = tiny_server.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(reply.body.decode())}
    assert {"unipic_model_ready", "unipic_requests", "unipic_queue_waiting"} <= set(families)
    [ready] = families["unipic_model_ready"].samples
    assert ready.value == 1.0 and ready.labels == {"model": "tiny-random"}
    assert tiny_server.metrics()["status"] == "ready"  # the JSON view, at /metrics.json


def _serve_mistake(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "unipic", "serve", "--model", "shapes-oracle", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_start_up_mistakes_are_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = _serve_mistake("--port", str(port))
    for result, needle in ((busy, "already in use"), (_serve_mistake("--host", "no-such-host.invalid"), "--host"),
                           (_serve_mistake("--ssl-certfile", "cert.pem"), "go together")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
