"""The batcher on its own (a fake runner, no HTTP), and the server's loading/failed states in-process."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import pytest

from unipic.serve.batching import Batcher
from unipic.serve.errors import APIError
from unipic.serve.limits import ServeLimits


def _run(coroutine):
    return asyncio.run(coroutine)


class Recorder:
    """A runner that records each batch and answers every job with its payload."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list] = []
        self.delay = delay

    def __call__(self, jobs):
        self.batches.append([job.payload for job in jobs])
        time.sleep(self.delay)
        return [f"done {job.payload}" for job in jobs]


def test_compatible_jobs_share_a_batch_within_the_row_limit():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, ServeLimits(max_batch=4, max_queue=16, batch_wait_ms=50))
        batcher.start()
        jobs = [batcher.submit("generate", "A", 1, f"a{i}") for i in range(3)]
        jobs += [batcher.submit("generate", "B", 1, "b0"), batcher.submit("generate", "A", 2, "a3")]
        results = await asyncio.gather(*(job.future for job in jobs))
        await batcher.stop()
        return recorder.batches, results, batcher.stats

    batches, results, stats = _run(scenario())
    assert results == ["done a0", "done a1", "done a2", "done b0", "done a3"]  # each answer to its own job
    assert batches[0] == ["a0", "a1", "a2"]  # a3 (2 rows) would make 5 > 4 rows
    assert ["b0"] in batches and ["a3"] in batches
    assert all(len({p[0] for p in batch}) == 1 for batch in batches), "keys never mix"
    assert stats.batch_sizes[3] == 1 and stats.completed == 5


def test_a_full_queue_answers_503_with_retry_after():
    async def scenario():
        batcher = Batcher(Recorder(delay=0.3), ServeLimits(max_batch=1, max_queue=2, batch_wait_ms=0))
        batcher.start()
        first = batcher.submit("generate", "A", 1, "running")
        await asyncio.sleep(0.1)  # the first job is now running, the queue is empty
        waiting = [batcher.submit("generate", "A", 1, f"w{i}") for i in range(2)]
        with pytest.raises(APIError) as refused:
            batcher.submit("generate", "A", 1, "one too many")
        await asyncio.gather(first.future, *(job.future for job in waiting))
        await batcher.stop()
        return refused.value, batcher.stats

    error, stats = _run(scenario())
    assert error.status == 503 and error.code == "server_busy" and int(error.headers["Retry-After"]) >= 1
    assert stats.rejected_busy == 1 and stats.completed == 3


def test_cancelling_a_waiting_job_frees_its_slot():
    async def scenario():
        recorder = Recorder(delay=0.3)
        batcher = Batcher(recorder, ServeLimits(max_batch=1, max_queue=1, batch_wait_ms=0))
        batcher.start()
        first = batcher.submit("generate", "A", 1, "running")
        await asyncio.sleep(0.1)
        gone = batcher.submit("generate", "A", 1, "client left")
        batcher.cancel(gone)
        replacement = batcher.submit("generate", "A", 1, "next")  # the slot is free again
        await asyncio.gather(first.future, replacement.future)
        await batcher.stop()
        return recorder.batches, batcher.stats

    batches, stats = _run(scenario())
    assert batches == [["running"], ["next"]] and stats.cancelled_waiting == 1


def test_a_runner_failure_reaches_every_job_and_the_worker_survives():
    calls = []

    def runner(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ["ok"] * len(jobs)

    async def scenario():
        batcher = Batcher(runner, ServeLimits(max_batch=2, max_queue=4, batch_wait_ms=20))
        batcher.start()
        failed = [batcher.submit("chat", "k", 1, i) for i in range(2)]
        outcomes = await asyncio.gather(*(job.future for job in failed), return_exceptions=True)
        later = batcher.submit("chat", "k", 1, "after")
        result = await later.future
        await batcher.stop()
        return outcomes, result

    outcomes, result = _run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes) and result == "ok"


# ---------------------------------------------------------------------------------------------
# The app in this process, over the Shapes oracle (no model weights), on a loopback port
# ---------------------------------------------------------------------------------------------


class InProcessServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def get(self, path: str, method: str = "GET", body: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, json.dumps(body) if body is not None else None,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            connection.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_health_says_loading_until_the_model_is_ready():
    from unipic.serve.app import create_app
    from unipic.world.oracle import ShapesOracle

    gate = threading.Event()
    ready = threading.Event()

    def slow_load():
        assert gate.wait(30)
        return ShapesOracle()

    server = InProcessServer(create_app(slow_load, model_name="shapes-oracle", on_ready=ready.set))
    try:
        status, headers, body = server.get("/health")
        assert (status, body["status"]) == (503, "loading") and headers["retry-after"] == "5"
        status, _, body = server.get("/v1/images/generations", "POST", {"prompt": "a red circle"})
        assert status == 503 and body["error"]["code"] == "model_loading"
        gate.set()
        assert ready.wait(30)
        assert server.get("/health")[:1] == (200,)
        status, _, body = server.get("/v1/images/generations", "POST",
                                     {"prompt": "a red circle", "size": "64x64", "seed": 1})
        assert status == 200 and body["size"] == "64x64"
    finally:
        gate.set()
        server.stop()


def test_a_failed_load_is_reported():
    from unipic.api import UserError
    from unipic.serve.app import create_app

    failures = []

    def broken_load():
        raise UserError("--model nowhere: no such folder")

    server = InProcessServer(create_app(broken_load, model_name="nowhere", on_failed=failures.append))
    try:
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert failures == ["--model nowhere: no such folder"]
        status, _, body = server.get("/health")
        assert (status, body["status"], body["error"]) == (503, "failed", "--model nowhere: no such folder")
        status, _, body = server.get("/v1/images/generations", "POST", {"prompt": "x"})
        assert status == 503 and body["error"]["code"] == "model_failed"
    finally:
        server.stop()


def test_a_model_that_cannot_do_a_task_says_so():
    """UniPic-2 Kontext cannot caption; the oracle stands in here for 'a family that refuses a task'."""
    from unipic.api import UnsupportedTaskError
    from unipic.serve.app import create_app
    from unipic.world.oracle import ShapesOracle

    class NoCaptions(ShapesOracle):
        def image_to_text(self, images, questions, **kwargs):
            raise UnsupportedTaskError("this model only generates and edits images")

    ready = threading.Event()
    server = InProcessServer(create_app(NoCaptions, model_name="m", on_ready=ready.set))
    try:
        assert ready.wait(30)
        import base64
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        status, _, body = server.get("/v1/chat/completions", "POST", {"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert status == 400 and body["error"]["code"] == "unsupported_task"
        assert "only generates and edits" in body["error"]["message"]
    finally:
        server.stop()


@pytest.mark.slow  # end to end in a subprocess; the default tier keeps in-process coverage
def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "unipic", "serve", "--model", str(tmp_path / "missing"),
                             "--port", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unipic serve: error: --model"), result.stderr
    bad = subprocess.run([sys.executable, "-m", "unipic", "serve", "--max-queue", "0"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "max_queue must be at least 1" in bad.stderr
