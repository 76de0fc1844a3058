"""Wire tensors: round trips for every dtype (numpy and torch), zero-size and non-contiguous input, zero-copy
decoding, each kind of bad buffer and of unencodable input, and the refusal of big-endian hosts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from embtrain import codec
from embtrain.v1 import embtrain_pb2 as pb

NUMPY_DTYPES = ["float16", "float32", "float64", "int32", "int64", "bool", "uint8", "int8", "int16"]
TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool,
                torch.uint8, torch.int8, torch.int16]


def _sample(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal(shape) * 50).astype(dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(7, 3), (5,), (2, 3, 4), (0, 4), (3, 0), ()])
def test_numpy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    x = _sample(shape, dtype)
    t = codec.encode(x)
    assert list(t.shape) == list(shape)
    assert len(t.data) == x.nbytes
    back = codec.decode_numpy(pb.Tensor.FromString(t.SerializeToString()))
    assert back.dtype == x.dtype and back.shape == x.shape
    np.testing.assert_array_equal(back, x)
    via_torch = codec.decode_torch(t)
    np.testing.assert_array_equal(via_torch.numpy(), x)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_round_trip(dtype: torch.dtype) -> None:
    x = (torch.randn(6, 5) * 50).to(dtype)
    back = codec.decode_torch(codec.encode(x))
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(back, x)


def test_little_endian_layout_matches_numpy_tobytes() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    assert codec.encode(x).data == x.tobytes()
    big = x.astype(">f4")
    assert codec.encode(big).data == x.tobytes()


def test_bfloat16_bits_are_preserved() -> None:
    x = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    t = codec.encode(x)
    assert t.dtype == pb.DTYPE_BFLOAT16
    assert t.data == x.view(torch.int16).numpy().tobytes()
    with pytest.raises(codec.TensorError, match="bfloat16"):
        codec.decode_numpy(t, "x")


@pytest.mark.parametrize("make", [
    lambda: np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
    lambda: np.arange(24, dtype=np.float64).reshape(4, 6).T,
    lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
    lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6)[1:, ::3],
], ids=["numpy-strided", "numpy-transposed", "torch-transposed", "torch-sliced"])
def test_non_contiguous_input_is_encoded_in_c_order(make) -> None:  # type: ignore[no-untyped-def]
    x = make()
    dense = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    t = codec.encode(x)
    assert t.data == dense.tobytes()
    np.testing.assert_array_equal(codec.decode_numpy(t), dense)


class _CountingTensor:
    """Stands in for a message and counts reads of ``data`` (each read of a protobuf bytes field is a copy)."""

    def __init__(self, t: pb.Tensor) -> None:
        self._t, self.reads, self.last = t, 0, None
        self.dtype, self.shape = t.dtype, t.shape

    @property
    def data(self) -> bytes:
        self.reads += 1
        self.last = self._t.data
        return self.last


@pytest.mark.parametrize("decode", [codec.decode_numpy, codec.decode_torch], ids=["numpy", "torch"])
def test_decoding_copies_at_most_once(decode) -> None:  # type: ignore[no-untyped-def]
    t = _CountingTensor(codec.encode(np.arange(1000, dtype=np.float32)))
    out = decode(t)
    assert t.reads == 1
    address = out.ctypes.data if isinstance(out, np.ndarray) else out.data_ptr()
    assert address == np.frombuffer(t.last, dtype=np.uint8).ctypes.data  # a view of that one copy


@pytest.mark.parametrize("tensor,field,expected", [
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20), "x.data", "20 bytes, expected 24"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 28), "x.data", "28 bytes, expected 24"),
    (pb.Tensor(dtype=pb.DTYPE_INT64, shape=[4], data=b""), "x.data", "0 bytes, expected 32"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 3], data=b""), "x.shape", "dimensions must be >= 0"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "x.dtype", "expected one of"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"), "x.dtype", "expected one of"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 9, data=b"\0" * 4), "x.shape", "at most 8"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2**40, 2**40], data=b""), "x.data", "expected"),
], ids=["short", "long", "empty", "negative-dim", "unknown-dtype", "unspecified-dtype", "too-many-dims", "huge"])
def test_bad_buffers_are_refused_naming_the_field(tensor: pb.Tensor, field: str, expected: str) -> None:
    for decode in (codec.decode_numpy, codec.decode_torch):
        with pytest.raises(codec.TensorError) as info:
            decode(tensor, "x")
        assert info.value.field == field
        assert expected in str(info.value)


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()])])
def test_unsupported_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(codec.TensorError):
        codec.encode(bad, "inputs.x")


def test_sparse_torch_tensor_is_refused() -> None:
    with pytest.raises(codec.TensorError, match="dense"):
        codec.encode(torch.eye(3).to_sparse(), "inputs.x")


def test_ragged_nested_list_is_refused_naming_the_field() -> None:
    # numpy's own ValueError would not name the field, nor be a TensorError.
    with pytest.raises(codec.TensorError) as info:
        codec.encode([[1.0, 2.0], [3.0]], "inputs.embeddings")
    assert info.value.field == "inputs.embeddings"
    assert str(info.value).startswith("inputs.embeddings: expected a numeric array or tensor")
    assert info.value.expected == str(info.value).removeprefix("inputs.embeddings: ")


def test_big_endian_host_is_refused_at_import() -> None:
    # The codec views received bytes as native numbers: on a big-endian host it refuses to load, with one clear
    # message, rather than decode wrong values. Simulated by setting sys.byteorder before the first import.
    code = textwrap.dedent("""
        import sys
        sys.byteorder = "big"
        try:
            import embtrain.codec
        except ImportError as exc:
            print(exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "embtrain needs a little-endian host" in proc.stdout, proc.stderr[-2000:]
