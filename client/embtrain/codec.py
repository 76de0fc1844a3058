"""Tensors on the wire: dtype + shape + raw little-endian row-major bytes.

Shared by the SDK and the server. Decoding reads the message's bytes once (protobuf's accessor returns one copy)
and views them; encoding copies each tensor once (``tobytes`` reads non-contiguous input directly in C order). A
byte length that does not match shape x itemsize is refused with a ``TensorError`` naming the field.

Little-endian hosts only: the wire is little-endian and decoding views the received bytes as native numbers, so
on a big-endian host every multi-byte tensor would need a byte swap. Importing there fails with one clear error
rather than supporting a path no test could run.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .v1 import embtrain_pb2 as pb

if TYPE_CHECKING:  # pragma: no cover
    import torch

if sys.byteorder != "little":  # pragma: no cover - no such host to test on
    raise ImportError(f"embtrain needs a little-endian host (its tensors travel as little-endian bytes and are "
                      f"decoded as views); this host is {sys.byteorder}-endian")


class TensorError(ValueError):
    """A tensor that cannot be encoded or decoded. ``field`` names it (``inputs.embeddings``)."""

    def __init__(self, field: str, expected: str) -> None:
        super().__init__(f"{field}: {expected}")
        self.field = field
        self.expected = expected  # the message without the field, as a field violation's description


@dataclass(frozen=True)
class _DType:
    wire: int
    name: str
    numpy: str | None  # None: numpy has no such type (bfloat16)
    itemsize: int
    is_float: bool


_DTYPES = [
    _DType(pb.DTYPE_FLOAT16, "float16", "<f2", 2, True),
    _DType(pb.DTYPE_BFLOAT16, "bfloat16", None, 2, True),
    _DType(pb.DTYPE_FLOAT32, "float32", "<f4", 4, True),
    _DType(pb.DTYPE_FLOAT64, "float64", "<f8", 8, True),
    _DType(pb.DTYPE_INT32, "int32", "<i4", 4, False),
    _DType(pb.DTYPE_INT64, "int64", "<i8", 8, False),
    _DType(pb.DTYPE_BOOL, "bool", "|b1", 1, False),
    _DType(pb.DTYPE_UINT8, "uint8", "|u1", 1, False),
    _DType(pb.DTYPE_INT8, "int8", "|i1", 1, False),
    _DType(pb.DTYPE_INT16, "int16", "<i2", 2, False),
]
_BY_WIRE = {d.wire: d for d in _DTYPES}
_BY_NAME = {d.name: d for d in _DTYPES}

DTYPE_NAMES = tuple(d.name for d in _DTYPES)


def _spec(t: pb.Tensor, data: bytes, field: str) -> tuple[_DType, tuple[int, ...]]:
    d = _BY_WIRE.get(t.dtype)
    if d is None:
        raise TensorError(f"{field}.dtype", f"expected one of {', '.join(DTYPE_NAMES)}, got enum value {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}.shape", f"dimensions must be >= 0, got {list(shape)}")
    if len(shape) > 8:
        raise TensorError(f"{field}.shape", f"at most 8 dimensions, got {len(shape)}")
    count = math.prod(shape)
    if count * d.itemsize != len(data):
        raise TensorError(
            f"{field}.data",
            f"{len(data)} bytes, expected {count * d.itemsize} ({'x'.join(map(str, shape)) or 'scalar'} "
            f"{d.name} at {d.itemsize} bytes each)")
    return d, shape


def decode_numpy(t: pb.Tensor, field: str = "tensor") -> np.ndarray:
    """A read-only numpy view of the tensor's bytes. The protobuf accessor ``t.data`` hands out one copy of the
    bytes; it is read exactly once and viewed, never copied again."""
    data = t.data
    d, shape = _spec(t, data, field)
    if d.numpy is None:
        raise TensorError(f"{field}.dtype", "bfloat16 has no numpy type; decode with torch (embtrain[torch])")
    return np.frombuffer(data, dtype=np.dtype(d.numpy)).reshape(shape)


def decode_torch(t: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """A CPU torch tensor viewing the tensor's bytes (read once from the message, not copied again).
    Treat it as read-only."""
    import torch

    data = t.data
    d, shape = _spec(t, data, field)
    dtype = getattr(torch, d.name)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    global _WARNED
    if _WARNED:
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
    with warnings.catch_warnings():
        # The buffer is immutable bytes; nothing downstream writes into decoded inputs. torch warns about that
        # once per process, so only the first decode needs the filter (it costs a little on every call).
        warnings.simplefilter("ignore", UserWarning)
        out = torch.frombuffer(data, dtype=dtype).reshape(shape)
    _WARNED = True
    return out


_WARNED = False  # torch's one warning about a read-only buffer was given (and hidden) already


def wire_dtype_and_buffer(x: Any, field: str = "tensor") -> tuple[int, tuple[int, ...], memoryview]:
    """(wire dtype, shape, a flat byte view of the little-endian C-order data) for an array or tensor.

    No copy for contiguous little-endian CPU input; otherwise exactly one (to C order, from an explicitly
    big-endian numpy dtype, or off the GPU).
    """
    if _is_torch(x):
        return _torch_buffer(x, field)
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:  # a ragged nested list; numpy's message does not name the field
        raise TensorError(field, f"expected a numeric array or tensor (nested lists must be rectangular); numpy "
                          f"cannot convert this {type(x).__name__}: {exc}") from None
    if arr.dtype.kind in "OUSVcmM":
        raise TensorError(field, f"expected a numeric array, got dtype {arr.dtype}")
    name = {"f2": "float16", "f4": "float32", "f8": "float64", "i4": "int32", "i8": "int64", "b1": "bool",
            "u1": "uint8", "i1": "int8", "i2": "int16"}.get(f"{arr.dtype.kind}{arr.dtype.itemsize}")
    if name is None:
        raise TensorError(field, f"unsupported dtype {arr.dtype}; supported: {', '.join(DTYPE_NAMES)}")
    if arr.dtype.byteorder == ">":  # native ("=") is little-endian: the import guard above
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.require(arr, requirements="C")  # keeps 0-d arrays 0-d, unlike ascontiguousarray
    return _BY_NAME[name].wire, tuple(arr.shape), memoryview(arr.reshape(-1).view(np.uint8))


def _torch_buffer(x: torch.Tensor, field: str) -> tuple[int, tuple[int, ...], memoryview]:
    import torch

    if x.is_sparse or x.layout != torch.strided:
        raise TensorError(field, f"expected a dense (strided) tensor, got layout {x.layout}")
    if x.is_complex():
        raise TensorError(field, f"unsupported dtype {x.dtype}")
    name = str(x.dtype).removeprefix("torch.")
    d = _BY_NAME.get(name)
    if d is None:
        raise TensorError(field, f"unsupported dtype {x.dtype}; supported: {', '.join(DTYPE_NAMES)}")
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    if d.name == "bfloat16":
        x = x.view(torch.int16)  # numpy has no bfloat16: move the same bits as int16
    arr = x.numpy()
    return d.wire, tuple(x.shape), memoryview(arr.reshape(-1).view(np.uint8))


def encode(x: Any, field: str = "tensor") -> pb.Tensor:
    """A numpy array, torch tensor or nested list -> a ``Tensor`` message."""
    wire, shape, data = wire_dtype_and_buffer(x, field)
    return pb.Tensor(dtype=wire, shape=shape, data=data.tobytes())


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter")
