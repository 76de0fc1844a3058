"""Ordering and workers: the batches of one session run one at a time, in arrival order; torch work runs on a
worker thread pool, never on the event loop.

A cancelled or expired call frees what it holds: if its work has not started it leaves the queue; once it runs it
cannot be stopped, so the caller waits for it before the cancellation goes through, and the session's order lock
covers the whole run (the next batch never overlaps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import cancellation
from .errors import ResourceExhausted
from .metrics import Metrics

T = TypeVar("T")


class Scheduler:
    def __init__(self, workers: int, metrics: Metrics) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embtrain-worker")
        self.metrics = metrics
        # The order of each session with calls queued or running (asyncio's lock is FIFO), and how many there are:
        # the entry goes with the last of them, so ids that name no session leave nothing behind.
        self._order: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, fn: Callable[..., T], *args: Any, session_id: str | None = None,
                  cancelled: Callable[[], bool] = lambda: False, stop: threading.Event | None = None,
                  pool: ThreadPoolExecutor | None = None) -> T:
        """``fn(*args)`` on a worker; with ``session_id``, after every earlier call of that session has finished.
        ``cancelled()`` is asked once the order is reached: a call given up while it waited never runs; ``stop``,
        once set, ends a long computation at its next block (``cancellation``). ``pool``: run on those threads
        instead of the workers (the replicas' collectives, which must not queue behind other sessions' work)."""
        if session_id is None:
            return await self._work(fn, *args, stop=stop, pool=pool)
        lock, users = self._order.get(session_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._order[session_id] = (lock, users + 1)
        try:
            async with lock:
                if cancelled():
                    raise asyncio.CancelledError
                return await self._work(fn, *args, stop=stop, pool=pool)
        finally:
            lock, users = self._order[session_id]
            if users == 1:
                del self._order[session_id]
            else:
                self._order[session_id] = (lock, users - 1)

    def busy(self, session_id: str) -> bool:
        """Whether a call of the session is queued or running."""
        return session_id in self._order

    async def _work(self, fn: Callable[..., T], *args: Any, stop: threading.Event | None = None,
                    pool: ThreadPoolExecutor | None = None) -> T:
        cf = (pool or self.executor).submit(_in_scope, stop, fn, *args)
        fut = asyncio.wrap_future(cf)
        self.metrics.worker_calls.inc()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if stop is not None:  # the caller is gone: the work stops at its next block
                stop.set()
            if not cf.cancel():
                while not fut.done():
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        continue
                    except Exception:  # noqa: BLE001 - the caller is gone; the outcome has nowhere to go
                        break
            raise
        finally:
            self.metrics.worker_calls.dec()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _in_scope(stop: threading.Event | None, fn: Callable[..., T], *args: Any) -> T:
    with cancellation.scope(stop):
        return fn(*args)


class Admission:
    """Server-wide admission by the bytes of the requests in flight (received and not yet answered, unary and
    stream, waiting for a worker or computing), against the memory budget: a request that does not fit waits in a
    bounded queue, and is refused with RESOURCE_EXHAUSTED when the queue is full or it could never fit. (Each
    batch's own working memory is estimated against the same budget once it is decoded; see ``validation``.)"""

    def __init__(self, budget: int, max_waiting: int, metrics: Metrics) -> None:
        self.budget = budget
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.in_flight = 0
        self.waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if self.budget and nbytes > self.budget:
            raise ResourceExhausted(f"request: {nbytes} bytes, over the server's memory budget of {self.budget} "
                                    "bytes; send smaller batches", field="request")
        async with self._changed:
            if self.budget and self.in_flight + nbytes > self.budget:
                if self.waiting >= self.max_waiting:
                    raise ResourceExhausted(f"request: the server holds {self.in_flight} bytes of requests and "
                                            f"{self.waiting} more wait; retry later", field="request")
                self.waiting += 1
                try:
                    await self._changed.wait_for(lambda: self.in_flight + nbytes <= self.budget)
                finally:
                    self.waiting -= 1
            self.in_flight += nbytes
            self.metrics.admitted_bytes.set(self.in_flight)
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= nbytes
                self.metrics.admitted_bytes.set(self.in_flight)
                self._changed.notify_all()


class WorkingMemory:
    """The estimated working memory of the batches computing at the same time (several workers share a GPU)
    against the memory budget: a batch waits on its worker until the running ones leave room for it. Each batch
    alone fits (``validation`` refused any that does not), so the first to find the device idle always runs."""

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.budget) if self.budget else 0
        with self._changed:
            while self.in_use and self.in_use + nbytes > self.budget:
                self._changed.wait(0.05)
                cancellation.check()  # a caller that gives up while its batch waits frees the worker
            self.in_use += nbytes
            self.metrics.working_bytes.set(self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self.metrics.working_bytes.set(self.in_use)
                self._changed.notify_all()
