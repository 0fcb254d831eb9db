"""A bounded queue that groups compatible requests into one pipeline call, run off the event loop.

Each request becomes a `Job` with a compatibility key (task, size and sampling settings) and a
row count (the images or answers it adds to a batch). One asyncio task takes the oldest waiting
job, waits up to `batch_wait_ms` for companions when it is alone, then takes every waiting job with
the same key, oldest first, while the rows fit in `max_batch`. The batch runs in a single worker
thread (the model runs one batch at a time), so the event loop keeps answering `/health`, new
requests and disconnects while the model works.

Admission is bounded: with `max_queue` jobs already waiting, a new one is refused at once with 503
and a `Retry-After` estimated from recent batch times, rather than growing memory and latency
without limit. A job whose client disconnects while it waits is removed, freeing its slot; when
every client of the running batch has gone, the batch stops at its next sampler step
(`unipic.interrupt`), so the next request does not wait behind work nobody will read.

Shutting down (`begin_shutdown`, then `drain`): new and waiting jobs are answered 503
`shutting_down` at once, the running batch may finish within the shutdown timeout, and is then
stopped at its next sampler step, its clients answered 503 `shutting_down` too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from unipic.interrupt import Interrupted, interruptible
from unipic.serve.errors import APIError, busy
from unipic.serve.limits import ServeLimits

logger = logging.getLogger("unipic.serve")
_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch."""

    kind: str
    key: Hashable
    rows: int
    payload: Any
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_ids))
    abandoned: bool = False  # the client went away while the job ran


@dataclass
class BatchStats:
    """Counters the server reports at /metrics (the load test reads the batch sizes from here)."""

    admitted: int = 0
    rejected_busy: int = 0
    cancelled_waiting: int = 0
    abandoned_running: int = 0
    interrupted_batches: int = 0  # stopped at a sampler step: every client gone, or shutting down
    completed: int = 0
    failed: int = 0
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # requests per batch -> how many batches
    batch_rows: Counter = field(default_factory=Counter)  # images/answers per batch -> how many batches
    busy_seconds: float = 0.0
    recent_batch_seconds: float = 0.0  # moving average, for Retry-After

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {"admitted": self.admitted, "rejected_busy": self.rejected_busy,
                "cancelled_waiting": self.cancelled_waiting, "abandoned_running": self.abandoned_running,
                "interrupted_batches": self.interrupted_batches,
                "completed": self.completed, "failed": self.failed, "batches": self.batches,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "batch_rows": {str(k): v for k, v in sorted(self.batch_rows.items())},
                "max_batch_size_seen": max(self.batch_sizes, default=0),
                "busy_seconds": round(self.busy_seconds, 3),
                "recent_batch_seconds": round(self.recent_batch_seconds, 3)}


Runner = Callable[[Sequence[Job]], list[Any]]


class Batcher:
    """The queue and its worker; `runner(jobs)` returns one result (or an exception) per job."""

    def __init__(self, runner: Runner, limits: ServeLimits) -> None:
        self.runner = runner
        self.limits = limits
        self.stats = BatchStats()
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._running: list[Job] = []
        self._current: asyncio.Future | None = None  # the running batch, on the model thread
        self._task: asyncio.Task | None = None
        self.closing = False  # shutting down: no new work, waiting work answered 503
        self._interrupt = False  # stop the running batch at its next sampler step
        # One thread: the pipeline is not made for concurrent calls, and the device runs one batch anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unipic-model")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._work(), name="unipic-batcher")

    def begin_shutdown(self) -> None:
        """Refuse new jobs and answer the waiting ones 503 `shutting_down`; the running batch goes on."""
        self.closing = True
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(shutting_down())
        self._arrived.set()

    async def drain(self, timeout: float) -> None:
        """Let the running batch finish within `timeout` seconds, then stop it at its next sampler step."""
        self.begin_shutdown()
        current = self._current
        if current is None or current.done():
            return
        await asyncio.wait({current}, timeout=max(0.0, timeout))
        if not current.done():
            logger.warning("shutdown: stopping the running batch at its next step (--shutdown-timeout %g s passed)",
                           timeout)
            self._interrupt = True
            await asyncio.wait({current}, timeout=30.0)  # one sampler step; bounded all the same

    async def stop(self) -> None:
        """Stop the worker; waiting jobs are answered 503, a running batch stops at its next step."""
        self.begin_shutdown()
        self._interrupt = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, function: Callable[[], Any]) -> asyncio.Future:
        """Run `function` on the model thread (loading, warm-up), between batches."""
        return asyncio.get_running_loop().run_in_executor(self._executor, function)

    # -- admission -------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Jobs in the queue (not yet in a batch)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Jobs in the batch the model is working on."""
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the batches ahead times the recent batch time."""
        per_batch = self.stats.recent_batch_seconds or 1.0
        batches_ahead = 1 + math.ceil(len(self._queue) / max(1, self.limits.max_batch))
        return max(1, min(120, math.ceil(per_batch * batches_ahead)))

    def submit(self, kind: str, key: Hashable, rows: int, payload: Any) -> Job:
        """Queue a job, or raise a 503 `APIError` with Retry-After when `max_queue` jobs already wait."""
        if self.closing:
            raise shutting_down()
        if len(self._queue) >= self.limits.max_queue:
            self.stats.rejected_busy += 1
            wait = self.retry_after()
            raise busy(f"the server is busy: {len(self._queue)} requests are already waiting (the limit is "
                       f"{self.limits.max_queue}); retry in about {wait} s", wait)
        job = Job(kind, (kind, key), rows, payload)
        self._queue.append(job)
        self.stats.admitted += 1
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it still waits (its slot frees at once)."""
        try:
            self._queue.remove(job)
            self.stats.cancelled_waiting += 1
            logger.info("request %d cancelled while waiting (client disconnected)", job.id)
        except ValueError:
            if not job.future.done() and not job.abandoned:
                job.abandoned = True
                self.stats.abandoned_running += 1
                if self._running and all(j.abandoned for j in self._running):
                    logger.info("every client of the running batch has gone: it stops at its next step")
        if not job.future.done():
            job.future.cancel()

    # -- the worker ------------------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._queue[0]
            await self._gather_companions(first)
            batch = self._take(first)
            if not batch:
                continue
            self._running = batch
            started = time.monotonic()
            try:
                self._current = loop.run_in_executor(self._executor, self._run, batch)
                results = await asyncio.shield(self._current)  # a cancelled worker leaves the batch to stop
            except Exception as error:  # the executor itself failed (e.g. shut down)
                results = [error] * len(batch)
            finally:
                self._running = []
            self._record(batch, time.monotonic() - started)
            for job, result in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    self.stats.failed += 1
                    job.future.set_exception(result)
                else:
                    self.stats.completed += 1
                    job.future.set_result(result)

    async def _gather_companions(self, first: Job) -> None:
        """Wait (at most `batch_wait_ms` after the first job arrived) while its batch could still grow."""
        deadline = first.enqueued + self.limits.batch_wait_ms / 1000.0
        while self._rows_like(first) < self.limits.max_batch and first in self._queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _rows_like(self, first: Job) -> int:
        return sum(job.rows for job in self._queue if job.key == first.key)

    def _take(self, first: Job) -> list[Job]:
        """The oldest job with the key of `first` and its companions, oldest first, within `max_batch` rows."""
        if first not in self._queue:  # cancelled while gathering: start over with the new oldest
            return []
        batch, rows = [], 0
        for job in list(self._queue):
            if job.key != first.key:
                continue
            if batch and rows + job.rows > self.limits.max_batch:
                continue  # a smaller job further back may still fit
            batch.append(job)
            rows += job.rows
            self._queue.remove(job)
        return batch

    def _run(self, batch: list[Job]) -> list[Any]:
        """On the model thread: the runner's results, or its exception for every job.

        The sampler checks between steps whether to go on: not when shutting down past the
        timeout, nor when every client of the batch has gone.
        """
        def should_stop() -> bool:
            return self._interrupt or all(job.abandoned or job.future.cancelled() for job in batch)

        try:
            with interruptible(should_stop):
                results = self.runner(batch)
        except Interrupted:
            self.stats.interrupted_batches += 1
            logger.info("a batch of %d %s request(s) stopped early (%s)", len(batch), batch[0].kind,
                        "shutting down" if self._interrupt else "every client has gone")
            return [shutting_down()] * len(batch)
        except Exception as error:
            return [error] * len(batch)
        if len(results) != len(batch):
            error = RuntimeError(f"the runner returned {len(results)} results for {len(batch)} jobs")
            return [error] * len(batch)
        return results

    def _record(self, batch: list[Job], seconds: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.batch_sizes[len(batch)] += 1
        stats.batch_rows[sum(job.rows for job in batch)] += 1
        stats.busy_seconds += seconds
        stats.recent_batch_seconds = seconds if stats.batches == 1 else 0.8 * stats.recent_batch_seconds + 0.2 * seconds
        logger.info("batch of %d %s request(s), %d row(s), in %.3f s; %d waiting", len(batch), batch[0].kind,
                    sum(job.rows for job in batch), seconds, len(self._queue))


def shutting_down() -> APIError:
    """The 503 answered to work the server will not do because it is shutting down."""
    return APIError(503, "the server is shutting down; retry against a running server", code="shutting_down",
                    headers={"Connection": "close"})
