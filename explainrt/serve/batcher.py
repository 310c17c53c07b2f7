"""Dynamic micro-batching: concurrent requests for the same work become one runtime call.

Each served model has one ``MicroBatcher``: requests wait in its queue; its worker takes the
oldest, gathers every queued request with the same key (model, kind of work, method, options)
until the batch holds ``max_batch`` images or ``max_wait`` has passed since the oldest arrived,
and runs the batch on the model's own worker thread, so the event loop never does CPU work and
the model's session is never entered by two batches at once. While a batch runs, new requests
queue up and form the next batch: under load batches fill without waiting.

If a merged batch fails (one request's option or target is bad), its requests are run one by one
so each gets its own answer or error, and one bad request never fails the others.

A request whose client goes away leaves the queue; when every request of the running batch has
gone, the batch's ``cancel`` event is set, the method stops at its next check (between perturbed
batches) and the worker moves on to the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from explainrt.errors import ClientGoneError, ServerBusyError

log = logging.getLogger(__name__)

BatchRunner = Callable[[Hashable, Sequence[Any], threading.Event], Sequence[Any]]
"""``run(key, payloads, cancel) -> one result per payload``; called on the worker thread, which
should stop (ExplanationCancelled) soon after ``cancel`` is set: every client of the batch is gone."""


@dataclass
class _Job:
    key: Hashable
    payload: Any
    size: int  # images
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    batch: list[_Job] | None = None  # the running batch this job is in, once taken from the queue
    cancel: threading.Event | None = None  # that batch's cancel event


@dataclass
class BatchStats:
    """Hooks the metrics module fills in; the batcher only calls them."""

    on_batch: Callable[[str, int, float], None] = lambda kind, images, waited: None
    on_queue: Callable[[int], None] = lambda depth: None


class MicroBatcher:
    """Gathers jobs of the same key into batches of at most ``max_batch`` images within ``max_wait`` seconds."""

    def __init__(self, name: str, run: BatchRunner, max_batch: int, max_wait: float, max_queue: int,
                 stats: BatchStats | None = None) -> None:
        self.name = name
        self._run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._stats = stats or BatchStats()
        self._queue: list[_Job] = []
        self._queued_images = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"explainrt-{name}")
        self._worker: asyncio.Task | None = None
        self._seconds_per_image = 0.0  # of the last batch run: Retry-After's estimate

    @property
    def depth(self) -> int:
        """Images waiting (not yet in a running batch)."""
        return self._queued_images

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for job in self._queue:
            job.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def submit(self, key: Hashable, payload: Any, size: int,
                     gone: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """Queue ``payload`` (``size`` images) and wait for its result (or its exception).

        ``gone`` returns when the client has disconnected: the job then leaves the queue, or, if
        it is running and was the last live job of its batch, the batch is cancelled
        (ClientGoneError either way).
        """
        if self._queued_images + size > self.max_queue:
            raise ServerBusyError(f"model {self.name!r} has {self._queued_images} images queued (limit "
                                  f"{self.max_queue}); retry later", retry_after=self.retry_after())
        self.start()
        job = _Job(key, payload, size, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._queued_images += size
        self._stats.on_queue(self._queued_images)
        self._arrived.set()
        if gone is None:
            return await job.future
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not watcher.done():
                watcher.cancel()
        if not job.future.done():
            self._abandon(job)
            raise ClientGoneError("the client went away before its answer was ready")
        return job.future.result()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's images at the last batch rate (at least 1)."""
        per_image = self._seconds_per_image or 1.0
        return max(1, round(self._queued_images * per_image))

    def _abandon(self, job: _Job) -> None:
        """Forget a job whose client left: out of the queue, or its batch cancelled if no one else waits for it."""
        job.future.cancel()
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.size
            self._stats.on_queue(self._queued_images)
        elif job.batch is not None and job.cancel is not None and all(other.future.done() for other in job.batch):
            log.info("model %r: every client of the running batch went away; cancelling it", self.name)
            job.cancel.set()

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            oldest = self._queue[0]
            deadline = oldest.enqueued + self.max_wait
            while self._fill(oldest.key) < self.max_batch and (remaining := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(oldest.key)
            waited = time.perf_counter() - oldest.enqueued
            self._stats.on_batch(str(oldest.key[0]) if isinstance(oldest.key, tuple) else str(oldest.key),
                                 sum(job.size for job in batch), waited)
            await self._execute(batch)

    def _fill(self, key: Hashable) -> int:
        return sum(job.size for job in self._queue if job.key == key)

    def _take(self, key: Hashable) -> list[_Job]:
        """The oldest jobs of ``key`` up to ``max_batch`` images (at least one job), removed from the queue."""
        batch: list[_Job] = []
        images = 0
        for job in self._queue:
            if job.key == key and (not batch or images + job.size <= self.max_batch):
                batch.append(job)
                images += job.size
        taken = {id(job) for job in batch}
        self._queue = [job for job in self._queue if id(job) not in taken]
        self._queued_images -= images
        self._stats.on_queue(self._queued_images)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        live = [job for job in batch if not job.future.done()]  # a client may have gone away
        if not live:
            return
        cancel = threading.Event()
        for job in live:
            job.batch, job.cancel = live, cancel
        loop = asyncio.get_running_loop()
        tick = time.perf_counter()
        outcomes = await loop.run_in_executor(self._executor, self._run_isolated, live[0].key,
                                              [job.payload for job in live], cancel)
        self._seconds_per_image = (time.perf_counter() - tick) / sum(job.size for job in live)
        for job, outcome in zip(live, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _run_isolated(self, key: Hashable, payloads: list[Any], cancel: threading.Event) -> list[Any]:
        """Results (or exceptions) per payload: the whole batch at once, else one by one after a failure."""
        try:
            return list(self._run(key, payloads, cancel))
        except Exception as error:  # reported to the request(s) it belongs to
            if len(payloads) == 1 or cancel.is_set():
                return [error] * len(payloads)
            log.debug("batch of %d failed (%s); running its requests one by one", len(payloads), error)
        outcomes: list[Any] = []
        for payload in payloads:
            try:
                outcomes.extend(self._run(key, [payload], cancel))
            except Exception as error:  # this request's own error
                outcomes.append(error)
        return outcomes
