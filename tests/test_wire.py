"""Hand-framed tensor fields: the bytes equal what protobuf reads and writes, in both directions; decoding views
the received bytes (no copy); malformed bytes raise WireError/TensorError and never anything else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embtrain import codec
from embtrain import wire
from embtrain.v1 import embtrain_pb2 as pb

REQ_MAPS = frozenset({4})
RESP_MAPS = frozenset({3})
RESP_FIELDS = frozenset({4, 7, 11})


def _request_tensors() -> dict[str, object]:
    g = np.random.default_rng(0)
    return {"embeddings": g.standard_normal((5, 3)).astype(np.float32), "labels": np.arange(5),
            "gt": torch.randn(4, dtype=torch.float64), "half": torch.randn(2, 2).to(torch.bfloat16),
            "strided": g.standard_normal((4, 6))[:, ::2], "empty": np.zeros((0, 3), np.float16),
            "scalar": np.float32(2.5)}


def test_encoded_request_parses_with_protobuf() -> None:
    head = pb.ComputeRequest(request_id="r1", session_id="s")
    head.options.max_triplets = 7
    tensors = _request_tensors()
    data = wire.encode(head, {4: tensors})
    msg = pb.ComputeRequest.FromString(data)
    expected = pb.ComputeRequest()
    expected.CopyFrom(head)
    for k, v in tensors.items():
        expected.inputs[k].CopyFrom(codec.encode(v))
    assert msg == expected


def test_protobuf_bytes_decode_by_hand_as_views() -> None:
    resp = pb.ComputeResponse(request_id="x", loss=1.5, triplets_total=3, step=4)
    grads = {"embeddings": np.arange(12, dtype=np.float32).reshape(3, 4), "centers": np.ones((2, 4))}
    for k, v in grads.items():
        resp.gradients[k].CopyFrom(codec.encode(v))
    resp.triplets.CopyFrom(codec.encode(np.array([[0, 1, 2]], np.int64)))
    resp.stats["a"] = 2.0
    data = resp.SerializeToString()
    msg, maps, fields = wire.decode(data, pb.ComputeResponse, RESP_MAPS, RESP_FIELDS)
    assert (msg.request_id, msg.loss, msg.triplets_total, msg.step, dict(msg.stats)) == ("x", 1.5, 3, 4, {"a": 2.0})
    assert not msg.gradients and not msg.HasField("triplets")
    for k, v in grads.items():
        out = codec.decode_numpy(maps[3][k], f"gradients.{k}")
        np.testing.assert_array_equal(out, v)
        assert out.base is not None and not out.flags.writeable
    np.testing.assert_array_equal(codec.decode_numpy(fields[4]), [[0, 1, 2]])
    # views, not copies: the tensor's address lies inside the received buffer
    base = np.frombuffer(data, np.uint8).ctypes.data
    view = codec.decode_numpy(maps[3]["embeddings"])
    assert base <= view.ctypes.data < base + len(data)


def test_round_trip_through_hand_framing() -> None:
    tensors = _request_tensors()
    data = wire.encode(pb.ComputeRequest(request_id="q"), {4: tensors})
    msg, maps, _ = wire.decode(data, pb.ComputeRequest, REQ_MAPS)
    assert msg.request_id == "q"
    for k, v in tensors.items():
        out = codec.decode_torch(maps[4][k], k)
        ref = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
        assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_negative_and_unpacked_shapes() -> None:
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 2], data=b"")
    msg = pb.ComputeRequest()
    msg.inputs["x"].CopyFrom(t)
    _, maps, _ = wire.decode(msg.SerializeToString(), pb.ComputeRequest, REQ_MAPS)
    assert maps[4]["x"].shape == (-1, 2)
    with pytest.raises(codec.TensorError, match="dimensions must be >= 0"):
        codec.decode_torch(maps[4]["x"], "inputs.x")
    # unpacked repeated int64 (field 2, wire type 0), as old writers may send
    body = b"\x08\x03" + b"\x10\x02" + b"\x10\x01" + b"\x1a\x08" + np.zeros(2, np.float32).tobytes()
    entry = b"\x0a\x01y" + b"\x12" + bytes([len(body)]) + body
    data = b"\x22" + bytes([len(entry)]) + entry
    _, maps, _ = wire.decode(data, pb.ComputeRequest, REQ_MAPS)
    assert maps[4]["y"].shape == (2, 1)
    assert pb.ComputeRequest.FromString(data).inputs["y"].shape == [2, 1]


@pytest.mark.parametrize("data", [b"\x22\x05\x0a", b"\x22\xff", b"\x0f", b"\x22\x03\x0a\x05ab",
                                  b"\x22\x04\x12\x02\x1a\x09", b"\x0a\x02\xff\xfe", b"\x80" * 12])
def test_malformed_bytes_raise_wire_error(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(data, pb.ComputeRequest, REQ_MAPS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        _, maps, _ = wire.decode(data, pb.ComputeRequest, REQ_MAPS)
        for k, t in maps[4].items():
            codec.decode_torch(t, k)
    except (wire.WireError, codec.TensorError):
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(["float32", "float64", "int64", "float16"]),
       st.text(max_size=8))
def test_agrees_with_protobuf_on_random_tensors(shape: list[int], dtype: str, key: str) -> None:
    x = np.arange(int(np.prod(shape)) if shape else 1).astype(dtype).reshape(shape)
    data = wire.encode(pb.ComputeRequest(), {4: {key: x}})
    assert pb.ComputeRequest.FromString(data).inputs[key] == codec.encode(x)
    _, maps, _ = wire.decode(data, pb.ComputeRequest, REQ_MAPS)
    np.testing.assert_array_equal(codec.decode_numpy(maps[4][key]), x)
