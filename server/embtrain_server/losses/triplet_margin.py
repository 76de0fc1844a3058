"""torch's ``TripletMarginLoss`` / ``TripletMarginWithDistanceLoss`` with a label-based miner (LOSSES.md C)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..errors import invalid
from ..params import Param, Schema
from ._mining import (REF_EMB, REF_LABELS, TripletSink, all_triplets, check_labels, check_reference, check_triplets,
                      empty_output, evaluate_triplets, finalize_triplets, make_candidates, make_output,
                      mine_batch_hard, mine_semihard, refuse_memory_with_reference)
from .base import EMBEDDINGS, LABELS, ComputeContext, InputSpec, Loss, LossOutput, register
from .distances import make_distance

TRIPLETS = InputSpec("triplets", "int", "[k, 3]", False, False,
                     "explicit (anchor, positive, negative) row indices; used by miner 'given'")
OPTIONAL_LABELS = dataclasses.replace(LABELS, required=False,
                                      description="integer class label per row; needed by miners all, semihard, "
                                                  "batch_hard")


@register
class TripletMargin(Loss):
    """``ℓ = [margin + d(a,p) - d(a,n)]_+`` exactly as torch 2.13 computes it (``d`` anchor first; with ``swap``,
    ``d(a,n) := min(d(a,n), d(p,n))``), over the triplets chosen by ``miner``:

    * ``given``: the request's ``triplets`` in order (duplicates count; cross-batch memory is not used);
    * ``all``: every valid triplet; ``batch_hard``: B.2's selection with this distance;
    * ``semihard``: TF-Addons' rule (one negative per positive pair: the closest farther than the positive,
      else the farthest).

    ``miner`` left unset means "given" when ``triplets`` are sent and "semihard" otherwise.
    An empty selection gives 0 (torch's mean would give NaN).

    ``per_item``: ``ℓ`` per selected triplet in selection order (request order for ``given``; lexicographic
    otherwise); with ``reduction="none"`` it is the loss list, and ``loss`` is its sum, whose gradient is returned.
    ``triplets``: the selected triplets with ``ℓ > 0``, lexicographic, de-duplicated (candidate indices).

    With a reference set (``ref_emb`` / ``ref_labels``, PML's semantics) the anchors are the batch rows and the
    positives and negatives come only from the reference rows (no row is excluded as "self"): every miner selects
    among them, and ``given`` triplets are (anchor row, positive ref row, negative ref row), like PML's
    ``indices_tuple`` with ``ref_emb`` (``ref_labels`` is then optional). ``triplets`` hold reference row indices
    in columns 1 and 2, and the gradient of ``ref_emb`` comes back too.
    """

    name = "triplet_margin"
    uses_memory = True
    description = ("torch TripletMarginLoss / TripletMarginWithDistanceLoss with a miner (given, all, semihard, "
                   "batch_hard) and distance pairwise_distance(p, eps), squared_euclidean or cosine.")
    inputs = (EMBEDDINGS, OPTIONAL_LABELS, TRIPLETS, REF_EMB, REF_LABELS)
    schema = Schema((
        Param("margin", "float", 1.0, "hinge margin (torch requires > 0)", minimum=0.0, exclusive_minimum=True),
        Param("distance_kind", "enum", "pairwise_distance",
              "pairwise_distance = ||a - b + eps||_p (torch); squared_euclidean; cosine = 1 - cosine_similarity",
              choices=("pairwise_distance", "squared_euclidean", "cosine")),
        Param("p", "float", 2.0, "norm degree of pairwise_distance", minimum=0.0, exclusive_minimum=True,
              allow_inf=True),
        Param("eps", "float", 1e-6, "added to the difference by pairwise_distance", minimum=0.0),
        Param("swap", "bool", False, "distance swap (Balntas et al. 2016): d(a,n) := min(d(a,n), d(p,n))"),
        Param("reduction", "enum", "mean", "mean over the selected triplets, sum, or none (the per-triplet list)",
              choices=("mean", "sum", "none")),
        Param("miner", "enum", None, "triplet selection; unset: 'given' when triplets are sent, else 'semihard'",
              choices=("given", "all", "semihard", "batch_hard"), nullable=True),
    ))
    rejected_params = {
        "size_average": "deprecated in torch; use params.reduction",
        "reduce": "deprecated in torch; use params.reduction",
        "distance_function": "not a wire parameter; use params.distance_kind",
    }
    mines_triplets = True

    def work_complexity(self, inputs: Mapping[str, torch.Tensor]) -> str:
        return "n3" if self.miner_for(inputs) == "all" else self.complexity

    def memory_complexity(self, inputs: Mapping[str, torch.Tensor]) -> str:
        # miner "all" with no reduction keeps one value per triplet: n·p·q of them
        return "n3" if self.miner_for(inputs) == "all" and self.returns_per_item else self.complexity

    def miner_for(self, inputs: Mapping[str, torch.Tensor]) -> str:
        miner = self.params["miner"]
        if miner is not None:
            return str(miner)
        return "given" if inputs.get("triplets") is not None else "semihard"

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        n = inputs["embeddings"].shape[0]
        miner = self.miner_for(inputs)
        triplets = inputs.get("triplets")
        if miner == "given":
            if triplets is None:
                raise invalid("inputs.triplets", "required with params.miner='given': int64 [k, 3] row indices")
        elif inputs.get("labels") is None:
            raise invalid("inputs.labels", f"required with params.miner={miner!r} (or send inputs.triplets with "
                                           "miner 'given'): one integer class label per embedding row")
        m = check_reference(inputs, labels_needed=miner != "given")
        if triplets is not None:
            check_triplets(triplets, n, m)
        if inputs.get("labels") is not None:
            check_labels(inputs, n)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        emb = inputs["embeddings"]
        miner = self.miner_for(inputs)
        prm = self.params
        dist = make_distance(prm["distance_kind"], prm["p"], prm["eps"])
        margin, swap, reduction = float(prm["margin"]), bool(prm["swap"]), prm["reduction"]
        want_list = ctx.want_per_item or reduction == "none"
        ref, ref_labels = inputs.get("ref_emb"), inputs.get("ref_labels")
        if ref is not None:
            refuse_memory_with_reference(ctx.memory)
        if miner == "all":
            c = make_candidates(emb, inputs["labels"], ctx.memory, ref=ref, ref_labels=ref_labels)
            sink = TripletSink(ctx.max_triplets, ctx.want_triplets)
            res = all_triplets(dist, c, sink, margin=margin, swap=swap, want_values=want_list)
            if res.selected == 0:
                return empty_output(emb, ctx, per_item=want_list)
            scale = 1.0 / res.selected if reduction == "mean" else 1.0
            stats = {"valid_anchors": float(res.valid_anchors), "selected_triplets": float(res.selected),
                     "active_triplets": float(res.active), "mean_d_ap": res.sum_d_ap / res.selected,
                     "mean_d_an": res.sum_d_an / res.selected}
            return self._output(emb, ctx, res.loss_sum * scale, res.grad * scale, sink.result(emb.device),
                                sink.total, res.values, stats, ref, res.grad_ref, scale)
        if miner == "given":
            # Memory is not used: the indices refer to the request's rows (and the reference rows).
            c = make_candidates(emb, None, None, ref=ref, ref_labels=ref_labels)
            t = inputs["triplets"].to(device=c.x.device, dtype=torch.int64)
            a, p, neg = t[:, 0], t[:, 1], t[:, 2]
        else:
            c = make_candidates(emb, inputs["labels"], ctx.memory, ref=ref, ref_labels=ref_labels)
            a, p, neg = (mine_semihard if miner == "semihard" else mine_batch_hard)(dist, c)
        k = a.numel()
        if k == 0:
            return empty_output(emb, ctx, per_item=want_list)
        ev = evaluate_triplets(dist, c, a, p, neg, margin=margin, swap=swap, unique_anchors=miner == "batch_hard")
        scale = 1.0 / k if reduction == "mean" else 1.0
        active = ev.values > 0
        triplets, total = finalize_triplets(torch.stack([a, p, neg], 1)[active], ctx.max_triplets)
        stats = {"valid_anchors": float(torch.unique(a).numel()), "selected_triplets": float(k),
                 "active_triplets": float(active.sum()), "mean_d_ap": float(ev.d_ap.mean()),
                 "mean_d_an": float(ev.d_an.mean())}
        return self._output(emb, ctx, ev.loss_sum * scale, ev.grad * scale, triplets, total, ev.values, stats, ref,
                            ev.grad_ref, scale)

    def _output(self, emb: torch.Tensor, ctx: ComputeContext, loss: float, grad: torch.Tensor,
                triplets: torch.Tensor, total: int, values: torch.Tensor | None,
                stats: dict[str, float], ref: torch.Tensor | None = None, grad_ref: torch.Tensor | None = None,
                scale: float = 1.0) -> LossOutput:
        # With reduction "none" the per-triplet list is the loss itself, whatever want_per_item says.
        keep = ctx.want_per_item or self.params["reduction"] == "none"
        return make_output(emb, loss, grad, ctx, triplets, total, values if keep else None, stats, ref,
                           None if grad_ref is None else grad_ref * scale)
