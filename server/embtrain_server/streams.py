"""The read side of a ComputeStream: a read-ahead window with back-pressure, and the drain.

The pump holds at most ``window`` batches that are received and not yet answered: it stops reading, and HTTP/2
flow control pushes back on the client. While the server drains, the pump ends the stream as soon as no batch is
in flight (``Draining``), so a stream never holds a stopping server open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import Gauge

log = logging.getLogger("embtrain.streams")
_END = object()  # end of the stream's requests


class Draining(Exception):
    """The server is shutting down and the stream has no batch in flight: end it now."""


class StreamPump:
    def __init__(self, requests: AsyncIterator[Any], window: int, draining: asyncio.Event, pending: Gauge) -> None:
        self._requests = requests
        self._window = asyncio.Semaphore(window)  # a permit per batch read and not yet answered
        self._draining = draining
        self._pending_gauge = pending
        self._pending = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._drained: asyncio.Task[Any] | None = None

    async def _read(self) -> None:
        try:
            it = self._requests.__aiter__()
            while True:
                await self._window.acquire()
                try:
                    req = await it.__anext__()
                except StopAsyncIteration:
                    break
                self._pending += 1
                self._pending_gauge.inc()
                self._queue.put_nowait(req)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client went away mid-message; the stream ends below
            log.debug("ComputeStream reader ended", exc_info=True)
        finally:
            self._queue.put_nowait(_END)

    async def __aenter__(self) -> StreamPump:
        self._reader = asyncio.create_task(self._read())
        self._drained = asyncio.create_task(self._draining.wait())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self._reader, self._drained):
            if task is not None:
                task.cancel()
        self._pending_gauge.dec(self._pending)
        self._pending = 0

    async def next(self) -> Any | None:
        """The next batch, or None at the end of the stream. Raises ``Draining``."""
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
            req = get.result()
        else:
            req = self._queue.get_nowait()
        return None if req is _END else req

    def answered(self) -> None:
        """One batch was answered: its permit goes back to the reader. Raises ``Draining`` while the server
        drains (the batches answered so far are applied)."""
        self._pending -= 1
        self._pending_gauge.dec()
        self._window.release()
        if self._draining.is_set():
            raise Draining
