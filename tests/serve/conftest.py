"""Fixtures for the server tests: one `unipic serve` subprocess per module, on a free loopback port."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("python_multipart", reason="the serve extra (python-multipart) is not installed")

from serve_helpers import ServerProcess  # noqa: E402

# Small limits, so each limit can be crossed cheaply in a test.
TINY_SERVER_ARGS = ("--model", "tiny-random", "--max-upload-mb", "1", "--max-image-pixels", "1000000",
                    "--max-side", "512", "--max-n", "4", "--max-steps", "64", "--max-prompt-chars", "500",
                    "--max-tokens", "64", "--batch-wait-ms", "20")


@pytest.fixture(scope="session")
def tiny_server():
    """A server over the tiny random model, with an API key and small limits (shared by the modules)."""
    server = ServerProcess(*TINY_SERVER_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_pipeline():
    """The same tiny random model in this process (its weights are deterministic), for reference images."""
    import torch

    from unipic.loading import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline("tiny-random", device="cpu")
