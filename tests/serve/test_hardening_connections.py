"""The server hardened (issue 41), beyond test_hardening.py: graceful shutdown, disconnects and the
cancellation of abandoned batches, idle and slow connections, TLS, cross-site form posts, size hints,
chat `stop` streamed, neutral parameter values, and inpainting edits. Every request goes to 127.0.0.1;
every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import (
    ServerProcess,
    assert_openai_error,
    data_url,
    decode_b64_png,
    multipart,
    png_bytes,
)

openai = pytest.importorskip("openai", reason="the openai client (a test dependency) is not installed")

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
CHAT = "/v1/chat/completions"
SMALL = {"prompt": "a red circle", "size": "16x16", "num_inference_steps": 1, "seed": 0}
# About 15 s of work for the tiny model on a busy 2-core machine (0.2 s per sampler step).
LONG = {"prompt": "many shapes", "n": 4, "size": "512x512", "seed": 0, "num_inference_steps": 64}


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "v1", api_key=tiny_server.api_key, max_retries=0, timeout=120)


def _wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _no_tracebacks(server) -> None:
    log = "".join(server.stderr_lines)
    assert "Traceback" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------
# 1. Safe by default: a form POST from another site's page
# ---------------------------------------------------------------------------------------------


def test_a_browser_post_from_another_origin_is_refused(tiny_server):
    """A multipart form is a 'simple' cross-site request (no preflight): the Origin header decides."""
    body, ctype = multipart({"prompt": "make it blue", "size": "16x16", "num_inference_steps": "1"},
                            {"image": ("a.png", png_bytes(Image.new("RGB", (16, 16), "red")), "image/png")})
    reply = tiny_server.request("POST", EDIT, body, {"Content-Type": ctype, "Origin": "http://evil.example"})
    assert_openai_error(reply, 403, code="origin_not_allowed")
    preflight = tiny_server.request("OPTIONS", GEN, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, auth=False)
    assert "access-control-allow-origin" not in preflight.headers  # no CORS unless --allowed-origins
    own = f"http://127.0.0.1:{tiny_server.port}"  # the page at / posts with its own origin
    reply = tiny_server.request("POST", EDIT, body, {"Content-Type": ctype, "Origin": own})
    assert reply.status == 200, reply.body[:300]


# ---------------------------------------------------------------------------------------------
# 3. Disconnects and cancellation
# ---------------------------------------------------------------------------------------------


def test_a_client_that_hangs_up_mid_body_is_not_a_server_error(tiny_server):
    before = tiny_server.metrics()
    for _ in range(2):
        with socket.create_connection((tiny_server.host, tiny_server.port), timeout=30) as sock:
            sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tiny_server.api_key}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n".encode() + b'{"prompt": ')
            time.sleep(0.2)
    _wait_for(lambda: tiny_server.metrics()["client_disconnects"] >= before["client_disconnects"] + 2, 20,
              "counting the disconnects")
    after = tiny_server.metrics()
    assert after["errors"].get("500", 0) == before["errors"].get("500", 0)
    prometheus = tiny_server.request("GET", "/metrics").body.decode()
    assert 'unipic_errors_total{status="500"}' not in prometheus
    _no_tracebacks(tiny_server)


def test_a_batch_whose_clients_all_left_stops_at_its_next_step(tiny_server):
    """The next request does not wait ~15 s behind work nobody will read."""
    before = tiny_server.metrics()["batching"]["interrupted_batches"]
    payload = json.dumps(LONG).encode()
    with socket.create_connection((tiny_server.host, tiny_server.port), timeout=30) as sock:
        sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tiny_server.api_key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        _wait_for(lambda: tiny_server.metrics()["running"] == 1, 60, "the long request starting")
        time.sleep(0.5)
    started = time.monotonic()
    reply = tiny_server.post_json(GEN, SMALL, timeout=60)
    waited = time.monotonic() - started
    assert reply.status == 200, reply.body[:300]
    assert waited < 6.0, f"the next request waited {waited:.1f} s behind an abandoned batch"
    assert tiny_server.metrics()["batching"]["interrupted_batches"] == before + 1
    _no_tracebacks(tiny_server)


# ---------------------------------------------------------------------------------------------
# 4. Size errors suggest a size within the limit
# ---------------------------------------------------------------------------------------------


def test_size_errors_name_size_and_suggest_one_within_the_limit(tiny_server):
    for size, fit in (("1024x1024", "512x512"), ("2048x512", "512x128"), ("640x64", "512x48")):
        error = assert_openai_error(tiny_server.post_json(GEN, {**SMALL, "size": size}), 400, code="invalid_size",
                                    param="size")
        assert f"try {fit}" in error["message"], error
    reply = tiny_server.post_json(GEN, {**SMALL, "size": "512x128"})  # the suggestion is served
    assert reply.status == 200, reply.body[:300]


# ---------------------------------------------------------------------------------------------
# 5. Parameters are honoured or refused
# ---------------------------------------------------------------------------------------------


def _question():
    image = Image.new("RGB", (32, 32), "white")
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


def test_chat_stop_max_tokens_temperature_and_seed_are_honoured(client):
    messages = _question()
    same = {"model": "tiny-random", "messages": messages, "max_tokens": 24, "temperature": 1.0, "seed": 11}
    answers = [client.chat.completions.create(**same).choices[0].message.content for _ in range(2)]
    answer = answers[0]
    assert answers[1] == answer and len(answer) >= 3, answers  # one seed, one sampled answer
    stop = answer[1:3]
    kept = answer[:answer.index(stop)]
    cut = client.chat.completions.create(**same, stop=[stop, "\x01"])
    assert cut.choices[0].message.content == kept and cut.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(**same, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == kept
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
    short = client.chat.completions.create(**{**same, "max_tokens": 2})
    assert short.usage.completion_tokens <= 2 and len(short.choices[0].message.content) < len(answer)


@pytest.mark.parametrize("param, kwargs", [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("logprobs", {"logprobs": True}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("frequency_penalty", {"frequency_penalty": 0.5}),
    ("frobnicate", {"extra_body": {"frobnicate": 1}}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
])
def test_unsupported_chat_parameters_are_refused_by_name(client, param, kwargs):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-random", messages=_question(), max_tokens=2, **kwargs)
    assert refused.value.body["param"] == param, refused.value.body


def test_neutral_values_of_unsupported_parameters_are_accepted(client):
    reply = client.chat.completions.create(model="tiny-random", messages=_question(), max_tokens=2, logprobs=False,
                                           presence_penalty=0.0, response_format={"type": "text"}, user="me")
    assert reply.choices[0].message.content is not None


def test_an_edit_with_a_mask_inpaints_the_transparent_part(client):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 64))  # transparent: redraw the left 16 columns
    result = client.images.edit(image=("in.png", png_bytes(source), "image/png"),
                                mask=("mask.png", png_bytes(mask), "image/png"), prompt="a blue circle", n=2,
                                extra_body={"seed": 4})
    assert len(result.data) == 2 and [d.seed for d in result.data] == [4, 5]
    for item in result.data:
        out = decode_b64_png(item.b64_json)
        assert out.size == (64, 64)
        pixels, original = np.asarray(out.convert("RGB")), np.asarray(source)
        assert np.array_equal(pixels[:, 16:], original[:, 16:]), "pixels outside the mask must be the source's"
        assert not np.array_equal(pixels[:, :16], original[:, :16]), "the masked part was not redrawn"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("in.png", png_bytes(source), "image/png"),
                           mask=("mask.png", png_bytes(mask), "image/png"), prompt="x", size="32x32")
    assert refused.value.body["param"] == "size"


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# The connection options, CORS, hosts, TLS and the access log, on one server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    result = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                             "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                             "-addext", "subjectAltName=IP:127.0.0.1,DNS:unipic.test"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate here: {result.stderr[-300:]}")
    return key, cert


@pytest.fixture(scope="module")
def options_server(tls_files):
    key, cert = tls_files
    context = ssl.create_default_context(cafile=str(cert))
    server = ServerProcess("--model", "tiny-random", "--timeout-keep-alive", "2", "--request-timeout", "2",
                           "--limit-concurrency", "6", "--allowed-origins", "http://app.example",
                           "--allowed-hosts", "127.0.0.1,unipic.test", "--access-log",
                           "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), ssl_context=context)
    yield server
    server.stop()


def _tls_socket(server, timeout: float = 30.0):
    return server.ssl_context.wrap_socket(socket.create_connection((server.host, server.port), timeout=timeout),
                                          server_hostname="127.0.0.1")


def test_tls_hosts_and_the_access_log(options_server):
    server = options_server
    assert server.url.startswith("https://127.0.0.1:")
    assert server.request("GET", "/health").status == 200  # verified against the test certificate
    assert server.request("GET", "/health", headers={"Host": "unipic.test"}).status == 200
    assert_openai_error(server.request("GET", "/health", headers={"Host": "localhost"}), 400, code="invalid_host")
    _wait_for(lambda: any("GET /health" in line for line in server.stdout_lines), 10, "an access-log line")


def test_cors_preflights_are_answered_for_allowed_origins(options_server):
    server = options_server
    preflight = server.request("OPTIONS", GEN, headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, auth=False)
    assert preflight.status == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.example"
    reply = server.request(
        "POST", GEN, json.dumps(SMALL), {"Content-Type": "application/json", "Origin": "http://app.example"})
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == "http://app.example"
    other = server.request("POST", GEN, json.dumps(SMALL), {"Content-Type": "application/json",
                                                            "Origin": "http://evil.example"})
    assert_openai_error(other, 403, code="origin_not_allowed")


def test_idle_and_slow_connections_are_bounded(options_server):
    server = options_server
    # A connection that never sends a request is closed after --timeout-keep-alive.
    with _tls_socket(server) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 10
    # A body that stops arriving gets 408 after --request-timeout.
    with _tls_socket(server) as sock:
        sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.api_key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"prompt"')
        answer, deadline = b"", time.monotonic() + 15
        while time.monotonic() < deadline and b"}}" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    # Beyond --limit-concurrency, uvicorn answers 503 at once.
    held = [_tls_socket(server) for _ in range(6)]
    try:
        reply = server.request("GET", "/health", timeout=10)
        assert reply.status == 503
    finally:
        for sock in held:
            sock.close()
    _wait_for(lambda: server.request("GET", "/health").status == 200, 10, "the server accepting again", poll=0.3)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# 2. Graceful shutdown
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # its own server, and a batch of several seconds
def test_sigterm_finishes_or_stops_work_and_answers_the_rest_503():
    server = ServerProcess("--model", "tiny-random", "--max-batch", "1", "--max-side", "512", "--max-steps", "64",
                           "--shutdown-timeout", "2")
    replies: dict[str, object] = {}

    def post(name: str, payload: dict) -> None:
        try:
            replies[name] = server.post_json(GEN, payload, timeout=60)
        except Exception as error:  # noqa: BLE001 - recorded for the assertion
            replies[name] = error

    try:
        idle = server.connection(timeout=30)  # a keep-alive connection, idle when the signal comes
        idle.request("GET", "/health", headers=server.auth())
        assert idle.getresponse().read()
        running = threading.Thread(target=post, args=("running", LONG))
        running.start()
        _wait_for(lambda: server.metrics()["running"] == 1, 60, "the long request starting")
        waiting = threading.Thread(target=post, args=("waiting", {**SMALL, "seed": 3}))
        waiting.start()
        _wait_for(lambda: server.metrics()["queue_waiting"] == 1, 30, "the second request queueing")
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        waiting.join(timeout=30)
        assert_openai_error(replies["waiting"], 503, code="shutting_down")
        idle.request("POST", GEN, json.dumps(SMALL), {**server.auth(), "Content-Type": "application/json"})
        response = idle.getresponse()
        assert response.status == 503 and json.loads(response.read())["error"]["code"] == "shutting_down"
        running.join(timeout=60)
        assert_openai_error(replies["running"], 503, code="shutting_down")  # stopped after --shutdown-timeout
        server.process.wait(timeout=30)
        took = time.monotonic() - signalled
        assert took < 8, f"the server took {took:.1f} s to exit"
        assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
        _no_tracebacks(server)
    finally:
        server.stop()
