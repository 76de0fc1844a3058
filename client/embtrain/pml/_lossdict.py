"""PML's unreduced loss dictionary (``reducer=DoNothingReducer()``), rebuilt from the server's packed answer.

With ``reducer_params: {"per_item": "dict"}`` a ``pml.*`` answer's ``per_item_losses`` is the whole dictionary in one
float64 tensor (float64 holds every float16 / bfloat16 / float32 / float64 value and every integer below 2**53
exactly), as the server's ``embtrain_server.losses.pml.pack_loss_dict`` writes it:

    [PACK_MAGIC, PACK_VERSION, S, structure (S numbers), elements (the rest)]

``elements`` are the dictionary's elements concatenated: every sub-loss's floating-point ``losses`` flattened, in the
dictionary's order (the order of the ``element_weights`` input). ``structure`` is the dictionary as a value:

    0                                   None
    1, x                                a Python int
    2, x                                a Python float
    3, L, c_1 .. c_L                    a str, as L Unicode code points
    4, K, v_1 .. v_K                    a tuple of K values
    5, K, v_1 .. v_K                    a list of K values
    6, K, (key_1, v_1) .. (key_K, v_K)  a dict (keys are str values), in its order
    7, dtype, ndim, shape.., data..     a tensor given inline (indices)
    8, dtype, ndim, shape..             a tensor whose data is the next numel() numbers of ``elements``

with ``dtype`` the position in ``PACK_DTYPES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from ..errors import EmbtrainError

PACK_MAGIC = 5262668.0
PACK_VERSION = 1.0
PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool)


@dataclass
class LossDict:
    """A decoded dictionary: ``value`` is PML's dictionary; ``elements`` are its element tensors in order, each as
    (the sub-loss's dict, the key holding it) so that they can be replaced; ``structure`` is everything but the
    element values (keys, shapes, dtypes, indices, reduction types): two calls computed the same elements exactly
    when their structures are equal."""

    value: dict[str, Any]
    elements: list[tuple[dict[str, Any], str]]
    structure: torch.Tensor

    def element_tensors(self) -> list[torch.Tensor]:
        return [holder[key] for holder, key in self.elements]

    def triplets(self) -> torch.Tensor | None:
        """The (anchor, positive, negative) indices of the first sub-loss reduced per triplet, as [k, 3] int64."""
        for info in self.value.values():
            if isinstance(info, dict) and info.get("reduction_type") == "triplet":
                indices = info.get("indices")
                if isinstance(indices, (tuple, list)) and len(indices) == 3:
                    return torch.stack([torch.as_tensor(t).to(torch.int64) for t in indices], 1)
        return None


def _malformed(why: str) -> EmbtrainError:
    """An answer the module cannot decode: the server's fault (or an older server's), not the caller's."""
    return EmbtrainError(grpc.StatusCode.INTERNAL, f"malformed per_item_losses from the server: not a packed loss "
                                                   f"dictionary ({why}); is the server older than this client?")


def unpack(packed: Any, device: torch.device | None = None) -> LossDict:
    """The server's packed dictionary -> PML's dictionary, its tensors on ``device`` (indices and elements in their
    own dtypes, exactly PML's values)."""
    if packed is None or not torch.is_tensor(packed) or packed.dim() != 1 or packed.numel() < 3:
        raise _malformed("missing or too short")
    packed = packed.detach().to("cpu", torch.float64)
    if packed[0].item() != PACK_MAGIC or packed[1].item() != PACK_VERSION:
        raise _malformed(f"header {packed[:2].tolist()}")
    size = int(packed[2].item())
    if size < 0 or 3 + size > packed.numel():
        raise _malformed("structure beyond the end")
    structure = packed[3:3 + size]
    data = packed[3 + size:]
    nums = structure.tolist()
    pos = 0
    used = 0
    elements: list[tuple[dict[str, Any], str]] = []

    def take() -> float:
        nonlocal pos
        if pos >= len(nums):
            raise _malformed("structure ends early")
        x = nums[pos]
        pos += 1
        return x

    def count() -> int:
        x = take()
        if not (x >= 0 and math.isfinite(x) and x == int(x)):
            raise _malformed(f"count {x}")
        return int(x)

    def tensor(inline: bool) -> torch.Tensor:
        nonlocal pos, used
        code = count()
        if code >= len(PACK_DTYPES):
            raise _malformed(f"dtype code {code}")
        shape = tuple(count() for _ in range(count()))
        numel = math.prod(shape)
        if inline:
            if pos + numel > len(nums):
                raise _malformed("tensor beyond the structure")
            flat = structure[pos:pos + numel]
            pos += numel
        else:
            if used + numel > data.numel():
                raise _malformed("elements beyond the end")
            flat = data[used:used + numel]
            used += numel
        return flat.to(PACK_DTYPES[code], copy=True).reshape(shape).to(device or "cpu")

    def value(slot: tuple[dict[str, Any], str] | None = None) -> Any:
        kind = take()
        if kind == 0:
            return None
        if kind == 1:
            return int(take())
        if kind == 2:
            return take()
        if kind == 3:
            return "".join(chr(count()) for _ in range(count()))
        if kind in (4, 5):
            items = [value() for _ in range(count())]
            return tuple(items) if kind == 4 else items
        if kind == 6:
            out: dict[str, Any] = {}
            for _ in range(count()):
                key = value()
                if not isinstance(key, str):
                    raise _malformed("a dict key that is not a str")
                out[key] = value((out, key))
            return out
        if kind == 7:
            return tensor(inline=True)
        if kind == 8 and slot is not None:  # an element tensor (always a dict's value: a sub-loss's "losses")
            elements.append(slot)
            return tensor(inline=False)
        raise _malformed(f"value kind {kind}")

    try:
        result = value()
    except (ValueError, OverflowError, RuntimeError) as exc:  # chr() of a bad code point, a shape that is no shape
        raise _malformed(str(exc)) from None
    if not isinstance(result, dict) or pos != len(nums) or used != data.numel():
        raise _malformed("trailing data")
    return LossDict(result, elements, structure)


__all__ = ["PACK_DTYPES", "PACK_MAGIC", "PACK_VERSION", "LossDict", "unpack"]
