"""A small bounded run of ``bench/load.py``: 16 concurrent streaming clients against an ``embtrain-server``
subprocess, each with its own connection and session. Every batch is answered exactly once and in order (the
request ids and the session steps), nothing fails, and the server's resident memory does not keep growing: after
a warm-up round, a second round of the same load adds little to what the first one left."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

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
def server() -> Iterator[tuple[object, str]]:
    proc, target = load.start_server("cpu", workers=2)
    yield proc, target
    assert load.stop_server(proc) == 0


def _round(target: str, pid: int) -> object:
    r = load.run_load(target, CLIENTS, batches=BATCHES, batch=32, dim=16, max_in_flight=4, server_pid=pid,
                      sample_every=0.25)
    assert r.error_messages == [] and r.errors == 0, r.error_messages
    assert r.out_of_order == 0 and r.missing == 0
    assert r.per_client == [BATCHES] * CLIENTS  # every batch answered exactly once
    return r


def test_sixteen_streaming_clients(server: tuple[object, str]) -> None:
    proc, target = server
    pid = proc.pid  # type: ignore[attr-defined]
    warm = _round(target, pid)
    base = load.rss_bytes(pid)
    first = _round(target, pid)
    after_first = load.rss_bytes(pid)
    second = _round(target, pid)
    after_second = load.rss_bytes(pid)
    peak = max(b for r in (warm, first, second) for _, b in r.rss)  # type: ignore[attr-defined]
    print(f"server RSS MiB: after warm-up {base / 2**20:.0f}, after round 1 {after_first / 2**20:.0f}, "
          f"after round 2 {after_second / 2**20:.0f}, peak {peak / 2**20:.0f}; "
          f"{first.batches_per_second:.0f} / {second.batches_per_second:.0f} batches/s")  # type: ignore[attr-defined]
    assert base > 0
    # a leak grows with every batch; steady state stays put (allocator caches are warm after the first round)
    assert after_second - after_first < 48 * 2**20
    assert peak - base < 256 * 2**20
