"""The contract every loss fulfils, and the registry that makes a new loss one new file.

A loss class declares its wire ``name``, its ``inputs`` and its parameter ``schema``; an instance is one
validated configuration (and, for stateful losses, the state a session keeps). ``forward`` receives tensors
that are already decoded, validated against ``inputs``, on the compute device and in the compute dtype, with
``requires_grad`` set on the differentiable ones, and returns a ``LossOutput``. The compute layer takes the
gradients (autograd of ``LossOutput.loss``, unless the loss supplies them) and does the encoding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import FailedPrecondition, InvalidArgument, invalid
from ..params import Param, Schema
from ..sharding import Shard


@dataclass(frozen=True)
class InputSpec:
    """A named input tensor. ``dtype`` is "float" or "int"; ``shape`` is documentation ("[n, d]")."""

    name: str
    dtype: str
    shape: str
    required: bool = True
    differentiable: bool = False
    description: str = ""


EMBEDDINGS = InputSpec("embeddings", "float", "[n, d]", True, True, "one embedding per row; finite")
LABELS = InputSpec("labels", "int", "[n]", True, False, "integer class label per row")


@dataclass(frozen=True)
class Memory:
    """Cross-batch memory as seen by a loss: detached rows (after the head) from earlier batches.

    Label-based metric losses take anchors from the batch and positives/negatives from the batch followed by
    these rows, so a candidate index ``j >= n`` means memory row ``j - n``.
    """

    embeddings: torch.Tensor  # [m, d], no grad
    labels: torch.Tensor  # [m] int64
    ids: torch.Tensor  # [m] int64 (-1 where the client sent no ids)


@dataclass
class ComputeContext:
    """What a loss may know besides its inputs."""

    device: torch.device
    max_triplets: int  # cap on mined triplets returned (the total is still counted)
    want_triplets: bool = True
    want_per_item: bool = False
    memory: Memory | None = None
    training: bool = True  # False: compute only, never update state (e.g. validation calls)
    # True when the session's optimiser steps the loss's trainable state (its nn.Parameters); the loss's own
    # ``update`` must then leave those parameters alone.
    state_optimized_externally: bool = False
    # Shard mode (only for a loss with ``shardable``): compute the terms of the anchors ``shard.rows(n)`` only;
    # see ``Loss.shardable``. None: the whole batch.
    shard: Shard | None = None

    def anchor_rows(self, n: int) -> tuple[int, int]:
        """The batch rows whose anchor terms this call computes: ``[0, n)``, or the shard's rows."""
        return (0, n) if self.shard is None else self.shard.rows(n)

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the shards (``t`` itself without a shard)."""
        return t if self.shard is None else self.shard.all_reduce(t)


@dataclass
class LossOutput:
    """The result of one forward.

    ``loss`` is a 0-dim tensor. If ``gradients`` is None the compute layer differentiates ``loss`` with
    autograd with respect to every differentiable input; a loss that computes its gradients itself (to keep
    memory O(n^2) in blockwise code) fills ``gradients`` by input name and may return a ``loss`` without graph.
    ``triplets`` are the active triplets (int64 [k, 3], candidate indices), sorted lexicographically and
    de-duplicated, at most ``ctx.max_triplets`` of them; ``triplets_total`` counts all of them.
    """

    loss: torch.Tensor
    gradients: dict[str, torch.Tensor] | None = None
    triplets: torch.Tensor | None = None
    triplets_total: int = 0
    per_item: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Loss(ABC):
    """Base class of every served loss. Subclasses set the class attributes and implement ``forward``."""

    name: ClassVar[str]
    description: ClassVar[str]
    inputs: ClassVar[tuple[InputSpec, ...]]
    schema: ClassVar[Schema] = Schema()
    family: ClassVar[str] = "native"
    mines_triplets: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    # Reads ``ctx.memory`` (cross-batch memory); a session refuses a memory for any other loss.
    uses_memory: ClassVar[bool] = False
    # Parameters that are refused with a specific message (e.g. torch's deprecated size_average).
    rejected_params: ClassVar[Mapping[str, str]] = {}
    # Memory growth used for the batch estimate: "n" (linear), "n2" (pairwise), "n2d", "n3" (triplet tensors).
    complexity: ClassVar[str] = "n2"
    # Whether the loss moves its own state after a step (``update``: island's centre rules). A loss without such a
    # rule (PML's learnable losses) has its trainable state stepped by the session's optimiser; a loss with one
    # hands it to the optimiser only when the client configured an optimiser.
    has_update_rule: ClassVar[bool] = True
    shardable: ClassVar[bool] = False
    """Whether ``forward`` honours ``ctx.shard`` (shard mode, ``embtrain_server.sharding``). With ``ctx.shard``
    set and a batch of ``n`` rows, a shardable loss promises:

    * it computes only the terms of the anchors ``ctx.shard.rows(n)`` against every candidate (all batch rows,
      then the memory rows), so its pairwise working memory is O(n/R · m) instead of O(n · m);
    * every global normaliser (the count of valid anchors, of selected or active triplets or pairs that the
      reduction divides by) is the count over all shards (``ctx.global_sum``, or computed from what every shard
      knows, such as ``n``), so ``loss`` is this shard's share (the sum over the shards is one server's loss)
      and its gradients (autograd of ``loss``, or its own ``gradients``) are this shard's partial gradients:
      full ``[n, ...]`` tensors, which the compute layer sums over the shards;
    * ``triplets`` are those of its anchors, sorted lexicographically and capped at ``ctx.max_triplets`` (in
      index order the shards' lists concatenate to the global order), ``triplets_total`` counts its own, and
      ``per_item`` is its anchors' part of the global per-item list, in the global order;
    * ``stats`` are global: the loss sums their counts and numerators over the shards itself (``ctx.global_sum``),
      so every shard returns the same stats (one server's, within round-off) and the compute layer keeps them
      as they are;
    * every shard calls the same collectives in the same order whatever its rows hold (an empty share too).

    A stateful loss with its own state update rule is never shardable: its update is not split between replicas.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.shardable and cls.stateful and cls.has_update_rule:
            raise TypeError(f"loss {cls.__name__}: a loss with a state update rule cannot be shardable")

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = self.schema.parse(params, reject=self.rejected_params)
        self.check_params()

    def check_params(self) -> None:
        """Cross-parameter checks (e.g. ``max_dist > min_dist``); raise ``InvalidArgument``."""

    def work_complexity(self, inputs: Mapping[str, torch.Tensor]) -> str:
        """How this configuration's arithmetic grows with the batch (``complexity``'s vocabulary, plus "n2log":
        n·m·log m, e.g. a sort per anchor), for the compute-time estimate; a loss whose cost depends on its
        parameters or inputs says so here."""
        return self.complexity

    def memory_complexity(self, inputs: Mapping[str, torch.Tensor]) -> str:
        """How this configuration's device memory grows with the batch, for the memory estimate."""
        return self.complexity

    def footprint(self, inputs: Mapping[str, torch.Tensor]) -> tuple[int, float] | None:
        """(device bytes, arithmetic operations) of a batch that has no ``embeddings`` (a ``torch.*`` loss's own
        inputs), for the memory and compute-time estimates; None: the estimate follows ``complexity`` from the
        embeddings."""
        return None

    def state_bytes(self, dim: int) -> int:
        """An upper estimate of the device memory of the state this loss builds for embeddings of width ``dim``
        (with its gradients and two optimiser slots), for the memory budget before anything is built."""
        return 0

    @property
    def returns_per_item(self) -> bool:
        """Whether every answer carries the per-item losses: a caller who asked for no reduction gets the list."""
        return self.params.get("reduction") == "none"

    def check_initial_state(self, initial: Mapping[str, torch.Tensor]) -> None:
        """Check a session's ``initial_state`` when the session is created, before its first batch fixes the
        width; raise ``InvalidArgument`` naming ``config.initial_state.<name>``. By default the tensors must be
        exactly what ``load_state_tensors`` accepts (names and shapes as far as they are known without a width)."""
        if not initial:
            return
        if not self.stateful:
            raise invalid(f"config.initial_state.{next(iter(initial))}",
                          f"loss {self.name!r} keeps no state, so there is nothing to initialise")
        try:
            type(self)(self.params).load_state_tensors(dict(initial))
        except InvalidArgument as exc:
            name = (exc.field or "").removeprefix("state.")
            field = f"config.initial_state.{name}"
            raise InvalidArgument(f"{field}: {exc.message.split(': ', 1)[-1]}", field=field) from None

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Loss-specific input checks beyond the generic ones (index ranges, lengths); raise ``InvalidArgument``.

        Runs on the decoded CPU tensors before anything is computed or any state is touched.
        """

    @abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        """Compute the loss. Must not modify state; see ``update`` for stateful losses."""

    # ---- session state (stateful losses only) -------------------------------------------------------------
    def init_state(self, dim: int, device: torch.device, generator: torch.Generator,
                   initial: Mapping[str, torch.Tensor]) -> None:
        """Create the session state for embeddings of width ``dim`` (e.g. island centres)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named state tensors (checkpointed, exported). Parameters trained by the session optimiser are
        ``torch.nn.Parameter`` instances among them."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned."""

    def update(self, inputs: dict[str, torch.Tensor], output: LossOutput, ctx: ComputeContext) -> None:
        """Apply a non-gradient state update after the step (e.g. island's paper centre rule)."""

    @classmethod
    def input_spec(cls, name: str) -> InputSpec | None:
        return next((s for s in cls.inputs if s.name == name), None)


# ---- registry ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Loss]] = {}
# Names that exist only with an optional extra: name prefix -> the extra to install.
_MISSING_EXTRAS: dict[str, str] = {}


def register(cls: type[Loss]) -> type[Loss]:
    """Class decorator: make ``cls`` reachable from the wire under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"loss {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def note_missing_extra(prefix: str, extra: str) -> None:
    _MISSING_EXTRAS[prefix] = extra


def get(name: str, field_name: str = "loss.name") -> type[Loss]:
    try:
        return _REGISTRY[name]
    except KeyError:
        for prefix, extra in _MISSING_EXTRAS.items():
            if name.startswith(prefix):
                raise FailedPrecondition(
                    f"{field_name}: loss {name!r} needs the optional '{extra}' extra on the server "
                    f"(pip install 'embtrain[{extra}]')", field=field_name) from None
        raise InvalidArgument(
            f"{field_name}: unknown loss {name!r}; ListLosses shows the {len(_REGISTRY)} available losses "
            f"(e.g. {', '.join(sorted(_REGISTRY)[:6])})", field=field_name) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def all_losses() -> list[type[Loss]]:
    return [_REGISTRY[n] for n in names()]


__all__ = [
    "EMBEDDINGS", "LABELS", "ComputeContext", "InputSpec", "Loss", "LossOutput", "Memory", "Param", "Schema",
    "all_losses", "get", "names", "note_missing_extra", "register",
]
