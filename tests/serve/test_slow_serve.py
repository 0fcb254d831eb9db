"""Slow server checks (`pytest -m slow`): the embedded model under mixed load, and the benchmark end to end."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import ServerProcess, data_url, decode_b64_png, multipart, png_bytes

pytestmark = pytest.mark.slow

CLIENTS = 16
ROUNDS = 3


@pytest.fixture(scope="module")
def default_pipeline():
    import torch

    from unipic.loading import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline("default", device="cpu")


def test_embedded_model_under_mixed_load(default_pipeline):
    """16 clients mixing generations, edits and questions on the embedded model, queue bound 6."""
    server = ServerProcess("--model", "default", "--max-batch", "8", "--max-queue", "6", "--batch-wait-ms", "20",
                           api_key=None)
    try:
        source = default_pipeline.text_to_image(["a red circle left of a blue star"], seed=0, height=64, width=64,
                                                steps=8)[0][0]
        server.post_json("/v1/images/generations", {"prompt": "warm up", "size": "64x64", "num_inference_steps": 8})
        baseline_kib = server.rss_kib()
        peak = [baseline_kib]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(server.rss_kib())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        answers: dict[tuple[int, int], tuple[str, int, dict, dict]] = {}
        errors: list[str] = []

        def client(c: int) -> None:
            rng = random.Random(c)
            try:
                for r in range(ROUNDS):
                    kind = ["generate", "edit", "chat"][(c + r) % 3]
                    seed = 100 * c + r
                    if kind == "generate":
                        reply = server.post_json("/v1/images/generations", {
                            "prompt": f"a {rng.choice(['red', 'blue', 'green'])} circle", "size": "64x64",
                            "seed": seed, "num_inference_steps": 8}, timeout=600)
                    elif kind == "edit":
                        body, ctype = multipart({"prompt": "Change the color of the circle to green.", "size": "64x64",
                                                 "seed": str(seed), "num_inference_steps": "8"},
                                                {"image": ("s.png", png_bytes(source), "image/png")})
                        reply = server.request("POST", "/v1/images/edits", body, {"Content-Type": ctype}, timeout=600)
                    else:
                        reply = server.post_json("/v1/chat/completions", {"model": "default", "messages": [
                            {"role": "user", "content": [{"type": "text", "text": "What color is the circle?"},
                                                         {"type": "image_url", "image_url": {"url": data_url(source)}}]}]},
                            timeout=600)
                    answers[(c, r)] = (kind, seed, reply.headers, {"status": reply.status, **reply.json()})
            except Exception as error:
                errors.append(f"client {c}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=900)
        stop.set()
        assert not errors, errors
        assert len(answers) == CLIENTS * ROUNDS
        statuses = [a[3]["status"] for a in answers.values()]
        assert set(statuses) <= {200, 503} and 200 in statuses
        [expected_answer] = default_pipeline.image_to_text([source], ["What color is the circle?"])
        for (c, r), (kind, seed, headers, body) in answers.items():
            if body["status"] == 503:
                assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "server_busy"
            elif kind == "chat":
                assert body["choices"][0]["message"]["content"] == expected_answer
            else:
                image = decode_b64_png(body["data"][0]["b64_json"])
                assert image.size == (64, 64) and image.text["seed"] == str(seed)
                if kind == "generate":
                    [[alone]] = default_pipeline.text_to_image([image.text["prompt"]], seed=seed, height=64, width=64,
                                                               steps=8)
                else:
                    [alone] = default_pipeline.edit_image([source], [image.text["instruction"]], seed=seed,
                                                          height=64, width=64, steps=8)
                difference = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(alone, np.int16))
                assert difference.max() <= 4, (kind, c, r, int(difference.max()))
        metrics = server.metrics()
        assert metrics["queue_waiting"] == 0
        assert metrics["batching"]["max_batch_size_seen"] >= 2
        assert (max(peak) - baseline_kib) / 1024 < 500
    finally:
        server.stop()


def test_serve_benchmark_runs_end_to_end(tmp_path, capsys):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "serve.json"
    assert benchmark.main(["--model", "tiny-random", "--size", "32", "--steps", "2", "--requests", "8",
                           "--clients", "1", "4", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| sequential CLI-style calls | 1 |" in table and "batching on" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(row["rps"] > 0 and row["p95_ms"] >= row["p50_ms"] for row in rows)
