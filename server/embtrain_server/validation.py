"""Request validation in one place: a request's inputs against the loss's declared inputs and the server's limits
(names, dtypes, shapes, finiteness, one label per row, the element limit and the device-memory budget), on the
decoded CPU tensors, before anything is computed or any state is touched. Stateless and session batches and
``Embed`` go through here. Raises ``InvalidArgument`` / ``ResourceExhausted`` naming the field."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import ResourceExhausted, invalid
from .losses.base import Loss

# Inputs every loss accepts besides its own: sample ids for cross-batch memory and triplet_ids.
IDS_INPUT = "ids"
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def validate_inputs(loss_cls: type[Loss], raw: Mapping[str, torch.Tensor], *,
                    max_batch_elements: int) -> dict[str, torch.Tensor]:
    """Generic checks on decoded CPU tensors: names, dtypes, embeddings shape and finiteness, labels/ids length.

    Returns the inputs with integer tensors widened to int64. The loss's ``check_inputs`` runs afterwards.
    """
    known = {s.name: s for s in loss_cls.inputs}
    allowed = set(known) | {IDS_INPUT}
    for name in raw:
        if name not in allowed:
            raise invalid(f"inputs.{name}", f"unknown input for loss {loss_cls.name!r}; "
                          f"expected one of: {', '.join(sorted(allowed))}")
    for spec in loss_cls.inputs:
        if spec.required and spec.name not in raw:
            raise invalid(f"inputs.{spec.name}", f"required by loss {loss_cls.name!r} ({spec.dtype} {spec.shape})")
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        kind = known[name].dtype if name in known else "int"
        where = f"inputs.{name}"
        if kind == "float":
            if not t.is_floating_point():
                raise invalid(where, f"expected a float dtype (float16, bfloat16, float32, float64), got {_dt(t)}")
            require_finite(t, where)
            out[name] = t
        else:
            if t.dtype not in _INT_DTYPES:
                raise invalid(where, f"expected an integer dtype (int32 or int64), got {_dt(t)}")
            out[name] = t.to(torch.int64)
    emb = out.get("embeddings")
    if emb is not None:
        if emb.dim() != 2:
            raise invalid("inputs.embeddings", f"expected 2 dimensions [n, d], got shape {list(emb.shape)}")
        n, d = emb.shape
        if n < 1 or d < 1:
            raise invalid("inputs.embeddings", f"expected n >= 1 rows and d >= 1 columns, got shape [{n}, {d}]")
        if n * d > max_batch_elements:
            raise ResourceExhausted(
                f"inputs.embeddings: {n} x {d} = {n * d} elements, over the server's max_batch_elements "
                f"({max_batch_elements})", field="inputs.embeddings")
        for name in ("labels", IDS_INPUT):
            t = out.get(name)
            if t is not None and (t.dim() != 1 or t.shape[0] != n):
                what = f"length {t.shape[0]}" if t.dim() == 1 else f"shape {list(t.shape)}"
                raise invalid(f"inputs.{name}", f"{what}, expected {n} (one per embedding row)")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one pass with no n x d temporary: NaN and +-inf reach the min or max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def require_finite(t: torch.Tensor, field: str) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())  # the failure path only: count for the message
        raise invalid(field, f"{bad} non-finite value(s) (NaN or Inf); every entry must be finite")


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def estimate_bytes(loss_cls: type[Loss], n: int, d: int, m: int, itemsize: int) -> int:
    """A rough upper estimate of the device memory one batch needs (n anchors, m candidates)."""
    base = 6 * n * d * itemsize
    if loss_cls.complexity == "n":
        return base
    pair = 8 * n * max(m, n) * max(itemsize, 4)  # a handful of n x m matrices (distances, masks, grads)
    if loss_cls.complexity == "n2d":
        pair += n * max(m, n) * d * itemsize
    if loss_cls.complexity == "n3":
        pair += 3 * n * max(m, n) * max(m, n) * max(itemsize, 4)
    return base + pair


def require_budget(loss_cls: type[Loss], embeddings: torch.Tensor, candidates: int, budget: int) -> None:
    """Refuse a batch whose estimated device memory exceeds ``budget`` bytes (0: no limit), before it runs."""
    n, d = embeddings.shape
    need = estimate_bytes(loss_cls, n, d, candidates, embeddings.element_size())
    if budget and need > budget:
        raise ResourceExhausted(
            f"inputs.embeddings: this batch needs about {need / 2**20:.0f} MiB on the device, over the "
            f"budget of {budget / 2**20:.0f} MiB; send smaller batches", field="inputs.embeddings")
