"""The stream pipeline and the scheduler's worker-side session order: batch k+1 is decoded and checked while batch k
computes, the session's order and exactly-once steps still hold, errors come back where the one-step path gives
them, a withdrawn (cancelled) call leaves the order, and a draining server answers every batch it started."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import embtrain
from embtrain_server.batches import Batches
from embtrain_server.metrics import Metrics
from embtrain_server.scheduler import Scheduler
from tests.conftest import LossGate, ServerHandle, wait_until


def batch(n: int = 16, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(n // 4), 4)
    return (g.standard_normal((n, d)) + y[:, None]).astype(np.float32), y.astype(np.int64)


@pytest.fixture()
def prepared_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The request ids whose ``Batches.prepare`` / ``stateless_batch`` ran, in the order they ran."""
    seen: list[str] = []
    prepare, stateless = Batches.prepare, Batches.stateless_batch

    def spy_prepare(self, req, session):  # type: ignore[no-untyped-def]
        out = prepare(self, req, session)
        seen.append(req.request_id)
        return out

    def spy_stateless(self, req, principal):  # type: ignore[no-untyped-def]
        out = stateless(self, req, principal)
        seen.append(req.request_id)
        return out

    monkeypatch.setattr(Batches, "prepare", spy_prepare)
    monkeypatch.setattr(Batches, "stateless_batch", spy_stateless)
    yield seen


@pytest.mark.parametrize("stateless", [False, True])
def test_the_next_batches_are_decoded_while_one_computes(make_server, prepared_calls: list[str],
                                                         stateless: bool) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server()  # one worker on the CPU
    x, y = batch()
    with h.client(timeout=60) as c:
        s = None if stateless else c.create_session("batch_hard_triplet", seed=1)
        gate = LossGate("batch_hard_triplet")
        results: list[Any] = []
        try:
            batches = [{"embeddings": x + i, "labels": y} for i in range(4)]
            stream = (c.compute_stream(batches, loss="batch_hard_triplet", max_in_flight=4) if s is None
                      else s.stream(batches, max_in_flight=4))
            t = threading.Thread(target=lambda: results.extend(stream))
            t.start()
            assert gate.entered.wait(30)
            # batch 1 holds the only worker inside the loss; the others are decoded and checked meanwhile
            wait_until(lambda: len(prepared_calls) >= 4, what="the batches behind the computing one to be prepared")
        finally:
            gate.open()
        t.join(60)
    assert len(results) == 4 and all(r.ok for r in results)
    if s is not None:
        assert [r.step for r in results] == [1, 2, 3, 4]
        assert s.info().step == 4


def test_pipelined_stream_matches_one_batch_at_a_time(make_server) -> None:  # type: ignore[no-untyped-def]
    """The same steps through a stream (pipelined) and through unary calls give the same bits."""
    h: ServerHandle = make_server()
    with h.client(timeout=60) as c:
        data = [batch(seed=i) for i in range(6)]
        a = c.create_session("batch_hard_triplet", head={"type": "linear", "out_dim": 4}, seed=7)
        b = c.create_session("batch_hard_triplet", head={"type": "linear", "out_dim": 4}, seed=7)
        streamed = list(a.stream(data, max_in_flight=6, first_step=1))
        one_by_one = [b.compute(x, y, step=i + 1) for i, (x, y) in enumerate(data)]
    for r, q in zip(streamed, one_by_one):
        assert r.ok and r.step == q.step
        assert r.loss == q.loss
        np.testing.assert_array_equal(r.gradient, q.gradient)


def test_errors_keep_their_place_and_kind_in_a_stream(make_server) -> None:  # type: ignore[no-untyped-def]
    """A bad batch (prepared early) is refused in-band at its place; a resend of the last step with other data is
    refused as a resend (the step check comes first, as on the one-step path), not as bad data."""
    h: ServerHandle = make_server()
    x, y = batch()
    bad = x.copy()
    bad[0, 0] = np.nan
    with h.client(timeout=60) as c:
        s = c.create_session("batch_hard_triplet", seed=2)
        out = list(s.stream([(x, y), (bad, y), (x + 1, y)], max_in_flight=3))
        assert [r.ok for r in out] == [True, False, True]
        assert isinstance(out[1].error, embtrain.InvalidArgument) and "non-finite" in str(out[1].error)
        assert [r.step for r in out if r.ok] == [1, 2]
        assert [r.step for r in s.stream([(x + 2, y)], first_step=3)] == [3]
        # step 3 again, with other (and bad) data: refused as a resend, before its data is looked at
        out = list(s.stream([(bad, y), (x + 3, y)], max_in_flight=2, first_step=3))
        assert isinstance(out[0].error, embtrain.FailedPrecondition), out[0].error
        assert out[1].ok and out[1].step == 4
        assert s.info().step == 4


def test_scheduler_keeps_the_order_and_drops_a_withdrawn_call() -> None:
    import torch

    sched = Scheduler(2, Metrics(torch.device("cpu")))
    ran: list[int] = []
    release = threading.Event()

    def slow(i: int, prepared: Any = None) -> int:
        if i == 0:
            assert release.wait(30)
        ran.append(i)
        return i

    async def main() -> list[Any]:
        prepared: list[int] = []

        def prep(i: int) -> Any:
            def run() -> int:
                time.sleep(0.02 * (5 - i))  # later calls finish preparing first
                prepared.append(i)
                return i
            return run

        tasks = [asyncio.ensure_future(sched.run(slow, i, session_id="s", prepare=prep(i))) for i in range(5)]
        await asyncio.sleep(0.3)
        assert sorted(prepared) == [0, 1, 2, 3, 4] and ran == []  # 1..4 prepared while call 0 runs
        tasks[2].cancel()  # waiting for its turn: leaves the order, never runs
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        sched.shutdown()
    assert ran == [0, 1, 3, 4]
    assert out[:2] == [0, 1] and out[3:] == [3, 4] and isinstance(out[2], asyncio.CancelledError)
    assert not sched.busy("s")


def test_a_draining_server_answers_the_batches_it_started(make_server) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM-like stop during a pipelined stream: the batch that computes is answered and applied, the ones
    read ahead are not started (never applied), and the stream ends UNAVAILABLE."""
    h: ServerHandle = make_server(drain_seconds=30)
    x, y = batch()
    with h.client(timeout=60) as c:
        s = c.create_session("batch_hard_triplet", seed=3)
        gate = LossGate("batch_hard_triplet")
        got: list[Any] = []
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                for r in s.stream([(x + i, y) for i in range(6)], max_in_flight=6, first_step=1):
                    got.append(r)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                failure.append(exc)

        t = threading.Thread(target=consume)
        t.start()
        try:
            assert gate.entered.wait(30)
            stopping = asyncio.run_coroutine_threadsafe(h.running.stop(30), h.loop)
            wait_until(lambda: h.running.servicer.draining.is_set(), what="the drain to begin")
        finally:
            gate.open()
        t.join(60)
        stopping.result(60)
    assert [r.step for r in got] == [1] and got[0].ok
    assert failure and isinstance(failure[0], embtrain.Unavailable)
    assert h.running.servicer.batches.store.peek(s.id).step == 1  # nothing unanswered was applied
