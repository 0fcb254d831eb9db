"""The bounds a server puts on requests; every one is a `unipic serve` option."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeLimits:
    """Configurable limits of `unipic serve` (defaults suit one model on one machine)."""

    max_upload_bytes: int = 16 * 1024 * 1024  # an uploaded image file, before decoding
    max_image_pixels: int = 4096 * 4096  # an uploaded image, decoded (decompression bombs stop here)
    max_side: int = 2048  # longest side of an output image
    max_n: int = 4  # images per request
    max_steps: int = 200  # sampling steps per request
    max_prompt_chars: int = 4000  # prompt, instruction or question
    max_tokens: int = 1024  # longest answer of /v1/chat/completions
    max_batch: int = 8  # images (or answers) in one pipeline call; 1 turns batching off
    max_queue: int = 64  # requests waiting beyond the running batch; more are answered 503
    batch_wait_ms: float = 5.0  # how long a lone request waits for companions before running

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_image_pixels", "max_side", "max_n", "max_steps", "max_prompt_chars",
                     "max_tokens", "max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: an upload sent as base64 (4/3 larger) plus room for the other fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024
