"""The SDK's own checks of what it is asked to send: a batch it cannot encode (an unsupported dtype, a ragged list),
a missing loss name or a bad stream setting raises ``embtrain.InvalidArgument`` (also a ``ValueError``) naming the
field, as the server does for its own checks; inside ``compute_stream`` the same error surfaces from the result
iterator after the results of the batches before it, and the stream ends cleanly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import embtrain
from embtrain import codec
from embtrain.torch import RemoteLoss
from tests.conftest import wait_until

LOSS = "batch_hard_triplet"


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.standard_normal((8, 4)).astype(np.float32), np.repeat(np.arange(4), 2)


X, Y = _batch()
# Batches the SDK cannot encode, by kind. Each stands in for the embeddings.
BAD_EMBEDDINGS = {
    "complex-numpy": X.astype(np.complex64),
    "complex-torch": torch.from_numpy(X).to(torch.complex64),
    "strings": np.array([["a", "b"]] * 8),
    "objects": np.array([[object()]] * 8, dtype=object),
    "ragged-list": [[0.0, 1.0], [2.0]],
}


def _assert_local_invalid(err: BaseException, field: str) -> None:
    """``err`` is the InvalidArgument the SDK raises for ``field``: typed, coded and shaped like the server's."""
    assert isinstance(err, embtrain.InvalidArgument) and isinstance(err, ValueError)
    assert not isinstance(err, codec.TensorError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith(f"{field}: ")
    description = err.message.removeprefix(f"{field}: ")
    assert description and not description.startswith(field)
    assert err.violations == (embtrain.FieldViolation(field, description),)
    assert err.fields == [field]
    assert str(err) == f"INVALID_ARGUMENT: {err.message}"


@pytest.mark.parametrize("kind", BAD_EMBEDDINGS)
def test_compute_refuses_what_it_cannot_encode_as_invalid_argument(client: embtrain.Client, kind: str) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(BAD_EMBEDDINGS[kind], Y, loss=LOSS)
    _assert_local_invalid(info.value, "inputs.embeddings")
    # Existing ``except ValueError`` handlers keep working.
    with pytest.raises(ValueError):
        client.compute(BAD_EMBEDDINGS[kind], Y, loss=LOSS)


def test_compute_names_the_input_at_fault(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(X, np.array(["a"] * 8), loss=LOSS)
    _assert_local_invalid(info.value, "inputs.labels")
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(X, Y, loss="contrastive", gt_distances=np.ones((8, 8), np.complex128))
    _assert_local_invalid(info.value, "inputs.gt_distances")


def test_missing_loss_name_is_invalid_argument(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(X, Y)
    _assert_local_invalid(info.value, "loss")
    # A stream checks it when called, before any batch is read or the call is made.
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute_stream([(X, Y)])
    _assert_local_invalid(info.value, "loss")
    with pytest.raises(embtrain.InvalidArgument) as info:
        RemoteLoss(client)
    _assert_local_invalid(info.value, "loss")


@pytest.mark.parametrize("max_in_flight", [0, -3])
def test_max_in_flight_below_one_is_refused_when_called(client: embtrain.Client, max_in_flight: int) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute_stream([(X, Y)], loss=LOSS, max_in_flight=max_in_flight)
    _assert_local_invalid(info.value, "max_in_flight")
    assert info.value.message == f"max_in_flight: expected >= 1, got {max_in_flight}"


def test_session_calls_refuse_unencodable_tensors_before_sending(client: embtrain.Client) -> None:
    bad = np.ones((2, 4), np.complex64)
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("center", {"num_classes": 2}, initial_state={"centers": bad})
    _assert_local_invalid(info.value, "initial_state.centers")
    # No such session exists: the refusal happens before any call (a call would raise NotFound).
    with pytest.raises(embtrain.InvalidArgument) as info:
        embtrain.Session(client, "no-such-session").embed(bad)
    _assert_local_invalid(info.value, "embeddings")


class _Batches:
    """An iterator of batches that counts how many were read."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches, self.read = batches, 0

    def __iter__(self) -> Iterator[Any]:
        for b in self.batches:
            self.read += 1
            yield b


def _drain(results: Iterator[embtrain.ComputeResult]) -> tuple[list[embtrain.ComputeResult], BaseException | None]:
    out: list[embtrain.ComputeResult] = []
    try:
        for r in results:
            out.append(r)
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        return out, exc
    return out, None


def _stream_threads_end(before: set[threading.Thread]) -> None:
    """Every thread the stream started on the client (gRPC's request consumer among them) ends: nothing is left
    hanging. The in-process server's own pools ("embtrain-*", started on first use) are not the stream's."""
    wait_until(lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()
                            and not t.name.startswith("embtrain-")], timeout=10, what="the stream's threads to end")


@pytest.mark.parametrize("kind", ["complex-numpy", "ragged-list", "strings"])
@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_stream_raises_the_error_compute_raises_after_earlier_results(client: embtrain.Client, kind: str,
                                                                     max_in_flight: int) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(BAD_EMBEDDINGS[kind], Y, loss=LOSS)
    expected = info.value
    client.compute(X, Y, loss=LOSS)  # the channel and its long-lived threads exist before the stream starts
    before = set(threading.enumerate())

    batches = _Batches([_batch(1), _batch(2), (BAD_EMBEDDINGS[kind], Y), _batch(3)])
    results, err = _drain(client.compute_stream(batches, loss=LOSS, max_in_flight=max_in_flight))

    assert [r.ok for r in results] == [True, True]  # the batches before the bad one were sent and answered
    for r in results:
        assert isinstance(r.gradient, np.ndarray) and r.gradient.shape == X.shape
    assert err is not None, "the stream ended without raising"
    assert type(err) is type(expected) and isinstance(err, ValueError)
    assert (str(err), err.message, err.code, err.violations) == (  # type: ignore[attr-defined]
        str(expected), expected.message, expected.code, expected.violations)
    assert batches.read == 3  # nothing after the bad batch is read
    _stream_threads_end(before)
    assert client.compute(X, Y, loss=LOSS).ok  # the client is fine afterwards


def test_stream_whose_first_batch_is_bad_raises_without_results(client: embtrain.Client) -> None:
    results, err = _drain(client.compute_stream([(BAD_EMBEDDINGS["complex-torch"], Y), _batch()], loss=LOSS))
    assert results == []
    assert err is not None
    _assert_local_invalid(err, "inputs.embeddings")


def test_stream_refuses_a_malformed_batch_item(client: embtrain.Client) -> None:
    results, err = _drain(client.compute_stream([_batch(), 42, _batch()], loss=LOSS))
    assert [r.ok for r in results] == [True]
    assert err is not None
    _assert_local_invalid(err, "batches[1]")
    assert "got int" in err.message  # type: ignore[attr-defined]


def test_stream_reraises_the_batch_iterators_own_exception(client: embtrain.Client) -> None:
    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield _batch()
        raise RuntimeError("the data loader broke")

    before = set(threading.enumerate())
    results, err = _drain(client.compute_stream(batches(), loss=LOSS))
    assert [r.ok for r in results] == [True]
    assert isinstance(err, RuntimeError) and str(err) == "the data loader broke"
    _stream_threads_end(before)
