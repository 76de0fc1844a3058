"""Shared fixtures: a real server started in-process on port 0 (its own event loop in a thread) and a
connected client. ``make_server(**config)`` starts more with other settings; all stop at the end."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

import embtrain
from embtrain_server import losses
from embtrain_server import server as srv
from embtrain_server.config import ServerConfig

VECTORS_DIR = pathlib.Path(__file__).parent / "data" / "vectors"


class ServerHandle:
    """A server running on a private event loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self.run(srv.start(config))
        self.config = config

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.running.metrics_port}/metrics"

    def client(self, **kwargs) -> embtrain.Client:  # type: ignore[no-untyped-def]
        return embtrain.Client(self.target, **kwargs)

    def stop(self, grace: float = 1.0) -> None:
        if self.loop.is_running():
            self.run(self.running.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def base_config(**overrides) -> ServerConfig:  # type: ignore[no-untyped-def]
    cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, persist=False, device="cpu",
                       drain_seconds=2.0)
    return replace(cfg, **overrides).validate()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    handle = ServerHandle(base_config())
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def module_server() -> Iterator[ServerHandle]:
    """A server of the module's own: for modules that create many sessions (the shared server keeps the
    per-principal session limit)."""
    handle = ServerHandle(base_config())
    yield handle
    handle.stop()


@pytest.fixture()
def client(server: ServerHandle) -> Iterator[embtrain.Client]:
    with server.client(timeout=60.0) as c:
        yield c


@pytest.fixture()
def make_server() -> Iterator[Callable[..., ServerHandle]]:
    started: list[ServerHandle] = []

    def factory(**overrides) -> ServerHandle:  # type: ignore[no-untyped-def]
        handle = ServerHandle(base_config(**overrides))
        started.append(handle)
        return handle

    yield factory
    for h in started:
        h.stop()


def load_vector(name: str) -> dict:
    """A spec vector with "NaN"/"Infinity" strings turned into floats."""
    def fix(x):  # type: ignore[no-untyped-def]
        if isinstance(x, str) and x in ("NaN", "Infinity", "-Infinity"):
            return float(x.replace("Infinity", "inf"))
        if isinstance(x, list):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x
    return fix(json.loads((VECTORS_DIR / f"{name}.json").read_text()))


def vector_names(prefix: str = "") -> list[str]:
    return sorted(p.stem for p in VECTORS_DIR.glob(f"{prefix}*.json"))


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class LossGate:
    """Blocks the loss class ``name`` inside ``forward`` (on a worker thread) until opened: makes 'a batch is being
    computed right now' a state a test can hold. ``calls`` counts the forwards that entered; opening restores the
    class."""

    def __init__(self, name: str) -> None:
        losses.load_all()
        self.cls = losses.get(name)
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0
        self.original = original = self.cls.forward

        def forward(loss, inputs, ctx):  # type: ignore[no-untyped-def]
            self.calls += 1
            self.entered.set()
            assert self.opened.wait(60), "gate never opened"
            return original(loss, inputs, ctx)

        self.cls.forward = forward  # type: ignore[method-assign]

    def open(self) -> None:
        self.opened.set()
        self.cls.forward = self.original  # type: ignore[method-assign]
