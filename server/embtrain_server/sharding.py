"""Shard mode: replicas that hold the same global batch compute one step together, each for its own anchors.

Every replica holds all ``n`` rows (and the same memory, head and session state). A ``Shard`` names this
replica's place among ``count`` of them and the two collectives the step needs. A shardable loss computes only
the terms of the anchors ``shard.rows(n)`` against every candidate, so its O(n·m) working tensors shrink to
O(n/R · m); the compute layer then sums the partial loss and gradients over the replicas (``all_reduce``) and
concatenates the per-anchor results (triplets, per-item losses) in index order (``all_gather``). The summed
result equals one server's computation of the whole batch within float round-off (another summation order).

The collectives are blocking and must be entered by every replica in the same order: a step is only sharded
when every replica is known to run it (see ../shared/design/distributed.md on broken gloo groups).

``local()`` is the trivial shard of a single replica; ``from_process_group()`` builds one on torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Shard:
    """This replica's share of a step computed by ``count`` replicas.

    ``all_reduce(t)``: the elementwise sum of every replica's ``t`` (same shape on all), as a new tensor of
    ``t``'s dtype, device and shape; ``t`` itself is left alone. ``all_gather(t)``: every replica's ``t`` in
    index order (their first dimensions may differ; the other dimensions and the dtype must agree).
    """

    index: int
    count: int
    all_reduce: Callable[[Tensor], Tensor]
    all_gather: Callable[[Tensor], list[Tensor]]

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is outside [0, {self.count})")

    def rows(self, n: int) -> tuple[int, int]:
        """The anchors this replica owns, ``[n·index // count, n·(index+1) // count)``: contiguous, in index
        order, together exactly ``[0, n)``; sizes differ by at most one."""
        return n * self.index // self.count, n * (self.index + 1) // self.count


def local() -> Shard:
    """The shard of a single replica (index 0 of 1): the collectives are copies."""
    return Shard(0, 1, lambda t: t.clone(), lambda t: [t.clone()])


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    # A SUM of bools is a count (read back as "any"); everything else is summed in its own dtype.
    return torch.int64 if dtype == torch.bool else dtype


def from_process_group(group: object | None = None) -> Shard:
    """A shard over torch.distributed's default process group (or ``group``): index = rank, count = world size.

    Works with gloo (CPU; a CUDA tensor is moved to the CPU for the collective and back) and NCCL. ``all_gather``
    takes tensors whose first dimension differs between ranks: the sizes are gathered first, every tensor is
    padded to the largest, gathered, and trimmed. Bool tensors travel as uint8 (gather) or int64 (sum).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed has no initialised process group")
    pg = group  # None: the default group
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    on_cpu = dist.get_backend(pg) == "gloo"

    def staged(t: Tensor) -> Tensor:
        return t.detach().to("cpu") if on_cpu and t.device.type != "cpu" else t.detach()

    def all_reduce(t: Tensor) -> Tensor:
        work = staged(t).to(_sum_dtype(t.dtype), copy=True).contiguous()
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=pg)
        out = work != 0 if t.dtype == torch.bool else work
        return out.to(t.device)

    def all_gather(t: Tensor) -> list[Tensor]:
        work = staged(t)
        if work.dtype == torch.bool:
            work = work.to(torch.uint8)
        work = work.contiguous()
        rest = tuple(work.shape[1:])
        size = torch.tensor([work.shape[0] if work.dim() else 1], dtype=torch.int64, device=work.device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=pg)
        counts = [int(s) for s in sizes]
        top = max(counts)
        if work.dim() == 0:
            work = work.reshape(1)
        padded = work
        if work.shape[0] < top:
            padded = torch.zeros((top, *rest), dtype=work.dtype, device=work.device)
            padded[:work.shape[0]] = work
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=pg)
        out = [p[:c] for p, c in zip(parts, counts)]
        if t.dim() == 0:
            out = [p.reshape(()) for p in out]
        return [(p != 0 if t.dtype == torch.bool else p).to(t.device) for p in out]

    return Shard(rank, world, all_reduce, all_gather)


__all__ = ["Shard", "from_process_group", "local"]
