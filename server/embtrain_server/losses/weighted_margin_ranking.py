"""Weighted-margin ranking loss (LOSSES.md §A): FTEmbed / Kim et al. dense triplets on continuous ground truth.

An anchor and the other rows come with ground-truth distances; every pair (r, c) where r should be closer than
c is a triplet (anchor, r, c) with the hinge ``[||a - x_r||² - ||a - x_c||² + w_rc]_+``. Two layouts of
``gt_distances`` are accepted:

* a vector of length ``n - 1``: row 0 is the anchor, ``gt_distances[i]`` belongs to row ``i + 1`` (the spec);
* an ``n x n`` matrix: every row is an anchor, ``gt[i, j]`` is the ground truth from ``i`` to ``j`` (the diagonal
  is ignored). Each anchor is reduced on its own exactly like the vector form over the other ``n - 1`` rows, and
  the loss is the mean over the anchors that have at least one pair.

The pair selection runs without autograd, blockwise over anchors so that memory stays ``O(n²)`` instead of
``O(n³)``. The loss is piecewise linear in the squared distances, so it is rebuilt as ``Σ k_aj · D_aj + const``
from the selected coefficients, which gives autograd the exact gradient of §A.3 through one ``[A, n]`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import cancellation
from ..errors import invalid
from ..params import Param, Schema
from .base import EMBEDDINGS, ComputeContext, InputSpec, Loss, LossOutput, register
from .distances import sq_dists_exact, sq_dists_with_grad

# Elements of one [B, n, n] block of the anchor-pair selection (float64): bounds the transient memory.
_BLOCK_ELEMENTS = 1 << 22


@register
class WeightedMarginRankingLoss(Loss):
    """FTEmbed weighted-margin ranking loss (§A), with ``gt_distances`` as a vector (row 0 the anchor) or as an
    ``n x n`` matrix (every row an anchor; the loss is the mean over anchors with at least one pair, the mined
    triplets are ``[i, r, c]`` in row indices and ``per_item`` lists every anchor's pair losses in that order)."""

    name = "weighted_margin_ranking"
    description = (
        "FTEmbed weighted-margin ranking loss on continuous ground-truth distances: for every pair (r, c) with "
        "gt[r] < gt[c], [||a-x_r||² - ||a-x_c||² + margin·(1 + gn_c - gn_r)]_+, gt clamped below at min_dist, "
        "pairs of two samples beyond max_dist ignored. gt_distances is either length n-1 (row 0 is the anchor) "
        "or an n x n matrix (every row an anchor, diagonal ignored; loss = mean over the anchors that have a pair)."
    )
    inputs = (
        EMBEDDINGS,
        InputSpec("gt_distances", "float", "[n-1] or [n, n]", True, False,
                  "ground-truth distances, finite and >= 0: anchor (row 0) to rows 1..n-1, or row i to row j"),
    )
    schema = Schema((
        Param("margin", "float", 0.03, "base margin mrg (Kim et al.; for L2-normalised embeddings)", minimum=0.0),
        Param("min_dist", "float", 0.0, "gt below this are clamped to it (equally close)", minimum=0.0),
        Param("max_dist", "float", math.inf, "gt above this are 'far'; pairs of two far samples are ignored; "
              "must be > min_dist", minimum=0.0, allow_inf=True),
        Param("weighted", "bool", True, "margin·(1 + gn_c - gn_r) instead of the constant margin"),
        Param("pair_order", "enum", "gt", "'gt': pairs gt_r < gt_c (ties skipped); 'index': the literal Lua r < c "
              "rule on the input order", choices=("gt", "index")),
        Param("reduction", "enum", "mean", "mean over the used pairs, or their sum", choices=("mean", "sum")),
    ))
    mines_triplets = True
    complexity = "n2"

    def work_complexity(self, inputs: Mapping[str, torch.Tensor]) -> str:
        gt = inputs.get("gt_distances")
        return "n3" if gt is not None and gt.dim() == 2 else "n2"  # the matrix form: every row is an anchor

    def check_params(self) -> None:
        if not self.params["max_dist"] > self.params["min_dist"]:
            raise invalid("params.max_dist", f"must be > params.min_dist ({self.params['min_dist']!r}), "
                          f"got {self.params['max_dist']!r}")

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        n = inputs["embeddings"].shape[0]
        gt = inputs["gt_distances"]
        if gt.dim() == 1:
            if gt.shape[0] != n - 1:
                raise invalid("inputs.gt_distances", f"length {gt.shape[0]}, expected {n - 1} (n-1: one per row "
                              f"after the anchor row 0) or an {n} x {n} matrix")
            values = gt
        elif gt.dim() == 2:
            if tuple(gt.shape) != (n, n):
                raise invalid("inputs.gt_distances", f"shape {list(gt.shape)}, expected [{n}, {n}] (one row per "
                              f"anchor) or a vector of length {n - 1}")
            values = gt[~torch.eye(n, dtype=torch.bool, device=gt.device)]  # the diagonal is ignored
        else:
            raise invalid("inputs.gt_distances", f"{gt.dim()}-D, expected a vector of length {n - 1} or an "
                          f"{n} x {n} matrix")
        bad = ~torch.isfinite(values) | (values < 0)
        if bool(bad.any()):
            v = values[bad][0].item()
            raise invalid("inputs.gt_distances", f"every entry must be finite and >= 0, found {v!r}")

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x = inputs["embeddings"]
        gt = inputs["gt_distances"]
        n = x.shape[0]
        dev = x.device
        if gt.dim() == 1:
            # Vector form in the common layout: one anchor (row 0) and a gt row over all n candidates.
            anchors = torch.zeros(1, dtype=torch.long, device=dev)
            g_all = torch.cat([gt.new_zeros(1), gt]).to(torch.float64).unsqueeze(0)
        else:
            anchors = torch.arange(n, device=dev)
            g_all = gt.to(torch.float64)
        valid_all = torch.ones(g_all.shape, dtype=torch.bool, device=dev)
        valid_all[torch.arange(anchors.numel(), device=dev), anchors] = False  # an anchor is not its own sample

        # Squared distances anchor -> every row, exact (LOSSES.md §0.6), for the selection.
        sq64 = sq_dists_exact(x.detach()[anchors], x.detach())

        p = self.params
        n_anchor = anchors.numel()
        act_r = torch.zeros_like(sq64)  # per anchor: active pairs in which the row is the closer one (r)
        act_c = torch.zeros_like(sq64)  # ... and the farther one (c)
        w_sum = torch.zeros(n_anchor, dtype=torch.float64, device=dev)  # Σ w over the active pairs
        n_pairs = torch.zeros(n_anchor, dtype=torch.long, device=dev)
        n_active = 0
        kept: list[torch.Tensor] = []
        n_kept = 0
        per_item: list[torch.Tensor] = []
        # Blocks of whole anchors; a single anchor whose n x n pairs exceed the budget is split by rows r. Both
        # orders keep the blocks in lexicographic (anchor, r, c) order for the triplets and per_item.
        block = max(1, _BLOCK_ELEMENTS // max(1, n * n))
        rows = n if block > 1 else max(1, _BLOCK_ELEMENTS // max(1, n))
        for a0 in range(0, n_anchor, block):
            sl = slice(a0, a0 + block)
            setup = _AnchorSetup(g_all[sl], valid_all[sl], p)
            sq_a = sq64[sl]
            for r0 in range(0, n, rows):
                cancellation.check()  # O(n³) in the matrix form: a cancelled call stops between blocks
                rs = slice(r0, r0 + rows)
                pairs, w = setup.pairs(rs, p)
                ell = sq_a[:, rs, None] - sq_a[:, None, :] + w
                active = pairs & (ell > 0)
                n_pairs[sl] += pairs.sum((1, 2))
                act_r[sl, rs] += active.sum(2)
                act_c[sl] += active.sum(1)
                w_sum[sl] += torch.where(active, w, 0.0).sum((1, 2))
                n_active += int(active.sum())
                if ctx.want_triplets and n_kept < ctx.max_triplets:
                    t = active.nonzero()[: ctx.max_triplets - n_kept]
                    t[:, 0] = anchors[sl][t[:, 0]]
                    t[:, 1] += r0
                    kept.append(t)
                    n_kept += t.shape[0]
                if ctx.want_per_item:
                    per_item.append(ell.clamp_min(0)[pairs])

        base = torch.where(n_pairs > 0, 1.0 / n_pairs.clamp_min(1).to(torch.float64), 0.0) \
            if p["reduction"] == "mean" else (n_pairs > 0).to(torch.float64)
        # d ell_rc / d sq_r = +1 and d ell_rc / d sq_c = -1 on the active pairs.
        coef = base[:, None] * (act_r - act_c)
        const = base * w_sum
        n_anchors = int((n_pairs > 0).sum())
        scale = 1.0 / max(n_anchors, 1)
        sq = sq_dists_with_grad(x[anchors], x, exact=sq64)
        # On the active set the loss is Σ coef·sq + Σ base·w: the same value as the hinge sum, and autograd
        # through sq gives §A.3's gradient.
        loss = (coef.to(x.dtype) * sq).sum() * scale + (const.sum() * scale).to(x.dtype)
        triplets = torch.cat(kept) if kept else torch.zeros((0, 3), dtype=torch.long, device=dev)
        return LossOutput(
            loss=loss,
            triplets=triplets,
            triplets_total=n_active,
            per_item=torch.cat(per_item).to(x.dtype) if per_item else None,
            stats={"pairs": float(n_pairs.sum()), "active_pairs": float(n_active),
                   "anchors_with_pairs": float(n_anchors)},
        )


class _AnchorSetup:
    """The per-anchor quantities of §A.2 for a block of anchors ([B, n]); ``pairs`` builds the pair masks and
    margins for a slice of rows r against every c.

    ``g_raw`` is [B, n] float64 (gt anchor -> candidate), ``valid`` excludes the anchor itself.
    """

    def __init__(self, g_raw: torch.Tensor, valid: torch.Tensor, p: Mapping[str, Any]) -> None:
        inf = torch.tensor(math.inf, dtype=torch.float64, device=g_raw.device)
        g = torch.where(valid, g_raw.clamp_min(p["min_dist"]), inf)
        m = valid.sum(1)
        far = valid & (g > p["max_dist"])
        n_far = far.sum(1)
        # Everything far: the closest sample (lowest index on ties; argmin returns the first) stays the reference.
        all_far = (n_far == m) & (m > 0)
        closest = g.argmin(1)
        far[all_far, closest[all_far]] = False

        lo = p["min_dist"]
        if math.isfinite(p["max_dist"]):
            hi = torch.full(m.shape, p["max_dist"], dtype=torch.float64, device=g.device)
        else:
            hi = torch.where(valid, g, -inf).amax(1)
        span = hi - lo
        gn = torch.where(span[:, None] > 0, ((g - lo) / span.clamp_min(1e-300)[:, None]).clamp(0.0, 1.0), 0.0)
        self.gn = torch.where(valid, gn, 0.0)
        self.g, self.far, self.valid = g, far, valid
        if p["pair_order"] == "index":
            # Literal Lua rule: the source's "don't care" block is the last nneg = clamp(#far, 1, m-1) positions.
            pos = valid.cumsum(1) - 1
            n_neg = torch.minimum(n_far, m - 1).clamp_min(1)
            self.tail = valid & (pos >= (m - n_neg)[:, None])

    def pairs(self, rs: slice, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The used pairs ``P[b, r, c]`` and their margins ``w[b, r, c]`` for the rows ``rs``."""
        valid, g = self.valid, self.g
        both_valid = valid[:, rs, None] & valid[:, None, :]
        if p["pair_order"] == "gt":
            pairs = both_valid & (g[:, rs, None] < g[:, None, :]) & ~(self.far[:, rs, None] & self.far[:, None, :])
        else:
            n = g.shape[1]
            r_idx = torch.arange(n, device=g.device)[rs]
            upper = r_idx[:, None] < torch.arange(n, device=g.device)[None, :]  # r < c in input order
            pairs = both_valid & upper & ~(self.tail[:, rs, None] & self.tail[:, None, :])
        if p["weighted"]:
            w = p["margin"] * (1.0 + self.gn[:, None, :] - self.gn[:, rs, None])
        else:
            w = torch.full(pairs.shape, p["margin"], dtype=torch.float64, device=g.device)
        return pairs, w
