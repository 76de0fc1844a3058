"""Batch-hard triplet loss (Hermans, Beyer & Leibe 2017; LOSSES.md B.2)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..params import Schema
from ._mining import (HINGE_PARAMS, REF_EMB, REF_LABELS, check_labels, check_reference, empty_output,
                      evaluate_triplets, make_candidates, make_output, mine_batch_hard)
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from .distances import ClampedEuclidean


@register
class BatchHardTriplet(Loss):
    """For every valid anchor (it has a positive other than itself and a negative) the farthest positive and the
    closest negative under ``D = sqrt(max(||x_i - x_j||², 1e-12))``; ``ℓ_a = [D_ap* - D_an* + margin]_+`` (or
    ``softplus(D_ap* - D_an*)`` with ``soft``); loss = mean over valid anchors (0 when there are none).

    ``per_item``: ``ℓ_a`` for each valid anchor, in anchor order. ``triplets``: ``(a, p*, n*)`` with ``ℓ_a > 0``
    (every valid anchor when soft). With cross-batch memory, ``p*``/``n*`` are candidate indices (``>= n`` is a
    memory row).

    With a reference set (``ref_emb`` / ``ref_labels``, PML's semantics) the anchors are the batch rows and
    ``p*``/``n*`` come only from the reference rows (no row is excluded as "self"); valid anchors are those with
    a positive and a negative there. ``p*``/``n*`` in ``triplets`` are then reference row indices, and the
    gradient of ``ref_emb`` comes back too.

    Shardable: with ``ctx.shard`` only the shard's anchors are mined; the mean divides by the valid anchors of
    every shard.
    """

    name = "batch_hard_triplet"
    uses_memory = True
    description = ("Batch-hard triplet loss (Hermans et al. 2017): per anchor the hardest positive and hardest "
                   "negative, clamped euclidean distance, mean over valid anchors.")
    inputs = (EMBEDDINGS, LABELS, REF_EMB, REF_LABELS)
    schema = Schema((
        *HINGE_PARAMS,
    ))
    mines_triplets = True
    shardable = True  # per-anchor mining: a shard mines its own anchors against every candidate

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])
        check_reference(inputs)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        emb = inputs["embeddings"]
        ref = inputs.get("ref_emb")
        c = make_candidates(emb, inputs["labels"], ctx.memory, ctx.anchor_rows(emb.shape[0]), ref,
                            inputs.get("ref_labels"))
        dist = ClampedEuclidean()
        a, p, neg = mine_batch_hard(dist, c)
        if a.numel() == 0 and ctx.shard is None:
            return empty_output(emb, ctx)
        soft = bool(self.params["soft"])
        ev = evaluate_triplets(dist, c, a, p, neg, margin=float(self.params["margin"]), soft=soft,
                               unique_anchors=True)
        k = a.numel()
        active = torch.ones_like(ev.values, dtype=torch.bool) if soft else ev.values > 0
        triplets = torch.stack([a, p, neg], 1)[active]  # anchors ascending, one each: sorted and unique
        if ctx.shard is None:
            stats = {"valid_anchors": float(k), "selected_triplets": float(k),
                     "active_triplets": float(active.sum()), "mean_d_ap": float(ev.d_ap.mean()),
                     "mean_d_an": float(ev.d_an.mean())}
        else:
            # Shard mode: this shard's anchors; the mean is over the valid anchors of every shard.
            f64 = torch.float64
            total = ctx.global_sum(torch.stack([
                torch.tensor(float(k), dtype=f64, device=emb.device), active.sum().to(f64),
                ev.d_ap.sum(dtype=f64), ev.d_an.sum(dtype=f64)]))
            k = int(total[0])
            if k == 0:
                return empty_output(emb, ctx)
            stats = {"valid_anchors": float(k), "selected_triplets": float(k), "active_triplets": float(total[1]),
                     "mean_d_ap": float(total[2]) / k, "mean_d_an": float(total[3]) / k}
        return make_output(emb, ev.loss_sum / k, ev.grad / k, ctx, triplets[:max(ctx.max_triplets, 0)],
                           triplets.shape[0], ev.values if ctx.want_per_item else None, stats, ref,
                           None if ev.grad_ref is None else ev.grad_ref / k)
