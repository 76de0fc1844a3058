"""The read side of a ComputeStream: a read-ahead window with back-pressure, the pipeline of its batches, and the
drain.

The pump holds at most ``window`` batches that are received and not yet answered: it stops reading, and HTTP/2
flow control pushes back on the client. Each batch starts as soon as it is read (``start``: a task, created in
arrival order, so whatever it does before its first wait happens in arrival order too); the answers are handed out
in arrival order. So batch k+1 is decoded and checked, and queued behind batch k on the worker side, while batch k
computes and while its answer is written (the servicer and the scheduler keep what must stay in order in order).

While the server drains, the pump reads no more batches and ends the stream (``Draining``) at the first batch that
had not started when the drain began (the batch itself raises ``Draining`` then): every batch that started is
answered first, so a stream never holds a stopping server open and never leaves a batch applied but unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import Gauge

log = logging.getLogger("embtrain.streams")
_END = object()  # end of the stream's requests
_DRAINED = object()  # the reader stopped because the server drains


class Draining(Exception):
    """The server is shutting down and the stream has no started batch left to answer: end it now."""


def _finished(started: set[asyncio.Future[Any]]) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        started.discard(fut)
        if not fut.cancelled():
            fut.exception()  # retrieved: a batch not awaited (the stream ended before it) logs nothing
    return done


class StreamPump:
    def __init__(self, requests: AsyncIterator[Any], window: int, draining: asyncio.Event, pending: Gauge,
                 start: Callable[[Any], Awaitable[Any]] | None = None) -> None:
        """``start(request)``: begins one batch and returns what to await for its answer (by default the request
        itself is handed out)."""
        self._requests = requests
        self._window = asyncio.Semaphore(window)  # a permit per batch read and not yet answered
        self._draining = draining
        self._pending_gauge = pending
        self._pending = 0
        self._start = start
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._started: set[asyncio.Future[Any]] = set()  # batches started and not finished
        self._reader: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[Any] | None = None

    async def _read(self) -> None:
        end = _END
        try:
            it = self._requests.__aiter__()
            while True:
                await self._window.acquire()
                if self._draining.is_set():
                    end = _DRAINED
                    break
                try:
                    req = await it.__anext__()
                except StopAsyncIteration:
                    break
                if self._draining.is_set():  # read, never started: the client sends it again elsewhere
                    end = _DRAINED
                    break
                self._pending += 1
                self._pending_gauge.inc()
                self._queue.put_nowait(self._begin(req))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client went away mid-message; the stream ends below
            log.debug("ComputeStream reader ended", exc_info=True)
        finally:
            self._queue.put_nowait(end)

    def _begin(self, req: Any) -> Any:
        if self._start is None:
            return req
        fut = asyncio.ensure_future(self._start(req))
        self._started.add(fut)
        fut.add_done_callback(_finished(self._started))
        return fut

    async def __aenter__(self) -> StreamPump:
        self._reader = asyncio.create_task(self._read())
        self._drained = asyncio.create_task(self._draining.wait())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self._reader, self._drained, *self._started):
            if task is not None:
                task.cancel()
        self._pending_gauge.dec(self._pending)
        self._pending = 0

    async def next(self) -> Any | None:
        """The next batch's answer (what ``start`` returned, awaited), or None at the end of the stream. Raises
        ``Draining``."""
        assert self._drained is not None, "use the pump as an async context manager"
        if self._queue.empty():
            get = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait((get, self._drained), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if not get.done() or get.cancelled():
                raise Draining
            item = get.result()
        else:
            item = self._queue.get_nowait()
        if item is _END:
            return None
        if item is _DRAINED:
            raise Draining
        return await item if self._start is not None else item

    def answered(self) -> None:
        """One batch was answered: its permit goes back to the reader."""
        self._pending -= 1
        self._pending_gauge.dec()
        self._window.release()
