"""Stopping work whose caller is gone. The scheduler runs each call on a worker inside a ``scope`` holding an event
that the servicer sets when the RPC ends (cancelled, deadline passed, or the stream closed); long computations call
``check`` between their blocks, so a cancelled or expired request stops using the device at the next block. The
batch is then not applied: every check runs before a step's commit."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from .errors import ServiceError

_local = threading.local()


class Cancelled(ServiceError):
    code_name = "CANCELLED"


@contextlib.contextmanager
def scope(stop: threading.Event | None) -> Iterator[None]:
    """Within: ``check`` raises once ``stop`` is set (nothing to check with None)."""
    previous = getattr(_local, "stop", None)
    _local.stop = stop
    try:
        yield
    finally:
        _local.stop = previous


def check() -> None:
    stop = getattr(_local, "stop", None)
    if stop is not None and stop.is_set():
        raise Cancelled("the call was cancelled or its deadline passed before the work finished; nothing was "
                        "applied")
