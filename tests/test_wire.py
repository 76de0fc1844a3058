"""Hand-framed tensor fields agree with protobuf in both directions: what ``embtrain.wire`` frames, protobuf
parses to the message built with protobuf objects, and what protobuf writes, ``embtrain.wire`` decodes to the same
tensors, bit for bit (property tests over every dtype of the codec's table, zero-size and non-contiguous numpy
and torch input, map and single tensor fields of ``ComputeRequest`` and ``ComputeResponse``). The bytes themselves
may differ from protobuf's own (field order). Decoding views the received bytes (no copy); malformed bytes raise
WireError/TensorError and never anything else.

``EMBTRAIN_FUZZ_EXAMPLES`` sets the number of examples of each property test (default 60)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embtrain import codec
from embtrain import wire
from embtrain.v1 import embtrain_pb2 as pb

REQ_MAPS = frozenset({wire.REQUEST_INPUTS})
RESP_MAPS = frozenset({wire.RESPONSE_GRADIENTS})
RESP_FIELDS = frozenset(wire.RESPONSE_TENSORS)
PROPERTY = settings(max_examples=int(os.environ.get("EMBTRAIN_FUZZ_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


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
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 2], data=b"")
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


# ---- property tests: hand framing and protobuf agree, both directions ------------------------------------------

_TORCH_DTYPE = {name: getattr(torch, name) for name in codec.DTYPE_NAMES}
_ITEMSIZE = {name: torch.empty((), dtype=t).element_size() for name, t in _TORCH_DTYPE.items()}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def test_the_properties_cover_every_dtype_of_the_codec() -> None:
    assert set(codec.DTYPE_NAMES) == {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
                                      "uint8", "bool"}


@dataclass(frozen=True)
class Source:
    """One generated tensor: ``value`` goes to the SDK (numpy array or torch tensor, maybe non-contiguous),
    ``ref`` is the same values as a contiguous torch tensor, ``tensor`` the ``Tensor`` message built by hand from
    ``ref``'s bytes (independent of the code under test)."""

    value: Any
    ref: torch.Tensor
    tensor: pb.Tensor


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The elements as integers of the same width: equal exactly when the bits are (NaN payloads, -0.0)."""
    return t.contiguous().reshape(-1).view(_SAME_SIZE_INT[t.element_size()])


@st.composite
def sources(draw: st.DrawFn) -> Source:
    dtype = draw(st.sampled_from(codec.DTYPE_NAMES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(["numpy", "torch"]))  # numpy has no bfloat16
    layouts = ["contiguous", "transposed", "sliced"]
    if kind == "numpy" and _ITEMSIZE[dtype] > 1:
        layouts.append("big-endian")  # an explicitly byte-swapped dtype; encoded little-endian all the same
    layout = draw(st.sampled_from(layouts))
    # The storage the value is a view of: transposed and sliced views are not contiguous.
    if layout == "transposed":
        base_shape = shape[::-1]
    elif layout == "sliced" and shape:
        base_shape = (*shape[:-1], 2 * shape[-1] + 1)
    else:
        base_shape = shape
    count = math.prod(base_shape)
    if dtype == "bool":  # a bool byte other than 0/1 is not a valid bool
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=count, max_size=count)))
    else:  # any bits: NaNs with payloads, infinities, -0.0, subnormals
        raw = draw(st.binary(min_size=count * _ITEMSIZE[dtype], max_size=count * _ITEMSIZE[dtype]))
    base = torch.tensor(list(raw), dtype=torch.uint8).view(_TORCH_DTYPE[dtype]).reshape(base_shape)
    if layout == "transposed":
        view = base.permute(tuple(reversed(range(base.dim()))))
    elif layout == "sliced" and shape:
        view = base[..., 1::2]
    else:
        view = base
    ref = view.contiguous()
    assert tuple(ref.shape) == shape
    value: Any = view
    if kind == "numpy":
        value = view.numpy()
        if layout == "big-endian":
            value = value.astype(value.dtype.newbyteorder(">"))
    data = _bits(ref).numpy().tobytes()  # C order, little-endian (the host's order)
    tensor = pb.Tensor(dtype=getattr(pb, f"DTYPE_{dtype.upper()}"), shape=shape, data=data)
    return Source(value, ref, tensor)


def _assert_same_tensor(found: Any, source: Source, field: str) -> None:
    """``found`` (a tensor field as decoded by hand) holds exactly ``source``'s values, dtype and shape."""
    out = codec.decode_torch(found, field)
    assert out.dtype == source.ref.dtype and out.shape == source.ref.shape
    assert torch.equal(_bits(out), _bits(source.ref))
    if source.ref.dtype != torch.bfloat16:
        arr = codec.decode_numpy(found, field)
        assert arr.shape == tuple(source.ref.shape) and arr.tobytes() == source.tensor.data


_keys = st.text(max_size=6)
_int64 = st.integers(-(2**63), 2**63 - 1)
_finite = st.floats(allow_nan=False)  # a NaN field would make the two messages unequal under ==
_params = st.dictionaries(st.text(max_size=4), st.one_of(_finite, st.booleans(), st.text(max_size=4)), max_size=2)


@st.composite
def request_heads(draw: st.DrawFn) -> pb.ComputeRequest:
    """Every field of a ComputeRequest but its tensors."""
    head = pb.ComputeRequest(request_id=draw(st.text(max_size=8)))
    target = draw(st.sampled_from(["none", "session", "loss"]))
    if target == "session":
        head.session_id = draw(st.text(max_size=8))
    elif target == "loss":
        head.loss.name = draw(st.text(max_size=8))
        params = struct_pb2.Struct()
        params.update(draw(_params))
        head.loss.params.CopyFrom(params)
    if draw(st.booleans()):
        head.options.gradient = draw(st.booleans())
        head.options.max_triplets = draw(_int64)
        head.options.per_item_losses = draw(st.booleans())
    return head


@st.composite
def response_heads(draw: st.DrawFn) -> pb.ComputeResponse:
    """Every field of a ComputeResponse but its tensors."""
    head = pb.ComputeResponse(request_id=draw(st.text(max_size=8)), loss=draw(_finite),
                              triplets_total=draw(_int64), triplets_truncated=draw(st.booleans()),
                              step=draw(_int64))
    for k, v in draw(st.dictionaries(_keys, _finite, max_size=3)).items():
        head.stats[k] = v
    if draw(st.booleans()):
        head.error.code = draw(st.integers(0, 16))
        head.error.message = draw(st.text(max_size=8))
    return head


_maps = st.dictionaries(_keys, sources(), max_size=3)
_single = st.fixed_dictionaries({name: st.none() | sources() for name in wire.RESPONSE_TENSORS.values()})


@PROPERTY
@given(request_heads(), _maps)
def test_request_framed_by_hand_parses_with_protobuf(head: pb.ComputeRequest, inputs: dict[str, Source]) -> None:
    data = wire.encode_compute_request(head, {k: s.value for k, s in inputs.items()})
    via_codec, by_hand = pb.ComputeRequest(), pb.ComputeRequest()
    for msg in (via_codec, by_hand):
        msg.CopyFrom(head)
    for k, s in inputs.items():
        via_codec.inputs[k].CopyFrom(codec.encode(s.value, f"inputs.{k}"))
        by_hand.inputs[k].CopyFrom(s.tensor)
    parsed = pb.ComputeRequest.FromString(data)
    assert parsed == via_codec
    assert parsed == by_hand  # and the tensors hold the source's C-order little-endian bytes


@PROPERTY
@given(request_heads(), _maps)
def test_request_written_by_protobuf_decodes_by_hand(head: pb.ComputeRequest, inputs: dict[str, Source]) -> None:
    msg = pb.ComputeRequest()
    msg.CopyFrom(head)
    for k, s in inputs.items():
        msg.inputs[k].CopyFrom(s.tensor)
    data = msg.SerializeToString()
    parsed = wire.parse_compute_request(data)
    assert parsed.msg == head  # every other field, parsed by protobuf; the tensors are not in it
    assert parsed.ByteSize() == len(data)
    assert set(parsed.inputs) == set(inputs)
    for k, s in inputs.items():
        _assert_same_tensor(parsed.inputs[k], s, f"inputs.{k}")


@PROPERTY
@given(response_heads(), _maps, _single)
def test_response_framed_by_hand_parses_with_protobuf(head: pb.ComputeResponse, gradients: dict[str, Source],
                                                      single: dict[str, Source | None]) -> None:
    data = wire.encode_compute_response(head, {k: s.value for k, s in gradients.items()},
                                        {name: s.value if s else None for name, s in single.items()})
    via_codec, by_hand = pb.ComputeResponse(), pb.ComputeResponse()
    for msg in (via_codec, by_hand):
        msg.CopyFrom(head)
    for k, s in gradients.items():
        via_codec.gradients[k].CopyFrom(codec.encode(s.value, f"gradients.{k}"))
        by_hand.gradients[k].CopyFrom(s.tensor)
    for name, s in single.items():
        if s is not None:
            getattr(via_codec, name).CopyFrom(codec.encode(s.value, name))
            getattr(by_hand, name).CopyFrom(s.tensor)
    parsed = pb.ComputeResponse.FromString(data)
    assert parsed == via_codec
    assert parsed == by_hand
    for name, s in single.items():  # a zero-size tensor is still present, as protobuf has it
        assert parsed.HasField(name) == (s is not None)


@PROPERTY
@given(response_heads(), _maps, _single)
def test_response_written_by_protobuf_decodes_by_hand(head: pb.ComputeResponse, gradients: dict[str, Source],
                                                      single: dict[str, Source | None]) -> None:
    msg = pb.ComputeResponse()
    msg.CopyFrom(head)
    for k, s in gradients.items():
        msg.gradients[k].CopyFrom(s.tensor)
    for name, s in single.items():
        if s is not None:
            getattr(msg, name).CopyFrom(s.tensor)
    small, found_gradients, found = wire.decode_compute_response(msg.SerializeToString())
    assert small == head
    assert set(found_gradients) == set(gradients)
    for k, s in gradients.items():
        _assert_same_tensor(found_gradients[k], s, f"gradients.{k}")
    assert set(found) == {name for name, s in single.items() if s is not None}
    for name, s in single.items():
        if s is not None:
            _assert_same_tensor(found[name], s, name)


def test_bytes_may_differ_from_protobufs_own_but_parse_the_same() -> None:
    """What the module docstring says: protobuf writes fields in number order, the hand framing appends the
    tensor fields after the rest (here ``inputs`` = 4 after ``options`` = 5)."""
    head = pb.ComputeRequest(request_id="r")
    head.options.max_triplets = 3
    x = np.ones((2, 2), np.float32)
    hand = wire.encode_compute_request(head, {"x": x})
    full = pb.ComputeRequest()
    full.CopyFrom(head)
    full.inputs["x"].CopyFrom(codec.encode(x))
    assert hand != full.SerializeToString()
    assert sorted(hand) == sorted(full.SerializeToString())  # the same fields, in another order
    assert pb.ComputeRequest.FromString(hand) == full
