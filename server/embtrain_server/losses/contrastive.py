"""Contrastive loss (Hadsell, Chopra & LeCun 2006; LOSSES.md §E.1) over all pairs of a batch.

Same-label pairs cost ``½||x_i − x_j||²``; different-label pairs cost ``½[margin − D]_+²`` with
``D = sqrt(max(||x_i − x_j||², 1e-12))``; the reduction is over the ``n(n−1)/2`` unordered pairs.

With cross-batch memory (``ctx.memory``) the anchors are the batch rows and the partners are the later batch rows
plus every memory row: the pairs are ``(i, j)`` for batch ``i < j`` and ``(i, n + k)`` for every memory row
``k``, ``n(n−1)/2 + n·m`` of them; memory rows get no gradient.

How it is computed (closed form, no autograd graph; ``distances.with_gradients`` hands the gradients to autograd):

* **Positive pairs** per class from the class means, in float64: ``Σ_{j∈c} ||x_i − x_j||² = |c|·||x_i − μ_c||² +
  Σ_{j∈c} ||x_j − μ_c||²`` and ``Σ_{j∈c} (x_i − x_j) = |c|·(x_i − μ_c)``. That is O((n + m)·d) and exact: no
  pairwise difference of two nearby points is ever formed in the input's precision.
* **Negative pairs** over blocks of anchor rows against every candidate: squared distances in the input's dtype
  with the Gram form, every entry near cancellation recomputed exactly from differences (LOSSES.md §0.6,
  ``distances.CandidateRows``), then ``gap = [margin − D]_+`` and the gradient ``Σ_j −gap_ij/D_ij (x_i − x_j)``
  as one matmul per block (``SqBlock.diff_sum``; the exact near entries are added from differences). A negative
  pair closer than the clamp (duplicates) has zero gradient, as in B.1.
* Every row's gradient collects all its pairs (the batch block is taken in both directions), so a batch pair's
  loss is counted half from each of its rows, a memory pair's fully from its batch row.

With a reference set (``ref_emb`` / ``ref_labels``, PML's semantics) the pairs are ``(i, j)`` for every batch
row ``i`` and every reference row ``j``, ``n·m`` of them, each counted fully from its batch row (no pair is
excluded as "self": a reference row equal to an anchor is a positive or negative pair like any other); the
reference rows get their gradient from the same matmul (``SqBlock.diff_sum(want_r=True)``).

Peak memory is O(block · (n + m)) in the input's dtype: a few preallocated ``[rows, n + m]`` buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..params import Param, Schema
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from ._mining import REF_EMB, REF_LABELS, LabelIndex, check_labels, check_reference, pair_rows, row_blocks
from .distances import CLAMP_SQ, CandidateRows, with_gradients

# Elements of one [rows, n + m] working block (several buffers of this size are alive at once): small enough to
# stay in the CPU's cache between the passes over it, large enough for efficient matmuls.
BLOCK_ELEMS = {"cpu": 2**18, "cuda": 2**24}


@register
class ContrastiveLoss(Loss):
    """Contrastive loss (§E.1). With cross-batch memory the pairs are (batch i, batch j > i) and (batch i,
    every memory row); the mean is over all of those pairs.

    Shardable: with ``ctx.shard`` a shard computes the terms of its rows (half of every batch pair a row is in, all
    of its memory pairs) and their gradient rows; ``per_item`` is the per-pair losses of the pairs whose first row
    is one of its rows, row-major (its part of the global list); the mean still divides by every pair.

    With a reference set (``ref_emb`` / ``ref_labels``) the pairs are (batch i, reference j) for every i and j,
    the mean is over those ``n·m`` pairs, ``per_item`` lists them row-major, and the gradient of ``ref_emb``
    comes back too."""

    name = "contrastive"
    uses_memory = True
    description = (
        "Contrastive loss (Hadsell et al. 2006) over all unordered pairs: same label ½||xi-xj||², different "
        "label ½[margin - ||xi-xj||]_+²; mean (or sum) over the n(n-1)/2 pairs. With cross-batch memory the "
        "pairs (batch i, memory j) are added; with ref_emb the pairs are (batch i, reference j)."
    )
    inputs = (EMBEDDINGS, LABELS, REF_EMB, REF_LABELS)
    schema = Schema((
        Param("margin", "float", 1.0, "distance below which different-label pairs are pushed apart", minimum=0.0),
        Param("reduction", "enum", "mean", "mean over all pairs, or their sum", choices=("mean", "sum")),
    ))
    complexity = "n2"
    shardable = True  # a shard takes the terms of its rows

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])
        check_reference(inputs)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x, ref = inputs["embeddings"], inputs.get("ref_emb")
        rows = pair_rows(x, inputs["labels"], ctx.memory, ref, inputs.get("ref_labels"))
        xw, y, cand, cand_y, is_ref = rows.xw, rows.y, rows.cand, rows.cand_y, rows.ref
        n, d = x.shape
        dev = x.device
        dt = xw.dtype
        total = cand.shape[0]
        lo, hi = ctx.anchor_rows(n)
        margin = float(self.params["margin"])
        need_grad = torch.is_grad_enabled() and x.requires_grad
        need_ref_grad = torch.is_grad_enabled() and ref is not None and ref.requires_grad
        grad_ref = torch.zeros(total, d, dtype=dt, device=dev) if need_ref_grad else None

        f64 = torch.float64
        grad = None  # [n, d]: every anchor row is written by its block, the others (shard mode) stay 0
        loss_sum = torch.zeros((), dtype=f64, device=dev)  # accumulated without a device sync per block
        active = torch.zeros((), dtype=f64, device=dev)
        pos_count = torch.zeros((), dtype=f64, device=dev)
        per_item: list[torch.Tensor] = []
        if hi > lo and total > (0 if is_ref else 1):
            rows_cap = max(1, min(hi - lo, BLOCK_ELEMS.get(dev.type, 2**22) // max(total, 1)))
            cr = CandidateRows(cand)
            labels = LabelIndex(cand_y)
            buf = torch.empty(rows_cap, total, dtype=dt, device=dev)
            gap_buf = torch.empty(rows_cap, total, dtype=dt, device=dev)
            m_t = torch.tensor(margin, dtype=dt, device=dev)
            # positive pairs of these rows: half of each batch pair (i, j != i), every memory pair
            cnt_all = labels.counts(y[lo:hi]).to(f64)
            if is_ref:
                pos_count = cnt_all.sum()  # every (batch, reference) pair once
            else:
                cnt_b = cnt_all if total == n else LabelIndex(y).counts(y[lo:hi]).to(f64)
                pos_count = (0.5 * (cnt_b - 1) + (cnt_all - cnt_b)).sum()
            for s, e in row_blocks(hi, total, dev, lo, rows=rows_cap):
                b = e - s
                blk = cr.sq_block(xw[s:e], out=buf[:b], self_col=None if is_ref else s)
                sq = blk.sq
                pi, pj = labels.pairs(y[s:e])  # same-label pairs (each row's own entry included: exactly 0)
                if ctx.want_per_item:
                    per_item.append(self._pair_values(sq, (pi, pj), margin, s, upper=not is_ref))
                # positives: ½||x_i − x_j||², gradient (x_i − x_j); a batch pair is counted half from each of its rows
                sq_pos = sq[pi, pj]
                if is_ref:
                    loss_sum += 0.5 * sq_pos.sum(dtype=f64)
                elif total == n:
                    loss_sum += 0.25 * sq_pos.sum(dtype=f64)
                else:
                    loss_sum += 0.5 * (sq_pos * torch.where(pj < n, 0.5, 1.0).to(dt)).sum(dtype=f64)
                tiny = blk.below_clamp() if need_grad or need_ref_grad else None
                dist = sq.clamp_min_(CLAMP_SQ).sqrt_()
                # negatives: ½[margin − D]_+², gradient −gap/D · (x_i − x_j), zero below the clamp (duplicates)
                gap = torch.sub(m_t, dist, out=gap_buf[:b]).clamp_min_(0.0)
                gap[pi, pj] = 0.0
                if need_grad or need_ref_grad:
                    coef = torch.div(gap, dist, out=dist).neg_()
                    if tiny is not None and tiny[0].numel():
                        coef[tiny] = 0.0  # the clamp (negatives only: a positive pair's ½sq is smooth)
                    coef[pi, pj] = 1.0
                    gx, gr = blk.diff_sum(coef, want_r=need_ref_grad)
                    if grad_ref is not None and gr is not None:
                        grad_ref += gr
                    if need_grad and b == n:
                        grad = gx  # the whole batch in one block
                    elif need_grad:
                        if grad is None:
                            grad = torch.zeros(n, d, dtype=dt, device=dev)
                        grad[s:e] = gx
                sq_gap = gap.mul_(gap)
                if is_ref:
                    loss_sum += 0.5 * sq_gap.sum().to(f64)
                    active += sq_gap.sign_().sum().to(f64)
                elif total == n:
                    loss_sum += 0.25 * sq_gap.sum().to(f64)
                    signs = sq_gap.sign_()  # 1 on the active negative pairs
                    active += 0.5 * signs.sum().to(f64)
                else:
                    loss_sum += 0.25 * sq_gap[:, :n].sum().to(f64) + 0.5 * sq_gap[:, n:].sum().to(f64)
                    signs = sq_gap.sign_()
                    active += 0.5 * signs[:, :n].sum().to(f64) + signs[:, n:].sum().to(f64)

        # every shard's pairs: known from the shapes
        n_pairs = n * total if is_ref else n * (n - 1) // 2 + n * (total - n)
        scale = 1.0 / n_pairs if self.params["reduction"] == "mean" and n_pairs > 0 else 1.0
        # every shard returns the global counts (a batch pair is counted half from each of its rows)
        active, pos_count = (round(v) for v in ctx.global_sum(torch.stack([active, pos_count])).tolist())
        if need_grad and grad is None:
            grad = torch.zeros(n, d, dtype=dt, device=dev)
        pairs = [(x, None if grad is None else grad.mul_(scale))]
        if ref is not None:
            pairs.append((ref, None if grad_ref is None else grad_ref.mul_(scale)))
        loss = with_gradients(loss_sum * scale, pairs)
        return LossOutput(
            loss=loss,
            per_item=(torch.cat(per_item) if per_item else x.new_zeros(0).detach()).to(x.dtype)
            if ctx.want_per_item else None,
            stats={"positive_pairs": pos_count, "negative_pairs": float(n_pairs - pos_count),
                   "active_negative_pairs": float(active)},
        )

    @staticmethod
    def _pair_values(sq: torch.Tensor, same: tuple[torch.Tensor, torch.Tensor], margin: float,
                     s: int, upper: bool = True) -> torch.Tensor:
        """Per-pair losses of rows ``s..`` for the pairs with ``j > i`` (every pair unless ``upper``; row-major),
        from the block's distances; ``same`` lists the same-label entries."""
        b, total = sq.shape
        mask = torch.zeros(b, total, dtype=torch.bool, device=sq.device)
        mask[same] = True
        same = mask
        gap = (margin - sq.clamp_min(CLAMP_SQ).sqrt()).clamp_min_(0.0)
        v = torch.where(same, 0.5 * sq, 0.5 * gap * gap)
        if not upper:
            return v.reshape(-1)
        col = torch.arange(total, device=sq.device)
        row = torch.arange(s, s + b, device=sq.device)
        return v[col[None, :] > row[:, None]]
