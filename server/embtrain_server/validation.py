"""Request validation in one place: a request's inputs against the loss's declared inputs and the server's limits
(names, dtypes, shapes, finiteness, one label per row, the element limit and the device-memory budget), on the
decoded CPU tensors, before anything is computed or any state is touched. Stateless and session batches and
``Embed`` go through here. Raises ``InvalidArgument`` / ``ResourceExhausted`` naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ResourceExhausted, invalid
from . import devices, losses
from .config import ServerConfig
from .losses.base import EMBEDDINGS, InputSpec, Loss

if TYPE_CHECKING:  # pragma: no cover
    from .sessions import Session, SessionSpec

# Inputs every loss accepts besides its own: sample ids for cross-batch memory and triplet_ids.
IDS_INPUT = "ids"
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Limits:
    """The server's limits on one request."""

    max_batch_elements: int
    memory_budget: int  # bytes of device memory one request may need (estimate); 0: no limit
    max_compute_seconds: float = 0.0  # estimated compute time one request may need; 0: no limit
    compute_rate: float = 2e9  # operations per second the estimate assumes


def limits_for(config: ServerConfig, device: torch.device) -> Limits:
    """The configured limits, with the device's defaults filled in."""
    return Limits(config.max_batch_elements, config.memory_budget_bytes or int(0.8 * devices.memory_total(device)),
                  config.max_compute_seconds, config.compute_rate or (2e9 if device.type == "cpu" else 2e12))


def check_compute(loss: Loss, raw: Mapping[str, torch.Tensor], limits: Limits,
                  session: Session | None = None, min_rows: int = 1) -> dict[str, torch.Tensor]:
    """Every check of a Compute batch that needs no loss state: the inputs against the loss's declared inputs and
    the limits; for a session, its width, its memory's need for labels and the memory its state will take; the
    device-memory budget of the batch against every candidate (memory rows included). The loss's own checks follow
    (``Loss.check_inputs``; in a session once its state exists, as they may need it: island's K centres)."""
    inputs = validate_inputs(type(loss), raw, max_batch_elements=limits.max_batch_elements, min_rows=min_rows)
    return check_validated(loss, inputs, limits, session)


def check_validated(loss: Loss, inputs: dict[str, torch.Tensor], limits: Limits,
                    session: Session | None = None) -> dict[str, torch.Tensor]:
    """The part of ``check_compute`` after ``validate_inputs`` (which needs no session state, so a batch may pass
    it before its session's turn): the session's width, memory and state budget, and the resources of the batch."""
    emb = inputs.get("embeddings")
    if session is None:
        if emb is not None:
            require_resources(loss, inputs, candidates(inputs), limits)
            if loss.stateful:  # a stateless call of a loss with state builds it for this batch
                require_loss_state_budget(loss, int(emb.shape[1]), limits.memory_budget)
        elif (footprint := loss.footprint(inputs)) is not None:
            _require_within(*footprint, limits)
        return inputs
    if emb is None:
        raise invalid("inputs.embeddings", "required in a session (the head and the memory act on it)")
    session.check_width(int(emb.shape[1]))
    if session.spec.head and "ref_emb" in inputs:
        raise invalid("inputs.ref_emb", "not in a session with a head: the head maps the embeddings, not a reference "
                      "set; use a session without a head (or a stateless call)")
    if session.spec.memory_size and "ref_emb" in inputs:
        raise invalid("inputs.ref_emb", "not with a cross-batch memory: the memory already extends the candidates; "
                      "use a session without memory_size (or a stateless call)")
    if session.spec.memory_size and "labels" not in inputs:
        raise invalid("inputs.labels", "required when the session has a cross-batch memory")
    _require_state_budget(session, int(emb.shape[1]), limits.memory_budget)
    require_resources(loss, inputs, candidates(inputs) + session.memory_fill, limits, head_ops(session.spec, emb))
    return inputs


def candidates(inputs: Mapping[str, torch.Tensor]) -> int:
    """The rows every anchor is compared with: the batch, or the reference set of a loss that takes one
    (``ref_emb``, pml.* losses) when it is the larger."""
    n = int(inputs["embeddings"].shape[0])
    ref = inputs.get("ref_emb")
    return max(n, int(ref.shape[0])) if ref is not None and ref.dim() == 2 else n


def check_step(session: Session, loss: Loss, inputs: Mapping[str, torch.Tensor], limits: Limits) -> None:
    """The whole step of a group session (its slices concatenated): rows, size and the device-memory budget."""
    emb = inputs["embeddings"]
    n, d = emb.shape
    if n < 1:
        raise invalid("inputs.embeddings", "the slices of this step hold no rows at all; expected n >= 1 in total")
    if n * d > limits.max_batch_elements:
        raise ResourceExhausted(f"inputs.embeddings: the step's slices hold {n} x {d} = {n * d} elements, over the "
                                f"server's max_batch_elements ({limits.max_batch_elements})", field="inputs.embeddings")
    require_resources(loss, inputs, n + session.memory_fill, limits, head_ops(session.spec, emb))


def head_ops(spec: SessionSpec, embeddings: torch.Tensor) -> float:
    """The head's forward and backward arithmetic on a batch (a deep or wide head costs as much as the loss), with
    a fixed cost per layer for the dispatch of its forward and backward."""
    n, d = embeddings.shape
    layers = sum(len(item.get("hidden", [])) + 1 for item in spec.head)
    return 6.0 * n * head_parameters(spec, int(d))[0] + 2e5 * layers


def check_embed(session: Session, raw: torch.Tensor, limits: Limits) -> torch.Tensor:
    """An Embed request's embeddings (the field is ``embeddings``): the same checks as a Compute batch's."""
    x = validate_inputs((EMBEDDINGS,), {"embeddings": raw}, max_batch_elements=limits.max_batch_elements,
                        prefix="", owner="Embed", min_rows=0)["embeddings"]
    session.check_width(int(x.shape[1]), "embeddings")
    if session.state is None and x.shape[0] == 0:
        raise invalid("embeddings", "no rows: the session has seen no batch yet, and its embedding width is fixed "
                      "by real rows; send at least one")
    _require_state_budget(session, int(x.shape[1]), limits.memory_budget)
    return x


def validate_inputs(declared: type[Loss] | Sequence[InputSpec], raw: Mapping[str, torch.Tensor], *,
                    max_batch_elements: int, prefix: str = "inputs.", owner: str | None = None,
                    min_rows: int = 1) -> dict[str, torch.Tensor]:
    """Generic checks on decoded CPU tensors against declared inputs (a loss class, or the specs themselves):
    names, dtypes, embeddings shape, finiteness and size, labels/ids length.

    Returns the inputs with integer tensors widened to int64. The loss's ``check_inputs`` runs afterwards.
    """
    specs = declared.inputs if isinstance(declared, type) else tuple(declared)
    what = owner or (f"loss {declared.name!r}" if isinstance(declared, type) else "this call")
    known = {s.name: s for s in specs}
    allowed = set(known) | ({IDS_INPUT} if isinstance(declared, type) else set())
    for name in raw:
        if name not in allowed:
            raise invalid(f"{prefix}{name}", f"unknown input for {what}; expected one of: {', '.join(sorted(allowed))}")
    for spec in specs:
        if spec.required and spec.name not in raw:
            raise invalid(f"{prefix}{spec.name}", f"required by {what} ({spec.dtype} {spec.shape})")
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        kind = known[name].dtype if name in known else "int"
        where = f"{prefix}{name}"
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
        where = f"{prefix}embeddings"
        if emb.dim() != 2:
            raise invalid(where, f"expected 2 dimensions [n, d], got shape {list(emb.shape)}")
        n, d = emb.shape
        if n < min_rows or d < 1:
            raise invalid(where, f"expected n >= {min_rows} rows and d >= 1 columns, got shape [{n}, {d}]")
        if max(n, 1) * d > max_batch_elements:  # a width that one row could not have is refused with no rows too
            raise ResourceExhausted(
                f"{where}: {n} x {d} = {n * d} elements, over the server's max_batch_elements "
                f"({max_batch_elements}); send smaller batches", field=where)
        for name in ("labels", IDS_INPUT):
            t = out.get(name)
            if t is not None and (t.dim() != 1 or t.shape[0] != n):
                size = f"length {t.shape[0]}" if t.dim() == 1 else f"shape {list(t.shape)}"
                raise invalid(f"{prefix}{name}", f"{size}, expected {n} (one per embedding row)")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, in one pass with no n x d temporary: NaN and +-inf reach the min or max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())  # two torch ops on 0-d tensors cost more than the pass


def require_finite(t: torch.Tensor, field: str) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())  # the failure path only: count for the message
        raise invalid(field, f"{bad} non-finite value(s) (NaN or Inf); every entry must be finite")


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def estimate_bytes(complexity: str, n: int, d: int, m: int, itemsize: int) -> int:
    """A rough upper estimate of the device memory one batch needs (n anchors, m candidates)."""
    base = 6 * n * d * itemsize
    if complexity == "n":
        return base
    pair = 8 * n * max(m, n) * max(itemsize, 4)  # a handful of n x m matrices (distances, masks, grads)
    if complexity == "n2d":
        pair += n * max(m, n) * d * itemsize
    if complexity == "n3":
        pair += 3 * n * max(m, n) * max(m, n) * max(itemsize, 4)
    return base + pair


def estimate_operations(complexity: str, n: int, d: int, m: int) -> float:
    """A rough estimate of one batch's arithmetic (the n³ constant was calibrated on the former O(n³) matrix form of
    weighted_margin_ranking, the slowest loss per n³; "n2log", n·m·log m, on its present counting form)."""
    m = max(m, n)
    if complexity == "n":
        return 20.0 * n * d
    ops = 10.0 * n * m * d + 50.0 * n * m
    if complexity == "n2d":
        ops += 20.0 * n * m * d
    if complexity == "n2log":
        ops += 400.0 * n * m * math.log2(max(m, 2))
    if complexity == "n3":
        ops += 100.0 * n * m * m
    return ops


def require_resources(loss: Loss, inputs: Mapping[str, torch.Tensor], candidates: int, limits: Limits,
                      extra_ops: float = 0.0) -> None:
    """Refuse, before it runs, a batch whose estimated device memory exceeds the budget or whose estimated compute
    time (the loss's, plus ``extra_ops``: a session's head) exceeds ``max_compute_seconds``."""
    emb = inputs["embeddings"]
    n, d = emb.shape
    require_budget_rows(loss.memory_complexity(inputs), n, d, emb.element_size(), candidates, limits.memory_budget)
    _require_time(estimate_operations(loss.work_complexity(inputs), n, d, candidates) + extra_ops, limits,
                  "inputs.embeddings")


def estimated_seconds(loss: Loss, inputs: Mapping[str, torch.Tensor], limits: Limits) -> float:
    """The estimated compute time of a checked stateless batch (``inf`` when there is no estimate)."""
    emb = inputs.get("embeddings")
    if emb is None:
        return math.inf
    n, d = emb.shape
    return estimate_operations(loss.work_complexity(inputs), n, d, n) / limits.compute_rate


def _require_within(nbytes: int, ops: float, limits: Limits) -> None:
    """A batch without embeddings (a ``torch.*`` loss's own inputs), by the loss's own footprint."""
    if limits.memory_budget and nbytes > limits.memory_budget:
        raise ResourceExhausted(f"inputs: this batch needs about {nbytes / 2**20:.0f} MiB on the device, over the "
                                f"budget of {limits.memory_budget / 2**20:.0f} MiB; send smaller batches",
                                field="inputs")
    _require_time(ops, limits, "inputs")


def _require_time(ops: float, limits: Limits, field: str) -> None:
    seconds = ops / limits.compute_rate
    if limits.max_compute_seconds and seconds > limits.max_compute_seconds:
        raise ResourceExhausted(
            f"{field}: this batch needs an estimated {seconds:.0f} s of compute, over the server's "
            f"max_compute_seconds ({limits.max_compute_seconds:g}); send smaller batches", field=field)


def working_bytes(loss: Loss, inputs: Mapping[str, torch.Tensor], candidates: int) -> int:
    """The estimated device memory of a validated batch while it computes."""
    emb = inputs.get("embeddings")
    if emb is None:
        footprint = loss.footprint(inputs)
        return footprint[0] if footprint is not None else 0
    n, d = emb.shape
    return estimate_bytes(loss.memory_complexity(inputs), n, d, candidates, emb.element_size())


def require_budget_rows(complexity: str, n: int, d: int, itemsize: int, candidates: int, budget: int) -> None:
    need = estimate_bytes(complexity, n, d, candidates, itemsize)
    if budget and need > budget:
        raise ResourceExhausted(
            f"inputs.embeddings: this batch needs about {need / 2**20:.0f} MiB on the device, over the "
            f"budget of {budget / 2**20:.0f} MiB; send smaller batches", field="inputs.embeddings")


def head_parameters(spec: SessionSpec, in_dim: int) -> tuple[int, int]:
    """(parameters, output width) of a session's head for embeddings of width ``in_dim``."""
    params, dim = 0, in_dim
    for item in spec.head:
        widths = [*item.get("hidden", []), item["out_dim"]] if "out_dim" in item else []
        for width in widths:
            params += dim * width + width
            dim = width
    return params, dim


def state_bytes(spec: SessionSpec, in_dim: int) -> int:
    """An upper estimate of the device memory a session's state takes for embeddings of width ``in_dim``: head
    parameters with their gradients and two optimiser slots each, the loss's state (island's centres, PML's
    classifier weights) and the memory bank."""
    params, dim = head_parameters(spec, in_dim)
    bank = spec.memory_size * (dim * 8 + 16)  # float64 rows at most, label and id
    loss = losses.get(spec.loss)(spec.params)
    return 4 * params * 8 + loss.state_bytes(dim) + bank


def require_loss_state_budget(loss: Loss, dim: int, budget: int) -> None:
    """A stateless call of a loss that builds state (a learnable PML loss builds its module at the batch's width, and
    the request's own weights stand in for its parameters): refuse it before building when the state would not fit
    the budget."""
    need = loss.state_bytes(dim)
    if budget and need > budget:
        raise ResourceExhausted(
            f"params: loss {loss.name!r} would build about {need / 2**20:.0f} MiB of state for embeddings of width "
            f"{dim}, over the server's memory budget of {budget / 2**20:.0f} MiB; use fewer classes", field="params")


def _require_state_budget(session: Session, in_dim: int, budget: int) -> None:
    """A session without state yet builds it for this width: refuse a head and memory over the budget first."""
    if session.state is not None or not budget:
        return
    need = state_bytes(session.spec, in_dim)
    if need > budget:
        raise ResourceExhausted(
            f"config: this session's head, optimiser state and memory for embeddings of width {in_dim} need about "
            f"{need / 2**20:.0f} MiB, over the server's memory budget of {budget / 2**20:.0f} MiB; use a smaller "
            "head or memory", field="config")
