"""Under load: 16 concurrent clients against a queue bound smaller than the load.

Every answer is 200 or 503 (with Retry-After), none is lost or mixed up (each client checks its
images against the same prompt and seed drawn alone in this process), resident memory stays
bounded, the queue never grows past its bound, and /metrics shows batches of several requests.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from serve_helpers import ServerProcess, data_url, decode_b64_png, multipart, png_bytes

pytestmark = pytest.mark.slow  # sixteen concurrent clients against a real server

CLIENTS = 16
REQUESTS_PER_CLIENT = 4
MAX_QUEUE = 4
MAX_BATCH = 4
SIZE = 32
STEPS = 2


@pytest.fixture(scope="module")
def server_dirs(tmp_path_factory):
    """An empty working folder and temp folder for the server: they must stay empty."""
    root = tmp_path_factory.mktemp("server-cwd")
    (root / "tmp").mkdir()
    return root


@pytest.fixture(scope="module")
def load_server(server_dirs):
    """The tiny model with a small queue (4) and batch (4), so 16 clients overrun it."""
    server = ServerProcess("--model", "tiny-random", "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                           "--batch-wait-ms", "30", api_key=None, cwd=server_dirs,
                           extra_env={"TMPDIR": str(server_dirs / "tmp")})
    yield server
    server.stop()


def _prompt(client: int, index: int) -> tuple[str, int]:
    return f"client {client} request {index}: {['a red circle', 'two blue stars', 'a green square'][client % 3]}", \
        1000 * client + index


class Sampler(threading.Thread):
    """Samples the server's RSS and queue depth until stopped."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.rss: list[int] = []
        self.waiting: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.rss.append(self.server.rss_kib())
            try:
                self.waiting.append(self.server.metrics()["queue_waiting"])
            except OSError:
                pass
            time.sleep(0.05)


def test_sixteen_clients_every_answer_accounted_for(load_server, reference_pipeline):
    server = load_server
    for k in range(3):  # warm up (first calls allocate caches), then take the memory baseline
        assert server.post_json("/v1/images/generations", {"prompt": "warm up", "size": f"{SIZE}x{SIZE}", "seed": k,
                                                           "num_inference_steps": STEPS}).status == 200
    baseline_kib = server.rss_kib()
    before = server.metrics()["batching"]
    sampler = Sampler(server)
    sampler.start()

    results: dict[tuple[int, int], tuple[int, dict, dict]] = {}
    failures: list[str] = []
    start = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        try:
            start.wait(timeout=60)
            for r in range(REQUESTS_PER_CLIENT):
                prompt, seed = _prompt(c, r)
                reply = server.post_json("/v1/images/generations",
                                         {"prompt": prompt, "seed": seed, "size": f"{SIZE}x{SIZE}",
                                          "num_inference_steps": STEPS}, timeout=120)
                results[(c, r)] = (reply.status, reply.headers, reply.json())
        except Exception as error:  # a lost answer (timeout, reset) fails the test below
            failures.append(f"client {c}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    sampler.done.set()
    sampler.join(timeout=10)

    assert not failures, failures
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT, "every request must get an answer"
    statuses = [status for status, _, _ in results.values()]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1, "the queue bound (4) is smaller than the load (16): some must be refused"
    assert statuses.count(200) >= CLIENTS, statuses

    for (c, r), (status, headers, body) in sorted(results.items()):
        if status == 503:
            assert int(headers["retry-after"]) >= 1
            assert body["error"]["code"] == "server_busy" and body["error"]["type"] == "server_error"
            continue
        prompt, seed = _prompt(c, r)
        [item] = body["data"]
        image = decode_b64_png(item["b64_json"])
        # The image carries this client's prompt and seed ...
        assert (image.text["prompt"], image.text["seed"], item["seed"]) == (prompt, str(seed), seed)
        # ... and is the image this prompt and seed give alone (batching changed nothing but rounding).
        [[alone]] = reference_pipeline.text_to_image([prompt], seed=seed, height=SIZE, width=SIZE, steps=STEPS)
        difference = np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - np.asarray(alone, dtype=np.int16))
        assert difference.max() <= 3, (c, r, int(difference.max()))

    after = server.metrics()
    batching = after["batching"]
    print(f"\n200: {statuses.count(200)}, 503: {statuses.count(503)}, batches: {batching['batch_sizes']}, "
          f"rss +{(max(sampler.rss) - baseline_kib) / 1024:.0f} MiB, most waiting: {max(sampler.waiting, default=0)}")
    assert after["queue_waiting"] == 0 and after["running"] == 0
    assert max(sampler.waiting, default=0) <= MAX_QUEUE, "the queue grew past its bound"
    assert batching["rejected_busy"] - before["rejected_busy"] == statuses.count(503)
    assert batching["completed"] - before["completed"] == statuses.count(200)
    sizes = {int(k): v for k, v in batching["batch_sizes"].items()}
    assert max(sizes) >= 2, f"no batch held more than one request: {sizes}"
    assert max(sizes) <= MAX_BATCH, sizes
    grown_mib = (max(sampler.rss) - baseline_kib) / 1024
    assert grown_mib < 300, f"resident memory grew by {grown_mib:.0f} MiB under load"
    assert server.request("GET", "/health").status == 200


def test_a_disconnected_client_frees_its_slot(load_server):
    server = load_server
    finished = threading.Event()

    def long_request() -> None:
        try:
            server.post_json("/v1/images/generations", {"prompt": "many shapes", "n": 4, "size": "256x256",
                                                        "seed": 0, "num_inference_steps": 48}, timeout=300)
        finally:
            finished.set()

    before = server.metrics()["batching"]["cancelled_waiting"]
    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while server.metrics()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metrics()["running"] == 1, "the long request never started"
        payload = json.dumps({"prompt": "I will hang up", "size": "32x32", "seed": 1}).encode()
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            while server.metrics()["queue_waiting"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.metrics()["queue_waiting"] == 1, "the second request never queued"
        # The socket is closed: the waiting request goes while the long one still runs.
        while server.metrics()["queue_waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        metrics = server.metrics()
        assert metrics["queue_waiting"] == 0
        assert metrics["batching"]["cancelled_waiting"] == before + 1
        assert not finished.is_set(), "the long request ended too early to show the slot freed while busy"
    finally:
        worker.join(timeout=300)


def test_edits_and_chat_batch_too(load_server, reference_pipeline):
    """Edits (multipart) and chat answers from concurrent clients are batched and stay with their client."""
    server = load_server
    colors = ["red", "blue", "green", "yellow"]
    sources = {c: reference_pipeline.text_to_image([f"a {c} circle"], seed=i, height=32, width=32, steps=2)[0][0]
               for i, c in enumerate(colors)}
    out: dict[str, tuple] = {}

    def edit(color: str, seed: int) -> None:
        body, ctype = multipart({"prompt": f"make it {color}", "size": "32x32", "seed": str(seed),
                                 "num_inference_steps": "2"}, {"image": ("s.png", png_bytes(sources[color]), "image/png")})
        reply = server.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
        out[f"edit-{color}"] = (reply.status, reply.json())

    def ask(color: str) -> None:
        reply = server.post_json("/v1/chat/completions", {"model": "tiny-random", "max_tokens": 6, "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"Is this {color}?"},
                                         {"type": "image_url", "image_url": {"url": data_url(sources[color])}}]}]})
        out[f"chat-{color}"] = (reply.status, reply.json())

    threads = [threading.Thread(target=edit, args=(c, 50 + i)) for i, c in enumerate(colors)]
    threads += [threading.Thread(target=ask, args=(c,)) for c in colors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(out) == 8
    for i, color in enumerate(colors):
        status, body = out[f"edit-{color}"]
        if status == 503:
            continue
        assert status == 200
        image = decode_b64_png(body["data"][0]["b64_json"])
        assert image.text["instruction"] == f"make it {color}" and image.text["seed"] == str(50 + i)
        [alone] = reference_pipeline.edit_image([sources[color]], [f"make it {color}"], seed=50 + i, height=32,
                                                width=32, steps=2)
        assert np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(alone, np.int16)).max() <= 3
        status, body = out[f"chat-{color}"]
        if status == 200:
            [expected] = reference_pipeline.image_to_text([sources[color]], [f"Is this {color}?"], max_new_tokens=6)
            assert body["choices"][0]["message"]["content"] == expected


def test_nothing_is_written_to_disk(load_server, server_dirs):
    """A 3 MB upload (Starlette's form parser would spool it to a temp file) and the answers write nothing.

    Checked two ways: no file appears in the server's working or temp folder, and the kernel's count
    of bytes the server process sent to storage does not grow (an unlinked temp file counts there).
    """
    from PIL import Image

    def edit(data: bytes) -> None:
        body, ctype = multipart({"prompt": "make it calm", "size": "32x32", "seed": "1", "num_inference_steps": "2"},
                                {"image": ("big.png", data, "image/png")})
        reply = load_server.request("POST", "/v1/images/edits", body, {"Content-Type": ctype})
        assert reply.status == 200, reply.body[:300]

    edit(png_bytes(Image.new("RGB", (64, 64), "red")))  # warm-up: lazy imports are done before measuring
    # Loading the model may leave torch's empty cache folder (torchinductor_<user>) in TMPDIR: that
    # is the library at start-up, not the server answering, so the folders are compared from here.
    existing = {str(p.relative_to(server_dirs)) for p in server_dirs.rglob("*")}
    big = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)))
    assert len(big) > 2_000_000
    written = load_server.written_bytes()
    edit(big)
    assert load_server.post_json("/v1/images/generations", {"prompt": "a circle", "size": "32x32",
                                                            "seed": 2}).status == 200
    assert load_server.written_bytes() - written < 64 * 1024, "the server wrote to storage while answering"
    new_files = sorted({str(p.relative_to(server_dirs)) for p in server_dirs.rglob("*")} - existing)
    assert new_files == [], new_files
    assert not [p for p in existing if p.startswith("tmp/") and (server_dirs / p).is_file()], existing
