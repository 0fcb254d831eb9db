"""Cooperative interruption of a running sampler, checked once per step.

A caller that may want to stop a long computation early (the server, when every client of a batch
has gone or the process is shutting down) runs it inside `interruptible(should_stop)`. The sampler
loops call `check_interrupt()` once per step; when `should_stop()` says so it raises `Interrupted`,
which unwinds the computation at once. Outside `interruptible` the check costs one attribute read.

`Interrupted` derives from `BaseException`, like `KeyboardInterrupt`, so `except Exception`
fallbacks inside libraries do not swallow it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_local = threading.local()


class Interrupted(BaseException):
    """The computation was stopped between two sampler steps."""


@contextmanager
def interruptible(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Within this block (on this thread), `check_interrupt()` raises `Interrupted` once `should_stop()` is true."""
    previous = getattr(_local, "should_stop", None)
    _local.should_stop = should_stop
    try:
        yield
    finally:
        _local.should_stop = previous


def check_interrupt() -> None:
    """Raise `Interrupted` when the enclosing `interruptible` block asks to stop (a sampler calls this per step)."""
    should_stop = getattr(_local, "should_stop", None)
    if should_stop is not None and should_stop():
        raise Interrupted()
