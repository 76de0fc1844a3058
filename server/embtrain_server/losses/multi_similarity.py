"""Multi-similarity loss (Wang et al., CVPR 2019; LOSSES.md §E.2) with its pair mining, vectorised with masks.

Cosine similarities ``S = x̂ x̂ᵀ`` of L2-normalised rows; for each anchor the hard positives ``P'`` (less similar
than the most similar negative plus epsilon) and hard negatives ``N'`` (more similar than the least similar
positive minus epsilon) enter two soft-plus-like terms. "Self" is removed by index, not by ``S < 1 − 1e-5``
as in the official code (which also drops duplicate genuine positives). Anchors with an empty ``P``, ``N``,
``P'`` or ``N'`` contribute 0 and still count in the ``1/n``.

With cross-batch memory (``ctx.memory``) the anchors are the batch rows and the positives/negatives come from
the batch rows followed by the memory rows (no gradient through memory).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..params import Param, Schema
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from ._mining import check_labels


@register
class MultiSimilarityLoss(Loss):
    """Multi-similarity loss (§E.2); the stats count the mined (anchor, partner) pairs.

    Shardable: with ``ctx.shard`` a shard computes its anchors' terms against every candidate (``per_item``: its
    anchors' ℓ_i); the loss still divides by the global ``n``."""

    name = "multi_similarity"
    uses_memory = True
    description = (
        "Multi-similarity loss (Wang et al. 2019) on cosine similarities with its epsilon pair mining: "
        "(1/alpha)·log(1 + Σ_P' e^{-alpha(S-base)}) + (1/beta)·log(1 + Σ_N' e^{beta(S-base)}), mean over anchors. "
        "Self is removed by index; with cross-batch memory the partners include the memory rows."
    )
    inputs = (EMBEDDINGS, LABELS)
    schema = Schema((
        Param("alpha", "float", 2.0, "scale of the positive term", minimum=0.0, exclusive_minimum=True),
        Param("beta", "float", 50.0, "scale of the negative term", minimum=0.0, exclusive_minimum=True),
        Param("base", "float", 0.5, "similarity offset lambda"),
        Param("epsilon", "float", 0.1, "mining margin", minimum=0.0),
    ))
    complexity = "n2"
    shardable = True  # mining and terms are per anchor row

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x = inputs["embeddings"]
        n = x.shape[0]
        sim, keep_pos, keep_neg, anchor_ok = self._mine(inputs, ctx)
        p = self.params
        alpha, beta, base = p["alpha"], p["beta"], p["base"]
        ninf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
        zero_col = sim.new_zeros(sim.shape[0], 1)
        # log(1 + Σ e^z) as a logsumexp over {0} ∪ z: stable for beta = 50; excluded entries are -inf (no grad).
        pos_term = torch.logsumexp(torch.cat([zero_col, torch.where(keep_pos, -alpha * (sim - base), ninf)], 1), 1)
        neg_term = torch.logsumexp(torch.cat([zero_col, torch.where(keep_neg, beta * (sim - base), ninf)], 1), 1)
        per_anchor = torch.where(anchor_ok, pos_term / alpha + neg_term / beta, 0.0)
        counts = ctx.global_sum(torch.stack([keep_pos.sum(), keep_neg.sum(), anchor_ok.sum()]))
        return LossOutput(
            loss=per_anchor.sum() / n,  # 1/n over every anchor of every shard
            per_item=per_anchor.detach() if ctx.want_per_item else None,
            stats={"kept_positive_pairs": float(counts[0]), "kept_negative_pairs": float(counts[1]),
                   "anchors_with_pairs": float(counts[2])},
        )

    def _mine(self, inputs: dict[str, torch.Tensor],
              ctx: ComputeContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Similarities [rows, n+m] (with grad) of the anchor rows (all n, or the shard's) and the kept-positive /
        kept-negative masks, restricted to the anchors whose P, N, P' and N' are all non-empty (also returned,
        [rows])."""
        x, y = inputs["embeddings"], inputs["labels"]
        n = x.shape[0]
        lo, hi = ctx.anchor_rows(n)
        xn = F.normalize(x, dim=1, eps=1e-12)  # x / max(||x||, 1e-12)
        cand, cand_y = xn, y
        if ctx.memory is not None and ctx.memory.embeddings.shape[0] > 0:
            mem = F.normalize(ctx.memory.embeddings.detach().to(device=x.device, dtype=x.dtype), dim=1, eps=1e-12)
            cand = torch.cat([xn, mem])
            cand_y = torch.cat([y, ctx.memory.labels.to(device=y.device, dtype=y.dtype)])
        # Shard mode: the shard's anchor rows against every candidate.
        xa, ya = (xn, y) if ctx.shard is None else (xn[lo:hi], y[lo:hi])
        sim = xa @ cand.T
        s = sim.detach()
        idx = torch.arange(cand.shape[0], device=x.device)
        not_self = idx[None, :] != torch.arange(lo, hi, device=x.device)[:, None]
        same = ya[:, None] == cand_y[None, :]
        pos, neg = same & not_self, ~same
        inf = torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
        min_pos = torch.where(pos, s, inf).amin(1, keepdim=True)
        max_neg = torch.where(neg, s, -inf).amax(1, keepdim=True)
        hard_neg = neg & (s + self.params["epsilon"] > min_pos)
        hard_pos = pos & (s - self.params["epsilon"] < max_neg)
        anchor_ok = hard_pos.any(1) & hard_neg.any(1)  # non-empty P' implies P (and N) non-empty
        return sim, hard_pos & anchor_ok[:, None], hard_neg & anchor_ok[:, None], anchor_ok
