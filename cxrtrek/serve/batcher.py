"""Dynamic batching for the model server: requests wait in a bounded queue and are answered
in batches, one backend ``generate`` call a batch (see :class:`Batcher`)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from dataclasses import dataclass

from cxrtrek.errors import BackendError, DataError, TransientError
from cxrtrek.protocol import VLMBackend, VLMRequest, VLMResponse
from cxrtrek.serve.http_common import HttpProblem
from cxrtrek.serve.metrics import Metrics

__all__ = ["Batcher", "Job"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A queued request: its answer (``future``) and when it was queued and started."""

    request: VLMRequest
    future: asyncio.Future[VLMResponse]
    enqueued: float
    started: float = 0.0
    batch_size: int = 0


class Batcher:
    """Gathers queued requests into batches and answers each batch with one backend call.

    Bound to the event loop that calls :meth:`start`. One batch runs at a time, unless the
    backend decodes continuously (``backend.continuous``, the in-process backend): then a
    batch is handed over as soon as it is gathered, to join the rows already decoding, with
    at most ``max_batch_size`` requests handed over and unanswered at a time (the rest wait in
    the queue, which stays bounded).
    """

    def __init__(self, backend: VLMBackend, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, metrics: Metrics) -> None:
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] | None = None
        self._arrived: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.closing = False
        self.continuous = bool(getattr(backend, "continuous", False))
        self._inflight = 0
        self._room: asyncio.Event | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._arrived, self._idle = asyncio.Event(), asyncio.Event()
        self._room = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    def submit(self, request: VLMRequest) -> Job:
        """Queue a request; :class:`~cxrtrek.serve.http_common.HttpProblem` 429 when the
        queue is full, 503 when closing."""
        if self._queue is None or self._arrived is None or self._idle is None or self.closing:
            raise HttpProblem(503, "the server is shutting down; retry on another replica",
                              "shutting_down", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        job = Job(request, loop.create_future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HttpProblem(429, f"the request queue is full ({self.max_queue} waiting); "
                              "retry later", "queue_full", {"Retry-After": "1"}) from None
        self._idle.clear()
        self._arrived.set()
        return job

    async def _gather(self, queue: asyncio.Queue[Job], arrived: asyncio.Event,
                      size: int) -> list[Job]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < size:
            while not queue.empty() and len(batch) < size:
                batch.append(queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= size or remaining <= 0:
                break
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                while not queue.empty() and len(batch) < size:
                    batch.append(queue.get_nowait())
                break
        return batch

    async def _work(self) -> None:
        assert self._queue is not None and self._arrived is not None and self._idle is not None
        assert self._room is not None
        while True:
            while self._inflight >= self.max_batch_size:  # continuous: wait for room
                self._room.clear()
                await self._room.wait()
            batch = await self._gather(self._queue, self._arrived,
                                       self.max_batch_size - self._inflight)
            live = [job for job in batch if not job.future.done()]  # skip timed-out jobs
            if live and self.continuous:
                self._inflight += len(live)
                task = asyncio.get_running_loop().create_task(self._handed_over(live))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            elif live:
                await self._run(live)
            if self._queue.empty() and not self._inflight:
                self._idle.set()

    async def _handed_over(self, jobs: list[Job]) -> None:
        try:
            await self._run(jobs)
        except asyncio.CancelledError:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(TransientError("the server shut down before "
                                                            "answering"))
            raise
        finally:
            self._inflight -= len(jobs)
            assert self._room is not None and self._idle is not None
            self._room.set()
            if self._queue is not None and self._queue.empty() and not self._inflight:
                self._idle.set()

    async def _run(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        for job in jobs:
            job.started, job.batch_size = now, len(jobs)
            self.metrics.queue_wait.observe(now - job.enqueued)
        self.metrics.batch_size.observe(len(jobs))
        try:
            responses = await self.backend.generate([job.request for job in jobs])
            if [r.request_id for r in responses] != [j.request.request_id for j in jobs]:
                raise BackendError(f"the backend answered {len(responses)} of {len(jobs)} "
                                   "requests, or out of order")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(jobs) > 1 and not isinstance(exc, TransientError):
                log.info("a batch of %d failed (%s: %s); answering its requests one by one",
                         len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    if not job.future.done():
                        await self._run([job])
                return
            if not isinstance(exc, DataError):
                log.error("generation failed for %d request(s): %s: %s", len(jobs),
                          type(exc).__name__, exc, exc_info=not isinstance(exc, BackendError))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for job, response in zip(jobs, responses, strict=True):
            if not job.future.done():
                job.future.set_result(response)

    async def close(self, drain_timeout_s: float) -> None:
        """Stop accepting; let queued and running requests finish (bounded); stop."""
        self.closing = True
        if self._idle is not None and not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("shutdown: %d request(s) still queued after %.1f s", self.depth,
                            drain_timeout_s)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._running):  # past the drain time: give up on them
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(TransientError("the server shut down before "
                                                        "answering"))
