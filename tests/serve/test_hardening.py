"""The server hardened (issue 41): safe by default, graceful shutdown, disconnects and cancellation,
every malformed request a 4xx, parameters honoured or refused, Prometheus metrics, one-line start-up
errors. Every request goes to 127.0.0.1; every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serve_helpers import (
    SRC,
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


def _raw(server, request: bytes, *, timeout: float = 30.0) -> bytes:
    """Send raw bytes, read until the server closes (bounded)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _no_tracebacks(server) -> None:
    log = "".join(server.stderr_lines)
    assert "Traceback" not in log, log[-3000:]


# ---------------------------------------------------------------------------------------------
# 1. Safe by default
# ---------------------------------------------------------------------------------------------


def test_json_endpoints_answer_415_to_other_content_types(tiny_server):
    """text/plain is what a cross-site page can send without a preflight: it must not start work."""
    for path, payload in ((GEN, SMALL), (CHAT, {"messages": []})):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": ctype} if ctype else {}
            reply = tiny_server.request("POST", path, json.dumps(payload), headers)
            assert_openai_error(reply, 415, code="unsupported_media_type")
    reply = tiny_server.request("POST", GEN, json.dumps(SMALL), {"Content-Type": "application/json; charset=utf-8"})
    assert reply.status == 200


def test_the_host_header_must_name_the_server(tiny_server):
    """DNS rebinding: a page at evil.example resolving to 127.0.0.1 sends `Host: evil.example`."""
    for host in ("evil.example", f"evil.example:{tiny_server.port}", "127.0.0.1.evil.example"):
        reply = tiny_server.request("GET", "/v1/models", headers={"Host": host})
        assert_openai_error(reply, 400, code="invalid_host")
    for host in (f"127.0.0.1:{tiny_server.port}", f"localhost:{tiny_server.port}", "localhost", f"[::1]:{tiny_server.port}"):
        assert tiny_server.request("GET", "/v1/models", headers={"Host": host}).status == 200


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
# 4. Every malformed request is a 4xx
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [990, 5000, 100_000])
def test_deeply_nested_json_is_a_400(tiny_server, depth):
    for path, body in ((GEN, "[" * depth + "]" * depth),
                       (CHAT, '{"messages": ' + "[" * depth + "]" * depth + "}"),
                       (GEN, '{"prompt": "x", "user": ' + '{"a": ' * depth + "1" + "}" * depth + "}")):
        reply = tiny_server.request("POST", path, body, {"Content-Type": "application/json"})
        assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
        assert_openai_error(reply, reply.status)
    assert tiny_server.metrics()["errors"].get("500", 0) == 0
    _no_tracebacks(tiny_server)


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


@pytest.mark.parametrize("param, kwargs", [
    ("style", {"style": "vivid"}),
    ("quality", {"quality": "hd"}),
    ("sharpness", {"extra_body": {"sharpness": 3, "seed": 1}}),
])
def test_unsupported_image_parameters_are_refused_by_name(client, param, kwargs):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a circle", size="16x16", **kwargs)
    assert refused.value.body["param"] == param, refused.value.body


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
# 6. Monitoring
# ---------------------------------------------------------------------------------------------


def test_metrics_are_in_prometheus_text_format(tiny_server):
    from prometheus_client.parser import text_string_to_metric_families

    assert tiny_server.post_json(GEN, SMALL).status == 200
    reply = tiny_server.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    assert families["unipic_ready"].samples[0].value == 1
    requests = {s.labels["endpoint"]: s.value for s in families["unipic_requests"].samples
                if s.name == "unipic_requests_total"}
    assert requests["images.generations"] >= 1
    assert families["unipic_batch_requests"].type == "histogram"
    count = [s.value for s in families["unipic_batch_requests"].samples if s.name.endswith("_count")]
    assert count and count[0] >= 1
    assert {"unipic_queue_waiting", "unipic_running", "unipic_jobs", "unipic_client_disconnects",
            "unipic_batches_interrupted", "unipic_model_busy_seconds"} <= set(families)
    assert tiny_server.metrics()["batching"]["completed"] >= 1  # the JSON view, at /metrics.json


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
    server = ServerProcess("--model", "tiny-random", "--timeout-keep-alive", "1.5", "--request-timeout", "2",
                           "--max-connections", "6", "--allowed-origins", "http://app.example",
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
    # Beyond --max-connections, uvicorn answers 503 at once.
    held = [_tls_socket(server) for _ in range(6)]
    try:
        reply = server.request("GET", "/health", timeout=10)
        assert reply.status == 503
    finally:
        for sock in held:
            sock.close()
    _wait_for(lambda: server.request("GET", "/health").status == 200, 10, "the server accepting again", poll=0.3)


# ---------------------------------------------------------------------------------------------
# 7. Start-up errors are one line
# ---------------------------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "unipic", "serve", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_port_in_use_or_a_bad_host_is_one_line_before_the_model_loads(tmp_path):
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail with a different message
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve("--model", missing_model, "--host", "127.0.0.1", "--port", str(port))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("unipic serve: error: port ") and "in use" in lines[0], lines
    result = _serve("--model", missing_model, "--host", "192.0.2.1", "--port", "0")  # TEST-NET: not this machine
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("unipic serve: error: --host 192.0.2.1"), lines


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
