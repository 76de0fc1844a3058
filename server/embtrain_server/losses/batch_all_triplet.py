"""Batch-all triplet loss (Hermans, Beyer & Leibe 2017; LOSSES.md B.3)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..params import Param, Schema
from ._mining import (HINGE_PARAMS, REF_EMB, REF_LABELS, TripletSink, all_triplets, check_labels, check_reference,
                      empty_output, make_candidates, make_output)
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from .distances import ClampedEuclidean


@register
class BatchAllTriplet(Loss):
    """Every valid triplet ``(a, p, n)`` (``p != a`` same label, ``n`` other label) with
    ``ℓ = [D_ap - D_an + margin]_+`` (or ``softplus(D_ap - D_an)``), ``D = sqrt(max(||x_i - x_j||², 1e-12))``.

    ``reduction``: "mean" over all valid triplets, "mean_nonzero" over the active ones (every one when soft),
    or "sum". The O(n³) triplets are never materialised: memory is O(block · m).

    ``per_item``: for each of the ``n`` batch rows, the sum of ``ℓ`` over the triplets it anchors (0 for rows that
    anchor none). ``triplets``: the active triplets, lexicographic, capped at ``max_triplets``.

    Shardable: with ``ctx.shard`` only the shard's anchors are reduced; the selected and active counts that the
    reductions divide by are those of every shard; ``per_item`` covers the shard's rows.

    With a reference set (``ref_emb`` / ``ref_labels``, PML's semantics) the triplets are ``(a, p, n)`` with ``a``
    a batch row and ``p``, ``n`` reference rows (``y_p = y_a``, ``y_n != y_a``; no row is excluded as "self"), the
    means are over those triplets, ``triplets`` hold reference row indices in columns 1 and 2, and the gradient
    of ``ref_emb`` comes back too.
    """

    name = "batch_all_triplet"
    uses_memory = True
    description = ("Batch-all triplet loss (Hermans et al. 2017): every valid (anchor, positive, negative) of the "
                   "batch, clamped euclidean distance; mean, mean over active, or sum.")
    inputs = (EMBEDDINGS, LABELS, REF_EMB, REF_LABELS)
    schema = Schema((
        *HINGE_PARAMS,
        Param("reduction", "enum", "mean", "mean over all valid triplets, over the active ones, or sum",
              choices=("mean", "mean_nonzero", "sum")),
    ))
    mines_triplets = True
    shardable = True  # blockwise over anchor rows: a shard reduces its own anchors against every candidate

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])
        check_reference(inputs)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        emb = inputs["embeddings"]
        ref = inputs.get("ref_emb")
        c = make_candidates(emb, inputs["labels"], ctx.memory, ctx.anchor_rows(emb.shape[0]), ref,
                            inputs.get("ref_labels"))
        soft = bool(self.params["soft"])
        sink = TripletSink(ctx.max_triplets, ctx.want_triplets)
        res = all_triplets(ClampedEuclidean(), c, sink, margin=float(self.params["margin"]), soft=soft,
                           want_per_anchor=ctx.want_per_item)
        selected, active, valid = res.selected, res.active, res.valid_anchors
        sum_d_ap, sum_d_an = res.sum_d_ap, res.sum_d_an
        per_anchor = res.per_anchor
        if ctx.shard is not None:
            # Shard mode: this shard's anchors; counts (exact, int64) and distance sums over every shard.
            counts = ctx.global_sum(torch.tensor([selected, active, valid], dtype=torch.int64, device=emb.device))
            sums = ctx.global_sum(torch.tensor([sum_d_ap, sum_d_an], dtype=torch.float64, device=emb.device))
            selected, active, valid = (int(v) for v in counts.tolist())
            sum_d_ap, sum_d_an = (float(v) for v in sums.tolist())
            if per_anchor is not None:
                lo, hi = c.rows
                per_anchor = per_anchor[lo:hi]
        if selected == 0:
            return empty_output(emb, ctx)
        reduction = self.params["reduction"]
        denom = {"mean": selected, "mean_nonzero": active, "sum": 1}[reduction]
        scale = 1.0 / denom if denom else 0.0  # mean_nonzero with nothing active: 0, not 0/0
        stats = {"valid_anchors": float(valid), "selected_triplets": float(selected),
                 "active_triplets": float(active), "mean_d_ap": sum_d_ap / selected,
                 "mean_d_an": sum_d_an / selected}
        return make_output(emb, res.loss_sum * scale, res.grad * scale, ctx, sink.result(emb.device), sink.total,
                           per_anchor, stats, ref, None if res.grad_ref is None else res.grad_ref * scale)
