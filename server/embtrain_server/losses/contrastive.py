"""Contrastive loss (Hadsell, Chopra & LeCun 2006; LOSSES.md §E.1) over all pairs of a batch.

Same-label pairs cost ``½||x_i − x_j||²``; different-label pairs cost ``½[margin − D]_+²`` with
``D = sqrt(max(||x_i − x_j||², 1e-12))``; the reduction is over the ``n(n−1)/2`` unordered pairs.

With cross-batch memory (``ctx.memory``) the anchors are the batch rows and the partners are the later batch rows
plus every memory row: the pairs are ``(i, j)`` for batch ``i < j`` and ``(i, n + k)`` for every memory row
``k``, ``n(n−1)/2 + n·m`` of them; memory rows get no gradient.

The module also holds the squared-distance helpers the pairwise losses share: exact float64 values (``distances``,
LOSSES.md §0.6), made differentiable through the Gram form.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..params import Param, Schema
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from ._mining import check_labels
from .distances import sq_dists_with_grad


@register
class ContrastiveLoss(Loss):
    """Contrastive loss (§E.1). With cross-batch memory the pairs are (batch i, batch j > i) and (batch i,
    every memory row); the mean is over all of those pairs.

    Shardable: with ``ctx.shard`` a shard takes the pairs whose first row is one of its rows (``per_item``: their
    per-pair losses, row-major, its part of the global list); the mean still divides by every pair."""

    name = "contrastive"
    uses_memory = True
    description = (
        "Contrastive loss (Hadsell et al. 2006) over all unordered pairs: same label ½||xi-xj||², different "
        "label ½[margin - ||xi-xj||]_+²; mean (or sum) over the n(n-1)/2 pairs. With cross-batch memory the "
        "pairs (batch i, memory j) are added."
    )
    inputs = (EMBEDDINGS, LABELS)
    schema = Schema((
        Param("margin", "float", 1.0, "distance below which different-label pairs are pushed apart", minimum=0.0),
        Param("reduction", "enum", "mean", "mean over all pairs, or their sum", choices=("mean", "sum")),
    ))
    complexity = "n2"
    shardable = True  # a shard takes the pairs whose first row is one of its rows

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x, y = inputs["embeddings"], inputs["labels"]
        n = x.shape[0]
        cand, cand_y = x, y
        if ctx.memory is not None and ctx.memory.embeddings.shape[0] > 0:
            cand = torch.cat([x, ctx.memory.embeddings.detach().to(device=x.device, dtype=x.dtype)])
            cand_y = torch.cat([y, ctx.memory.labels.to(device=y.device, dtype=y.dtype)])
        total = cand.shape[0]
        # Shard mode: the pairs whose first (anchor) row is one of this shard's rows; the anchor rows keep their
        # gradient path through the slice, the partner rows theirs through ``cand``.
        lo, hi = ctx.anchor_rows(n)
        xa, ya = (x, y) if ctx.shard is None else (x[lo:hi], y[lo:hi])

        sq = sq_dists_with_grad(xa, cand)
        col = torch.arange(total, device=x.device)
        row = torch.arange(lo, hi, device=x.device)
        # Unordered batch pairs i < j once; every memory column (index >= n) with every batch row.
        used = (col[None, :] > row[:, None])
        same = ya[:, None] == cand_y[None, :]
        pos, neg = used & same, used & ~same

        dist = sq.clamp_min(1e-12).sqrt()
        gap = (self.params["margin"] - dist).clamp_min(0.0)
        per_pair = torch.where(pos, 0.5 * sq, torch.where(neg, 0.5 * gap.square(), 0.0))
        n_pairs = n * (n - 1) // 2 + n * (total - n)  # every shard's pairs: known from the shapes
        loss = per_pair.sum()
        if self.params["reduction"] == "mean" and n_pairs > 0:
            loss = loss / n_pairs
        counts = torch.stack([pos.sum(), neg.sum(), (neg & (gap > 0)).sum()])
        counts = ctx.global_sum(counts)  # every shard returns the global counts
        return LossOutput(
            loss=loss,
            per_item=per_pair.detach()[used] if ctx.want_per_item else None,
            stats={"positive_pairs": float(counts[0]), "negative_pairs": float(counts[1]),
                   "active_negative_pairs": float(counts[2])},
        )
