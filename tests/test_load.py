"""A small bounded run of ``bench/load.py``: 16 concurrent streaming clients against an ``embtrain-server``
subprocess, each with its own connection and session, in two rounds. Every batch is answered exactly once and in
order (the request ids and the session steps), nothing fails, no session outlives the client that closed it, and
the server keeps serving and stops cleanly.

Throughput, latency and resident memory depend on the machine: ``bench/load.py`` measures and reports them; this
test asserts none of them."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

import embtrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIENTS = 16
BATCHES = 30  # per client and round


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embtrain_bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


load = _load_bench()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, target = load.start_server("cpu", workers=2)
    yield target
    assert load.stop_server(proc) == 0


def _round(target: str) -> None:
    r = load.run_load(target, CLIENTS, batches=BATCHES, batch=32, dim=16, max_in_flight=4)
    assert r.error_messages == [] and r.errors == 0, r.error_messages
    assert r.out_of_order == 0 and r.missing == 0
    assert r.per_client == [BATCHES] * CLIENTS  # every batch answered exactly once
    assert r.answered == CLIENTS * BATCHES


def test_sixteen_streaming_clients(server: str) -> None:
    """Two rounds of load on one server: every batch answered, in order, once; after each round the sessions the
    clients closed are gone and the server is still serving (the second round starts from what the first left)."""
    for _ in range(2):
        _round(server)
        with embtrain.Client(server, timeout=30) as c:
            assert c.list_sessions() == []
            assert c.health() == "SERVING"
