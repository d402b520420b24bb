"""Micro-batching: concurrent requests of one operation share one model call.

A transformer forward pass over 16 histories costs far less than 16 passes over one, so the
service queues requests and a single worker task takes up to `max_batch` of them, waiting at
most `max_wait_ms` after the first for others to arrive, then runs them together in a
thread (the event loop keeps accepting requests meanwhile). While a batch runs, the next
one gathers in the queue, so under load batches fill without waiting. The wait is spent only
when the previous batch held more than one request: a lone client (concurrency 1) has no
company to wait for, and would pay `max_wait_ms` on every request for nothing. A request
that finds the model idle and nobody queued skips the queue and runs at once, as without
batching (the queue and the worker task cost a few event-loop turns: sequential head at
concurrency 1, p99 5.7 against 3.3 ms); whatever arrives meanwhile queues and forms the next
batch.

A request run alone runs on the event loop itself, not in a thread, when the last lone runs
took at most `inline_ms` (their median): handing a call to a thread and back costs about
0.7 ms on two shared virtual cores (the waking core's scheduling), more than half of a
sequential head's whole call. In-process, that head's /recommend at concurrency 1 went from p50 3.06 / p99
6.95 ms to 2.32 / 4.36 ms. The loop is blocked for that long, as the model would be busy
anyway; a model above `inline_ms` (a MiniLM user side, a cross-encoder) keeps the thread, so
the loop goes on accepting requests and batches form behind it. A fast model run inline
takes requests one at a time under load too: each finds the model idle when its turn comes.

`max_batch=1` turns batching off: each request runs alone as soon as it comes (in a thread,
or inline as above), the baseline the latency benchmark compares against.

One request's failure must not fail its neighbours: when a batched call raises, each of its
requests is run again alone, and only those that fail alone get the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)
LONE_RUNS = 15  # lone runs whose median time decides inline or thread (a slow one is outvoted)


class BatcherClosed(RuntimeError):
    """The service is shutting down: queued requests are refused."""


@dataclass
class _Pending(Generic[T]):
    request: T
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[T, R]):
    """Runs `run(requests) -> results` (same length and order) over batches of requests.

    `run` is blocking (a model call); it runs in `executor` (the loop's default when None).
    `observe(n)` is told each batch's size (a metric). The worker task starts with the first
    request, on the loop that sent it. `inline_ms`: lone requests run on the loop while the
    recent lone runs (their median) took at most this; 0 = never.
    """

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        observe: Callable[[int], None] | None = None,
        executor: Executor | None = None,
        inline_ms: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not inline_ms >= 0:
            raise ValueError(f"inline_ms must be >= 0, got {inline_ms}")
        self.run, self.max_batch, self.max_wait = run, int(max_batch), max_wait_ms / 1000.0
        self.observe, self.executor = observe, executor
        self.inline = inline_ms / 1000.0
        self._lone: deque[float] = deque(maxlen=LONE_RUNS)  # recent lone runs' seconds
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._worker: asyncio.Task | None = None
        self._gathering: list[_Pending[T]] = []  # taken from the queue, not yet running
        self._last_size = 0  # the previous batch's size: waiting pays only under concurrency
        self._model: asyncio.Lock | None = None  # held while a batch (or a lone request) runs
        self._closed = False

    async def submit(self, request: T) -> R:
        """The result of `request`, or the exception its run raised."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        loop = asyncio.get_running_loop()
        if self.max_batch == 1:
            return await self._alone(loop, request)
        self._ensure_worker(loop)
        if self._queue.empty() and not self._model.locked():
            async with self._model:  # idle: run now (no await between the check and this)
                self._last_size = 1
                return await self._alone(loop, request)
        pending = _Pending(request, loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    async def close(self) -> None:
        """Stop the worker; requests still queued get BatcherClosed (a batch already running
        finishes first: its requests are answered)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        left = list(self._gathering)
        while self._queue is not None and not self._queue.empty():
            left.append(self._queue.get_nowait())
        for pending in left:
            _settle(pending.future, error=BatcherClosed("the service is shutting down"))

    @property
    def runs_inline(self) -> bool:
        """Whether the next lone request runs on the event loop (see the module doc)."""
        timings = list(self._lone)  # a copy: a thread may be appending
        return bool(timings) and statistics.median(timings) <= self.inline

    def forget_timings(self) -> None:
        """A new model: its first lone run goes to a thread and is timed afresh (the last
        model's speed must not put a slow one on the loop)."""
        self._lone.clear()

    async def _alone(self, loop: asyncio.AbstractEventLoop, request: T) -> R:
        self._observe(1)
        if self.runs_inline:
            return self._timed([request])[0]
        return (await loop.run_in_executor(self.executor, self._timed, [request]))[0]

    def _timed(self, requests: list[T]) -> list[R]:
        """`run` for one request, its time noted (the call itself, not the hop to a thread:
        the median of the last LONE_RUNS decides where the next one runs)."""
        start = time.perf_counter()
        results = self.run(requests)
        self._lone.append(time.perf_counter() - start)  # deque.append: thread-safe
        return results

    # -- worker -----------------------------------------------------------------------------
    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._model = asyncio.Lock()
            self._worker = loop.create_task(self._work(), name="micro-batcher")

    async def _work(self) -> None:
        while True:
            self._gathering = [await self._queue.get()]  # close() refuses it from here
            async with self._model:  # a lone request running now: the queue fills meanwhile
                batch = await self._gather()
                self._gathering = []
                running = asyncio.ensure_future(self._run(batch))
                try:
                    await asyncio.shield(running)  # a cancelled worker lets this batch finish
                except asyncio.CancelledError:
                    await running
                    raise

    async def _gather(self) -> list[_Pending[T]]:
        """The request taken first (`_gathering`), then whatever arrives within `max_wait` (at
        most `max_batch` in all); requests whose caller went away are dropped."""
        loop = asyncio.get_running_loop()
        batch = self._gathering
        deadline = loop.time() + (self.max_wait if self._last_size > 1 else 0.0)
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def _run(self, batch: list[_Pending[T]]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self._observe(len(batch))
        self._last_size = len(batch)
        try:
            results = await loop.run_in_executor(
                self.executor, self.run, [p.request for p in batch]
            )
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0].future, error=err)
                return
            log.warning("a batch of %d failed (%s); running its requests alone", len(batch), err)
            for pending in batch:
                try:
                    (result,) = await loop.run_in_executor(
                        self.executor, self.run, [pending.request]
                    )
                except Exception as alone:
                    _settle(pending.future, error=alone)
                else:
                    _settle(pending.future, result)
            return
        if len(results) != len(batch):
            error = RuntimeError(f"batch of {len(batch)} answered {len(results)} results")
            for pending in batch:
                _settle(pending.future, error=error)
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending.future, result)

    def _observe(self, size: int) -> None:
        if self.observe is not None:
            self.observe(size)


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None):
    if future.done():  # the caller was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
