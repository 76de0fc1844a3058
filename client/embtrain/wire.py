"""The Compute wire format, one owner for the SDK and the server: the tensor-carrying messages framed by hand,
without copying tensor data through protobuf objects.

A protobuf message on the wire is the concatenation of its fields, so a ``ComputeRequest`` / ``ComputeResponse``
can be written as the small message without its tensors followed by hand-framed tensor fields, and read by walking
the top-level fields. Protobuf parses the framed bytes to the same message, and what protobuf writes decodes here
to the same tensors (tests/test_wire.py checks both directions), so peers that use plain protobuf interoperate.
The bytes are not always protobuf's own: protobuf writes fields in field-number order, the framing here writes
the tensor fields after all the others (a request's ``options``, field 5, before its ``inputs``, field 4), and
parsers accept fields in any order. Costs per tensor: encoding copies contiguous little-endian CPU data once (the
final join; other input is first made so, one more copy); decoding copies nothing (the tensors view the received
bytes).

Malformed input raises ``TensorError`` (field named) or ``WireError``; neither ever reads out of bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .codec import TensorError, wire_dtype_and_buffer
from .v1 import embtrain_pb2 as pb

M = TypeVar("M")
# gRPC's message size limit that the SDK and the server use unless configured otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_LEN = 2


class WireError(ValueError):
    """Bytes that are not a valid protobuf message of the expected type."""


@dataclass(frozen=True)
class WireTensor:
    """A tensor field as found on the wire: ``data`` is a read-only view of the received bytes (no copy).

    Quacks like ``embtrain.v1.Tensor`` for ``codec.decode_numpy`` / ``decode_torch``.
    """

    dtype: int
    shape: tuple[int, ...]
    data: memoryview


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf writes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _skip(buf: memoryview, i: int, end: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(buf, i, end)[1]
    if wire_type == 1:
        i += 8
    elif wire_type == 5:
        i += 4
    elif wire_type == _LEN:
        n, i = _read_varint(buf, i, end)
        i += n
    else:
        raise WireError(f"unsupported wire type {wire_type}")
    if i > end:
        raise WireError("field runs past the end of the message")
    return i


# ---- encoding ------------------------------------------------------------------------------------------------

def _tensor_parts(x: Any, field: str) -> list[Any]:
    wire_dtype, shape, data = wire_dtype_and_buffer(x, field)
    packed = b"".join(_varint(s) for s in shape)
    head = bytearray()
    if wire_dtype:
        head += b"\x08" + _varint(wire_dtype)
    if packed:
        head += b"\x12" + _varint(len(packed)) + packed
    if len(data):
        head += b"\x1a" + _varint(len(data))
        return [bytes(head), data]
    return [bytes(head)]


def _length(parts: list[Any]) -> int:
    return sum(len(p) for p in parts)


def encode(msg: Any, maps: Mapping[int, Mapping[str, Any]] = {}, fields: Mapping[int, Any] = {},
           names: Mapping[int, str] = {}) -> bytes:
    """``msg`` (without the tensors below) + tensor map fields ``{field number: {key: array}}`` + single tensor
    fields ``{field number: array}`` -> message bytes. ``names`` gives field names for error messages."""
    parts: list[Any] = [msg.SerializeToString(deterministic=True)]  # maps in key order: the same bytes anywhere
    for number, tensors in maps.items():
        for key, x in tensors.items():
            body = _tensor_parts(x, f"{names.get(number, number)}.{key}")
            k = key.encode()
            entry_head = b"\x0a" + _varint(len(k)) + k + b"\x12" + _varint(_length(body))
            parts += [_varint((number << 3) | _LEN) + _varint(len(entry_head) + _length(body)) + entry_head, *body]
    for number, x in fields.items():
        body = _tensor_parts(x, str(names.get(number, number)))
        parts += [_varint((number << 3) | _LEN) + _varint(_length(body)), *body]
    return b"".join(parts)


# ---- decoding ------------------------------------------------------------------------------------------------

def _tensor(buf: memoryview, i: int, end: int) -> WireTensor:
    dtype, shape, data = 0, [], buf[0:0]
    while i < end:
        tag, i = _read_varint(buf, i, end)
        number, wt = tag >> 3, tag & 7
        if number == 1 and wt == 0:
            dtype, i = _read_varint(buf, i, end)
            dtype = dtype if dtype < 1 << 31 else -1  # an out-of-range enum: refused by the codec
        elif number == 2 and wt == _LEN:  # packed
            n, i = _read_varint(buf, i, end)
            stop = i + n
            if stop > end:
                raise WireError("shape runs past the end of the tensor")
            while i < stop:
                s, i = _read_varint(buf, i, stop)
                shape.append(s - (1 << 64) if s >= 1 << 63 else s)
        elif number == 2 and wt == 0:  # unpacked
            s, i = _read_varint(buf, i, end)
            shape.append(s - (1 << 64) if s >= 1 << 63 else s)
        elif number == 3 and wt == _LEN:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise WireError("tensor data runs past the end of the message")
            data = buf[i:i + n]
            i += n
        else:
            i = _skip(buf, i, end, wt)
    return WireTensor(dtype, tuple(shape), data)


def _map_entry(buf: memoryview, i: int, end: int) -> tuple[str, WireTensor]:
    key, value = "", WireTensor(0, (), buf[0:0])
    while i < end:
        tag, i = _read_varint(buf, i, end)
        number, wt = tag >> 3, tag & 7
        if number in (1, 2) and wt == _LEN:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise WireError("map entry runs past its end")
            if number == 1:
                try:
                    key = str(buf[i:i + n], "utf-8")
                except UnicodeDecodeError:
                    raise WireError("map key is not UTF-8") from None
            else:
                value = _tensor(buf, i, i + n)
            i += n
        else:
            i = _skip(buf, i, end, wt)
    return key, value


def decode(wire: bytes, cls: type[M], maps: frozenset[int] = frozenset(), fields: frozenset[int] = frozenset()
           ) -> tuple[M, dict[int, dict[str, WireTensor]], dict[int, WireTensor]]:
    """Message bytes -> (the message without the named tensor fields, {map field: {key: tensor}},
    {tensor field: tensor}). Every other field is parsed by protobuf."""
    buf = memoryview(wire).cast("B")
    end = len(buf)
    rest: list[memoryview] = []
    found_maps: dict[int, dict[str, WireTensor]] = {n: {} for n in maps}
    found: dict[int, WireTensor] = {}
    i = 0
    while i < end:
        start = i
        tag, i = _read_varint(buf, i, end)
        number, wt = tag >> 3, tag & 7
        if wt == _LEN and (number in maps or number in fields):
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise WireError("field runs past the end of the message")
            if number in maps:
                key, value = _map_entry(buf, i, i + n)
                found_maps[number][key] = value  # a repeated key: the last wins, as in protobuf
            else:
                found[number] = _tensor(buf, i, i + n)
            i += n
            continue
        i = _skip(buf, i, end, wt)
        rest.append(buf[start:i])
    try:
        msg = cls.FromString(b"".join(rest))  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise WireError(f"not a valid {cls.__name__}: {exc}") from None
    return msg, found_maps, found


# ---- the Compute messages -----------------------------------------------------------------------------------
# Field numbers come from the generated descriptor, so a change to the .proto cannot leave them stale.

def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


REQUEST_INPUTS = _number(pb.ComputeRequest, "inputs")
RESPONSE_GRADIENTS = _number(pb.ComputeResponse, "gradients")
# The single tensor fields of a ComputeResponse, by number.
RESPONSE_TENSORS = {_number(pb.ComputeResponse, name): name for name in ("triplets", "per_item_losses", "triplet_ids")}
_RESPONSE_NAMES = {RESPONSE_GRADIENTS: "gradients", **RESPONSE_TENSORS}
_RESPONSE_NUMBERS = {name: number for number, name in RESPONSE_TENSORS.items()}


class WireRequest:
    """A ComputeRequest as read by ``parse_compute_request``: ``inputs`` are views of the received bytes (no copy);
    every other field is the parsed message's."""

    __slots__ = ("inputs", "msg", "size")

    def __init__(self, msg: pb.ComputeRequest, inputs: dict[str, WireTensor], size: int) -> None:
        self.msg, self.inputs, self.size = msg, inputs, size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.msg, name)

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf spelling, so metrics treat both alike
        return self.size


def encode_compute_request(msg: pb.ComputeRequest, inputs: Mapping[str, Any]) -> bytes:
    """``msg`` (its ``inputs`` left empty) + named arrays or tensors -> the ComputeRequest's bytes."""
    return encode(msg, {REQUEST_INPUTS: inputs}, names={REQUEST_INPUTS: "inputs"})


_REQUEST_ID = _number(pb.ComputeRequest, "request_id")
_REQUEST_TARGETS = {_number(pb.ComputeRequest, "session_id"): "session_id", _number(pb.ComputeRequest, "loss"): "loss"}


def compute_request_head(data: bytes) -> tuple[str | None, str]:
    """(which member of the ``target`` oneof is set: "session_id", "loss" or None; the request id) of a
    ComputeRequest's bytes, by walking the top-level tags without parsing any other field (the last occurrence
    wins, as in protobuf). Raises ``WireError`` for bytes that are no message."""
    buf = memoryview(data).cast("B")
    end, i, target, request_id = len(buf), 0, None, ""
    while i < end:
        tag, i = _read_varint(buf, i, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _LEN and number == _REQUEST_ID:
            n, start = _read_varint(buf, i, end)
            request_id = str(buf[start:start + n], "utf-8", "replace")
        elif wire_type == _LEN:
            target = _REQUEST_TARGETS.get(number, target)
        i = _skip(buf, i, end, wire_type)
    return target, request_id


def parse_compute_request(data: bytes) -> WireRequest:
    """ComputeRequest bytes -> ``WireRequest``. Raises ``WireError`` for bytes that are no such message."""
    msg, maps, _ = decode(data, pb.ComputeRequest, frozenset({REQUEST_INPUTS}))
    return WireRequest(msg, maps[REQUEST_INPUTS], len(data))


def encode_compute_response(head: pb.ComputeResponse, gradients: Mapping[str, Any],
                            tensors: Mapping[str, Any | None]) -> bytes:
    """``head`` (the small fields) + ``gradients`` by input name + the single tensor fields by name
    (``triplets``, ``per_item_losses``, ``triplet_ids``; None leaves one out) -> the ComputeResponse's bytes."""
    fields = {_RESPONSE_NUMBERS[name]: t for name, t in tensors.items() if t is not None}
    return encode(head, {RESPONSE_GRADIENTS: gradients}, fields, names=_RESPONSE_NAMES)


def decode_compute_response(data: bytes) -> tuple[pb.ComputeResponse, dict[str, WireTensor], dict[str, WireTensor]]:
    """ComputeResponse bytes -> (the small fields, gradients by input name, single tensor fields by name)."""
    msg, maps, fields = decode(data, pb.ComputeResponse, frozenset({RESPONSE_GRADIENTS}), frozenset(RESPONSE_TENSORS))
    return msg, maps[RESPONSE_GRADIENTS], {RESPONSE_TENSORS[n]: t for n, t in fields.items()}


__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "compute_request_head", "RESPONSE_GRADIENTS", "RESPONSE_TENSORS", "REQUEST_INPUTS", "TensorError",
           "WireError", "WireRequest", "WireTensor", "decode", "decode_compute_response", "encode",
           "encode_compute_request", "encode_compute_response", "parse_compute_request"]
