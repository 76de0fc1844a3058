"""The client ``embtrain.pml`` losses use when none is given: one, shared, made on first use."""

from __future__ import annotations

import os
import threading

from .._client import Client

DEFAULT_TARGET = "127.0.0.1:50051"
_lock = threading.Lock()
_client: Client | None = None


def default_client() -> Client:
    """The shared client of every ``embtrain.pml`` loss built without ``client=``: ``Client(EMBTRAIN_TARGET)``
    (token from ``EMBTRAIN_TOKEN``), or ``127.0.0.1:50051`` without the variable. Made on first use, so a loss can
    be built before the server is up."""
    global _client
    with _lock:
        if _client is None:
            _client = Client(os.environ.get("EMBTRAIN_TARGET") or DEFAULT_TARGET)
        return _client


def set_default_client(client: Client | str | None) -> None:
    """Replace the shared client (a ``Client`` or a target); ``None`` goes back to the environment's on next use.
    Losses that already made a call keep the client they used."""
    global _client
    with _lock:
        _client = Client(client) if isinstance(client, str) else client


__all__ = ["DEFAULT_TARGET", "default_client", "set_default_client"]
