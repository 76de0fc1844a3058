"""The service end to end over gRPC: errors, streams, sessions basics, health, reflection, metrics."""

from __future__ import annotations

import re
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import embtrain
from tests.conftest import ServerHandle

rng = np.random.default_rng(7)


def pk_batch(p: int = 4, k: int = 4, d: int = 8, dtype: type = np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.repeat(np.arange(p), k)
    x = g.standard_normal((p * k, d)) + y[:, None] * 0.5
    return x.astype(dtype), y.astype(np.int64)


# ---- errors ---------------------------------------------------------------------------------------------------

X, Y = pk_batch()


@pytest.mark.parametrize("kwargs,field,fragment", [
    (dict(embeddings=np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), labels=Y),
     "inputs.embeddings", "non-finite"),
    (dict(embeddings=np.where(np.arange(X.size).reshape(X.shape) == 9, np.inf, X), labels=Y),
     "inputs.embeddings", "non-finite"),
    (dict(embeddings=X, labels=Y[:-1]), "inputs.labels", f"length {len(Y) - 1}, expected {len(Y)}"),
    (dict(embeddings=X, labels=Y.astype(np.float32)), "inputs.labels", "expected an integer dtype"),
    (dict(embeddings=X.astype(np.int32), labels=Y), "inputs.embeddings", "expected a float dtype"),
    (dict(embeddings=X[0], labels=Y[:1]), "inputs.embeddings", "expected 2 dimensions"),
    (dict(embeddings=np.zeros((0, 8), np.float32), labels=np.zeros(0, np.int64)), "inputs.embeddings", "n >= 1"),
    (dict(embeddings=X, labels=Y, loss="no_such_loss"), "loss.name", "unknown loss 'no_such_loss'"),
    (dict(embeddings=X, labels=Y, params={"margni": 0.3}), "params.margni", "valid parameters are: margin, soft"),
    (dict(embeddings=X, labels=Y, params={"margin": -1.0}), "params.margin", "expected a number >= 0"),
    (dict(embeddings=X, labels=Y, params={"margin": "big"}), "params.margin", "expected a number"),
    (dict(embeddings=X, labels=Y, params={"soft": 1}), "params.soft", "expected a boolean"),
    (dict(embeddings=X, labels=Y, extra=np.zeros(3)), "inputs.extra", "unknown input"),
    (dict(embeddings=X), "inputs.labels", "required"),
], ids=["nan", "inf", "label-length", "label-dtype", "embedding-dtype", "1d", "empty", "unknown-loss",
        "unknown-param", "param-range", "param-type", "param-bool", "unknown-input", "missing-labels"])
def test_bad_requests_are_invalid_argument_naming_the_field(client: embtrain.Client, kwargs: dict, field: str,
                                                            fragment: str) -> None:
    kwargs = dict(kwargs)
    loss = kwargs.pop("loss", "batch_hard_triplet")
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(loss=loss, **kwargs)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith(field + ":"), err.message
    assert fragment in err.message
    assert field in err.fields
    # ... and the server goes on serving
    assert client.health() == "SERVING"
    assert np.isfinite(client.compute(X, Y, loss="batch_hard_triplet").loss)


def test_missing_target_and_unknown_session(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.NotFound) as info:
        client.compute(X, Y, session_id="nope")
    assert info.value.fields == ["session_id"]
    with pytest.raises(ValueError):
        client.compute(X, Y)


def test_message_size_limit_is_enforced(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(max_message_bytes=64 * 1024)
    with h.client() as c:
        big = np.zeros((256, 128), np.float32)  # 128 KiB
        with pytest.raises(embtrain.ResourceExhausted):
            c.compute(big, np.zeros(256, np.int64), loss="batch_hard_triplet")
        assert c.health() == "SERVING"


# ---- results --------------------------------------------------------------------------------------------------

def test_return_options(client: embtrain.Client) -> None:
    x, y = pk_batch(p=8, k=8, d=4, seed=3)
    full = client.compute(x, y, loss="batch_all_triplet", params={"margin": 5.0})
    assert full.triplets_total == len(full.triplets) > 5
    cut = client.compute(x, y, loss="batch_all_triplet", params={"margin": 5.0}, max_triplets=5,
                         return_gradient=False, per_item_losses=True)
    assert cut.triplets_truncated and cut.triplets_total == full.triplets_total
    np.testing.assert_array_equal(cut.triplets, full.triplets[:5])
    assert cut.gradient is None and cut.per_item_losses is not None
    none = client.compute(x, y, loss="batch_all_triplet", return_triplets=False)
    assert none.triplets is None
    with pytest.raises(embtrain.InvalidArgument, match="options.max_triplets"):
        client.compute(x, y, loss="batch_all_triplet", max_triplets=-1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gradient_comes_back_in_the_input_dtype(client: embtrain.Client, dtype: type) -> None:
    x, y = pk_batch(dtype=dtype)
    r = client.compute(x, y, loss="batch_hard_triplet")
    assert r.gradient.dtype == dtype and r.gradient.shape == x.shape
    assert r.stats["valid_anchors"] == len(y)


def test_torch_inputs_give_torch_results(client: embtrain.Client) -> None:
    import torch
    x, y = pk_batch()
    for dtype in (torch.float32, torch.bfloat16):
        r = client.compute(torch.from_numpy(x).to(dtype), torch.from_numpy(y), loss="batch_hard_triplet")
        assert isinstance(r.gradient, torch.Tensor) and r.gradient.dtype == dtype
        assert isinstance(r.triplets, torch.Tensor) and r.triplets.dtype == torch.int64
        r.gradient.add_(1.0)  # results are writable, not views of message bytes


# ---- streams --------------------------------------------------------------------------------------------------

def test_streams_on_three_concurrent_sessions_answer_in_order(client: embtrain.Client) -> None:
    n_batches = 12
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            session = client.create_session("batch_hard_triplet", {"margin": 0.2})
            batches = []
            for b in range(n_batches):
                x, y = pk_batch(seed=100 * i + b)
                if b == 5:
                    y = y[:-2]  # a bad batch in the middle
                batches.append({"embeddings": x, "labels": y})
            results[i] = list(session.stream(batches, max_in_flight=3))
            assert session.info().step == n_batches - 1
            session.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(3):
        res = results[i]
        assert len(res) == n_batches
        assert isinstance(res[5].error, embtrain.InvalidArgument)
        assert "inputs.labels" in res[5].error.message
        ok = [r for r in res if r.ok]
        assert [r.step for r in ok] == list(range(1, n_batches))  # every good batch once, in order
        # the loss of each answer is the loss of its own batch
        for b in (0, 7, 11):
            x, y = pk_batch(seed=100 * i + b)
            assert res[b].loss == pytest.approx(client.compute(x, y, loss="batch_hard_triplet",
                                                               params={"margin": 0.2}).loss, rel=1e-6)


def test_stream_with_unknown_session_ends_with_not_found(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.NotFound):
        list(client.compute_stream([pk_batch()], session_id="missing"))


def test_stateless_stream_and_request_ids(client: embtrain.Client) -> None:
    batches = [pk_batch(seed=s) for s in range(5)]
    res = list(client.compute_stream(batches, loss="batch_hard_triplet"))
    assert [r.step for r in res] == [0] * 5
    assert len({r.request_id for r in res}) == 5
    for (x, y), r in zip(batches, res):
        assert r.loss == pytest.approx(client.compute(x, y, loss="batch_hard_triplet").loss, rel=1e-6)


# ---- health, reflection, metrics -----------------------------------------------------------------------------

def test_health_and_reflection(server: ServerHandle, client: embtrain.Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("embtrain.v1.EmbeddingTrainer") == "SERVING"
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="embtrain.v1.EmbeddingTrainer")]
        answers = list(stub.ServerReflectionInfo(iter(reqs)))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"embtrain.v1.EmbeddingTrainer", "grpc.health.v1.Health"} <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(answers[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "embtrain.v1"
    methods = {m.name for m in fd.service[0].method}
    assert {"Compute", "ComputeStream", "CreateSession", "ListLosses"} <= methods


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_move_by_the_right_amounts(make_server) -> None:  # type: ignore[no-untyped-def]
    h: ServerHandle = make_server(metrics_port=-1)
    x, y = pk_batch(p=4, k=4, d=8)
    with h.client() as c:
        before = _scrape(h.metrics_url)
        for _ in range(3):
            c.compute(x, y, loss="batch_hard_triplet", params={"margin": 100.0})  # every anchor active
        with pytest.raises(embtrain.InvalidArgument):
            c.compute(x, y[:3], loss="batch_hard_triplet")
        s = c.create_session("batch_hard_triplet", {"margin": 100.0})
        list(s.stream([(x, y), (x, y)]))
        after = _scrape(h.metrics_url)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('embtrain_requests_total{code="OK",method="Compute"}') == 3
    assert delta('embtrain_requests_total{code="INVALID_ARGUMENT",method="Compute"}') == 1
    assert delta('embtrain_requests_total{code="OK",method="ComputeStream"}') == 2
    assert delta('embtrain_requests_total{code="OK",method="CreateSession"}') == 1
    assert delta('embtrain_request_duration_seconds_count{method="Compute"}') == 4
    assert delta('embtrain_compute_duration_seconds_count{loss="batch_hard_triplet"}') == 5
    assert delta('embtrain_batch_samples_sum{loss="batch_hard_triplet"}') == 5 * 16
    assert delta('embtrain_mined_triplets_total{loss="batch_hard_triplet"}') == 5 * 16
    assert delta('embtrain_active_triplet_fraction_sum{loss="batch_hard_triplet"}') == pytest.approx(5.0)
    assert delta('embtrain_received_bytes_total{method="Compute"}') > 4 * (x.nbytes + y.nbytes)
    assert delta('embtrain_sent_bytes_total{method="Compute"}') >= 3 * x.nbytes
    assert after["embtrain_open_sessions"] == 1
    assert after["embtrain_open_streams"] == 0
    assert any(k.startswith("embtrain_device_memory_bytes{") and v > 0 for k, v in after.items())
    assert not any(re.search(r"session", k) for k in after if "{" in k and "open_sessions" not in k)


def test_reduction_none_returns_the_per_item_losses_unasked(client: embtrain.Client) -> None:
    """A caller who asks for no reduction gets the per-item losses, not only their sum."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    target = rng.standard_normal((6, 3)).astype(np.float32)
    r = client.compute(input=x, target=target, loss="torch.MSELoss", params={"reduction": "none"})
    expected = F.mse_loss(torch.from_numpy(x), torch.from_numpy(target), reduction="none").flatten().numpy()
    assert r.per_item_losses is not None
    np.testing.assert_array_equal(r.per_item_losses, expected)
    assert r.loss == pytest.approx(float(expected.sum()), rel=1e-6)

    y = np.repeat(np.arange(3), 2)
    trip = client.compute(x, y, loss="triplet_margin", params={"reduction": "none", "miner": "all"})
    asked = client.compute(x, y, loss="triplet_margin", params={"reduction": "none", "miner": "all"},
                           per_item_losses=True)
    # one loss per selected triplet (6 anchors x 1 positive x 4 negatives), summing to the returned loss
    assert trip.per_item_losses is not None and len(trip.per_item_losses) == 24
    assert trip.loss == pytest.approx(float(trip.per_item_losses.astype(np.float64).sum()), rel=1e-6)
    np.testing.assert_array_equal(trip.per_item_losses, asked.per_item_losses)
    # with a reduction, the list still comes only when asked for
    assert client.compute(x, y, loss="triplet_margin", params={"miner": "all"}).per_item_losses is None
