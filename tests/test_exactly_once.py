"""Exactly-once session steps and batches that apply entirely or not at all.

A step-numbered batch is applied once however often it is sent; a resend of the last applied step gets the same
answer; every failure before or during the commit leaves the session bit for bit as it was. References are an
uninterrupted run of the same batches on a session with the same seed.
"""

from __future__ import annotations

import os
import pathlib
import stat
from typing import Any

import grpc
import numpy as np
import pytest

import embtrain
from embtrain import wire
from embtrain.v1 import embtrain_pb2 as pb
from tests.conftest import ServerHandle

CONFIG: dict[str, Any] = dict(loss="batch_hard_triplet", params={"margin": 0.2},
                              head=[{"type": "mlp", "hidden": [8], "out_dim": 4}], optimizer={"type": "adam", "lr": 0.01},
                              memory={"size": 24}, seed=7)


@pytest.fixture(scope="module")
def server(module_server: ServerHandle) -> ServerHandle:
    """This module's own server (its tests create many sessions)."""
    return module_server


def batch(step: int, n: int = 12, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return rng.standard_normal((n, d)).astype(np.float32), (np.arange(n) % 3).astype(np.int64)


def new_session(client: embtrain.Client) -> embtrain.Session:
    cfg = dict(CONFIG)
    return client.create_session(cfg.pop("loss"), cfg.pop("params"), **cfg)


def weights(s: embtrain.Session) -> bytes:
    return s.export_model().weights


def same(a: embtrain.ComputeResult, b: embtrain.ComputeResult) -> None:
    assert a.loss == b.loss and a.step == b.step
    np.testing.assert_array_equal(a.gradient, b.gradient)
    np.testing.assert_array_equal(a.triplets, b.triplets)


def reference(client: embtrain.Client, steps: int) -> tuple[list[embtrain.ComputeResult], bytes]:
    s = new_session(client)
    results = [s.compute(*batch(t)) for t in range(1, steps + 1)]
    return results, weights(s)


def test_a_resend_of_the_last_step_gets_the_same_answer_and_applies_nothing(client: embtrain.Client) -> None:
    s = new_session(client)
    first = s.compute(*batch(1), step=1)
    w1 = weights(s)
    again = s.compute(*batch(1), step=1)
    same(first, again)
    assert s.info().step == 1 and weights(s) == w1
    second = s.compute(*batch(2), step=2)
    ref, w_ref = reference(client, 2)
    same(first, ref[0])
    same(second, ref[1])
    assert weights(s) == w_ref


@pytest.mark.parametrize("step, expected", [
    (4, "expected 3 (or 2, to get the last answer again), got 4"),  # from the future
    (1, "expected 3 (or 2, to get the last answer again), got 1"),  # from the past
    (2, "step 2 was already applied with a different batch"),
])
def test_other_steps_are_refused_and_change_nothing(client: embtrain.Client, step: int, expected: str) -> None:
    s = new_session(client)
    s.compute(*batch(1), step=1)
    s.compute(*batch(2), step=2)
    w2 = weights(s)
    with pytest.raises(embtrain.FailedPrecondition) as info:
        s.compute(*batch(7), step=step)
    assert info.value.fields == ["step"] and expected in info.value.message
    assert s.info().step == 2 and weights(s) == w2


def test_step_numbers_are_refused_for_stateless_batches(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(*batch(1), loss="batch_hard_triplet", step=1)
    assert info.value.fields == ["step"]


def test_cancels_and_expired_deadlines_with_resends_apply_every_step_once(server: ServerHandle,
                                                                          client: embtrain.Client) -> None:
    """100 cancelled calls and 100 calls with a 1 ms deadline, each resent until answered: the answers and the
    final state equal an uninterrupted run's."""
    steps = 200
    ref, w_ref = reference(client, steps)
    s = new_session(client)
    channel = grpc.insecure_channel(server.target)
    raw = channel.unary_unary("/embtrain.v1.EmbeddingTrainer/Compute")
    answers = []
    expired = 0
    try:
        for t in range(1, steps + 1):
            x, y = batch(t)
            if t % 2:  # cancelled right after it was sent
                req = pb.ComputeRequest(request_id=f"c{t}", session_id=s.id, step=t)
                fut = raw.future(wire.encode_compute_request(req, {"embeddings": x, "labels": y}), timeout=60)
                fut.cancel()
            else:  # a deadline that expires while it is sent or computed (now and then the call makes it)
                try:
                    s.compute(x, y, step=t, timeout=0.001)
                except (embtrain.DeadlineExceeded, embtrain.Unavailable):
                    expired += 1
            answers.append(s.compute(x, y, step=t))  # the resend: applied now, or the kept answer
    finally:
        channel.close()
    for got, want in zip(answers, ref):
        same(got, want)
    assert s.info().step == steps and weights(s) == w_ref
    assert expired > 0  # the deadlines did cut calls short


def test_a_restart_keeps_the_last_answer(make_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=1)
    with h.client() as c:
        s = new_session(c)
        s.compute(*batch(1), step=1)
        answered = s.compute(*batch(2), step=2)
        sid = s.id
    h.stop()
    h2: ServerHandle = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=1)
    with h2.client() as c:
        s = c.get_session(sid)
        same(s.compute(*batch(2), step=2), answered)  # lost answer, resent after the restart
        assert s.info().step == 2
        assert s.compute(*batch(3), step=3).step == 3
        ref, w_ref = reference(c, 3)
        assert weights(s) == w_ref


def test_an_answer_too_large_to_send_is_refused_before_anything_is_applied(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(max_message_bytes=64 * 1024)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 4)).astype(np.float32), (np.arange(60) % 2).astype(np.int64)
    with h.client() as c:
        s = c.create_session("batch_all_triplet", {"margin": 10.0}, seed=0, head={"type": "linear", "out_dim": 4})
        with pytest.raises(embtrain.ResourceExhausted) as info:
            s.compute(x, y, max_triplets=10**6, ids=np.arange(60))
        assert info.value.fields == ["options.max_triplets"]
        assert s.info().step == 0
        # on a stream it is an in-band error and the stream goes on to the next batch
        results = list(s.stream([{"embeddings": x, "labels": y, "ids": np.arange(60)}] * 2, max_triplets=10**6))
        assert [r.error.code for r in results] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2  # type: ignore[union-attr]
        assert s.info().step == 0
        assert s.compute(x, y, max_triplets=10).step == 1


def test_a_failure_inside_the_commit_restores_the_state_bit_for_bit(client: embtrain.Client,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory enqueue fails after the optimiser has stepped the head: weights, Adam state and step are put
    back, and training goes on exactly as if the failed batch had never been sent."""
    from embtrain_server import memory

    s = new_session(client)
    s.compute(*batch(1))
    w1 = weights(s)
    enqueue = memory.MemoryBank.enqueue

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(memory.MemoryBank, "enqueue", out_of_memory)
    with pytest.raises(embtrain.ResourceExhausted):
        s.compute(*batch(2), step=2)
    assert s.info().step == 1 and weights(s) == w1
    monkeypatch.setattr(memory.MemoryBank, "enqueue", enqueue)
    for t in (2, 3):
        s.compute(*batch(t), step=t)
    _, w_ref = reference(client, 3)
    assert weights(s) == w_ref


def test_a_session_whose_checkpoint_cannot_be_written_is_not_created(make_server, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from embtrain_server import checkpoint

    h: ServerHandle = make_server(persist=True, state_dir=str(tmp_path))

    def disk_full(path: pathlib.Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_atomic", disk_full)
    with h.client() as c:
        with pytest.raises(embtrain.Unavailable, match="no session was created"):
            new_session(c)
        assert c.list_sessions() == []


def test_a_state_dir_that_cannot_hold_checkpoints_stops_the_start(tmp_path: pathlib.Path) -> None:
    from embtrain_server.main import main as server_main

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert server_main(["--port", "0", "--metrics-port", "0", "--device", "cpu", "--state-dir", str(not_a_dir)]) == 2


def test_entries_that_are_not_checkpoints_are_skipped(make_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(persist=True, state_dir=str(tmp_path))
    with h.client() as c:
        s = new_session(c)
        s.compute(*batch(1))
    h.stop()
    (tmp_path / "a-directory.safetensors").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "dangling.safetensors")
    h2: ServerHandle = make_server(persist=True, state_dir=str(tmp_path))
    with h2.client() as c:
        assert [i.session_id for i in c.list_sessions()] == [s.id]


def test_checkpoints_are_private_to_the_server(make_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    h: ServerHandle = make_server(persist=True, state_dir=str(state))
    with h.client() as c:
        s = new_session(c)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = list(state.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{s.id}.safetensors"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def test_a_failed_final_checkpoint_is_reported_by_the_stop(make_server, tmp_path: pathlib.Path,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from embtrain_server import checkpoint

    h: ServerHandle = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0,
                                  checkpoint_every_seconds=0)
    with h.client() as c:
        new_session(c).compute(*batch(1))

    def disk_full(path: pathlib.Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_atomic", disk_full)
    assert h.run(h.running.stop(1.0)) == 1
    h.loop.call_soon_threadsafe(h.loop.stop)
    h.thread.join(10)


def test_training_is_bitwise_the_same_for_request_ids_of_every_length(server: ServerHandle,
                                                                       client: embtrain.Client) -> None:
    """The tensors of a request start at an offset that depends on the fields before them; the result must not."""
    channel = grpc.insecure_channel(server.target)
    raw = channel.unary_unary("/embtrain.v1.EmbeddingTrainer/Compute")
    outcomes = set()
    try:
        for length in range(1, 9):
            s = client.create_session("contrastive", {}, head={"type": "linear", "out_dim": 5}, seed=3)
            for t in range(1, 9):
                x, y = batch(t, n=16, d=7)
                req = pb.ComputeRequest(request_id="r" * length, session_id=s.id, step=t)
                raw(wire.encode_compute_request(req, {"embeddings": x, "labels": y}), timeout=60)
            outcomes.add(weights(s))
    finally:
        channel.close()
    assert len(outcomes) == 1
