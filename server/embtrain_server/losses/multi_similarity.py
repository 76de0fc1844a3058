"""Multi-similarity loss (Wang et al., CVPR 2019; LOSSES.md §E.2) with its pair mining.

Cosine similarities ``S = x̂ x̂ᵀ`` of L2-normalised rows; for each anchor the hard positives ``P'`` (less similar
than the most similar negative plus epsilon) and hard negatives ``N'`` (more similar than the least similar
positive minus epsilon) enter two soft-plus-like terms. "Self" is removed by index, not by ``S < 1 − 1e-5``
as in the official code (which also drops duplicate genuine positives). Anchors with an empty ``P``, ``N``,
``P'`` or ``N'`` contribute 0 and still count in the ``1/n``.

With cross-batch memory (``ctx.memory``) the anchors are the batch rows and the positives/negatives come from
the batch rows followed by the memory rows (no gradient through memory). With a reference set (``ref_emb`` /
``ref_labels``, PML's semantics) they come only from the reference rows (no row is removed as "self": a reference
row equal to an anchor is a positive or negative like any other), and the reference rows get their gradient too.

How it is computed (closed form, no autograd graph; ``distances.with_gradient`` hands the gradient to autograd),
over blocks of anchor rows against every candidate, in the input's dtype (similarities of unit vectors do not
cancel): one matmul gives the block of ``S``; the positives (few per row) are gathered by index
(``_mining.LabelIndex``) and set to ``-inf`` in the block, so that the row maximum is the hardest negative; the
hard-negative test ``S + ε > min_P S`` is the sign of ``(S + ε) − min_P S`` (exact: a float difference is 0 only
for equal numbers); each ``log(1 + Σ e^z)`` is shifted by its largest exponent, which is the hardest negative's
(positive's) whenever ``N'`` (``P'``) is not empty, so no exponential exceeds 1. The gradient with respect to
``S`` (the softmax weights, signed) then gives ``∂/∂x̂`` as two matmuls per block (anchor and candidate side),
and the normalisation's Jacobian ``(g − (g·x̂)x̂)/max(|x|, 1e-12)`` gives ``∂/∂x``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..params import Param, Schema
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, register
from ._mining import REF_EMB, REF_LABELS, LabelIndex, check_labels, check_reference, pair_rows, row_blocks
from .distances import with_gradients

# F.normalize's eps: x̂ = x / max(|x|, 1e-12).
_NORM_EPS = 1e-12
# Elements of one [rows, n + m] working block (two buffers of this size): cache-sized on the CPU.
BLOCK_ELEMS = {"cpu": 2**18, "cuda": 2**24}


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """``F.normalize(t, dim=1, eps=1e-12)``: ``t / max(|t|, 1e-12)`` row-wise."""
    return F.normalize(t, dim=1, eps=_NORM_EPS)


def _through_normalize(g_hat: torch.Tensor, t: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """``∂/∂t`` from ``g_hat = ∂/∂t̂`` through ``t̂ = t / max(|t|, 1e-12)``: ``(g − (g·t̂)t̂)/|t|`` above the clamp,
    ``g/1e-12`` below it."""
    norm = torch.linalg.vector_norm(t, dim=1)
    big = norm >= _NORM_EPS
    radial = (g_hat * t_hat).sum(1, keepdim=True) * t_hat
    return torch.where(big[:, None], (g_hat - radial) / norm.clamp_min(_NORM_EPS)[:, None], g_hat / _NORM_EPS)


@register
class MultiSimilarityLoss(Loss):
    """Multi-similarity loss (§E.2); the stats count the mined (anchor, partner) pairs.

    Shardable: with ``ctx.shard`` a shard computes its anchors' terms against every candidate (``per_item``: its
    anchors' ℓ_i); the loss still divides by the global ``n``.

    With a reference set (``ref_emb`` / ``ref_labels``) ``P_i`` and ``N_i`` are reference rows (none removed as
    self); the mean is still over the ``n`` batch anchors, and the gradient of ``ref_emb`` comes back too."""

    name = "multi_similarity"
    uses_memory = True
    description = (
        "Multi-similarity loss (Wang et al. 2019) on cosine similarities with its epsilon pair mining: "
        "(1/alpha)·log(1 + Σ_P' e^{-alpha(S-base)}) + (1/beta)·log(1 + Σ_N' e^{beta(S-base)}), mean over anchors. "
        "Self is removed by index; with cross-batch memory the partners include the memory rows; with ref_emb "
        "they are the reference rows."
    )
    inputs = (EMBEDDINGS, LABELS, REF_EMB, REF_LABELS)
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
        check_reference(inputs)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x, ref = inputs["embeddings"], inputs.get("ref_emb")
        rows = pair_rows(x, inputs["labels"], ctx.memory, ref, inputs.get("ref_labels"), prep=_normalize)
        xw, xn, y, cand, cand_y, is_ref = rows.xw, rows.xa, rows.y, rows.cand, rows.cand_y, rows.ref
        n, d = x.shape
        dev = x.device
        dt = xw.dtype
        total = cand.shape[0]
        lo, hi = ctx.anchor_rows(n)
        p = self.params
        alpha, beta, base, eps = float(p["alpha"]), float(p["beta"]), float(p["base"]), float(p["epsilon"])
        need_grad = torch.is_grad_enabled() and x.requires_grad
        need_ref_grad = torch.is_grad_enabled() and ref is not None and ref.requires_grad
        f64 = torch.float64

        g_hat = torch.zeros(n, d, dtype=dt, device=dev) if need_grad else None  # ∂loss/∂x̂ of the batch rows
        g_ref = torch.zeros(total, d, dtype=dt, device=dev) if need_ref_grad else None  # ∂loss/∂r̂
        loss_sum = torch.zeros((), dtype=f64, device=dev)
        counts = torch.zeros(3, dtype=f64, device=dev)  # kept positive pairs, kept negative pairs, anchors
        per_anchor: list[torch.Tensor] = []
        if hi > lo and total > 0:
            rows_cap = max(1, min(hi - lo, BLOCK_ELEMS.get(dev.type, 2**22) // max(total, 1)))
            labels = LabelIndex(cand_y)
            s_buf = torch.empty(rows_cap, total, dtype=dt, device=dev)
            h_buf = torch.empty(rows_cap, total, dtype=dt, device=dev)
            for s, e in row_blocks(hi, total, dev, lo, rows=rows_cap):
                b = e - s
                sim = torch.mm(xn[s:e], cand.T, out=s_buf[:b])
                si, sj = labels.pairs(y[s:e])  # same label, the anchor itself included
                if is_ref:
                    pi, pj = si, sj  # no partner is the anchor
                else:
                    not_self = sj != si + s
                    pi, pj = si[not_self], sj[not_self]
                sp = sim[pi, pj]
                sim[si, sj] = -torch.inf  # the row maximum is now the most similar negative
                max_neg = sim.amax(1)
                min_pos = torch.full((b,), torch.inf, dtype=dt, device=dev).scatter_reduce_(0, pi, sp, "amin")
                # hard negatives: S + ε > min_P S  <=>  (S + ε) − min_P S > 0; positives and self are −inf here
                hard = torch.add(sim, eps, out=h_buf[:b]).sub_(min_pos[:, None]).sign_().clamp_min_(0.0)
                n_hard_neg = hard.sum(1)
                hard_pos = (sp - eps) < max_neg[pi]
                n_hard_pos = torch.zeros(b, dtype=dt, device=dev).index_add_(0, pi, hard_pos.to(dt))
                ok = (n_hard_pos > 0) & (n_hard_neg > 0)
                # log(1 + Σ_N' e^{β(S−λ)}) = m_n + log(e^{−m_n} + Σ_N' e^{β(S−λ) − m_n}), m_n = max(0, β(max_N S − λ))
                m_neg = (beta * (max_neg - base)).clamp_min_(0.0)
                ez = torch.mul(sim, beta, out=sim).add_((-beta * base - m_neg)[:, None]).exp_().mul_(hard)
                sum_neg = ez.sum(1)
                m_pos = (-alpha * (min_pos - base)).clamp_min_(0.0)
                ep = torch.exp(-alpha * (sp - base) - m_pos[pi]) * hard_pos
                sum_pos = torch.zeros(b, dtype=dt, device=dev).index_add_(0, pi, ep)
                den_neg = torch.exp(-m_neg) + sum_neg
                den_pos = torch.exp(-m_pos) + sum_pos
                ell = (m_pos + torch.log(den_pos)) / alpha + (m_neg + torch.log(den_neg)) / beta
                ell = torch.where(ok, ell, 0.0)
                loss_sum += ell.sum(dtype=f64)
                okf = ok.to(dt)
                counts += torch.stack([(n_hard_pos * okf).sum(), (n_hard_neg * okf).sum(), okf.sum()]).to(f64)
                if ctx.want_per_item:
                    per_anchor.append(ell)
                if g_hat is not None or g_ref is not None:
                    # ∂ℓ_i/∂S_ik = e^{z_ik}/den (negatives), −e^{z_ij}/den (positives); 1/n for the mean
                    # (an anchor without pairs can have den = 0 when e^{−m} underflows: its weight is 0, not 0/0)
                    f_neg = torch.where(ok, 1.0 / (den_neg * n), 0.0)
                    f_pos = torch.where(ok, 1.0 / (den_pos * n), 0.0)
                    w = ez.mul_(f_neg[:, None])
                    w[pi, pj] = -ep * f_pos[pi]
                    if is_ref:
                        if g_hat is not None:
                            g_hat[s:e] += w @ cand
                        if g_ref is not None:
                            g_ref += w.T @ xn[s:e]
                    elif b == total:  # the whole batch in one block, no memory: one matmul
                        g_hat += (w + w.T) @ xn
                    else:
                        g_hat[s:e] += w @ cand
                        g_hat += w[:, :n].T @ xn[s:e]
        elif hi > lo and ctx.want_per_item:
            per_anchor.append(xw.new_zeros(hi - lo))  # an empty reference set: every anchor's ℓ_i is 0
        grad = None if g_hat is None else _through_normalize(g_hat, xw, xn)
        pairs = [(x, grad)]
        if ref is not None:
            pairs.append((ref, None if g_ref is None else _through_normalize(g_ref, ref.detach().to(device=dev, dtype=dt), cand)))
        counts = ctx.global_sum(counts)
        return LossOutput(
            loss=with_gradients(loss_sum / n, pairs),  # 1/n over every anchor of every shard
            per_item=(torch.cat(per_anchor) if per_anchor else xw.new_zeros(0)).to(x.dtype)
            if ctx.want_per_item else None,
            stats={"kept_positive_pairs": float(counts[0]), "kept_negative_pairs": float(counts[1]),
                   "anchors_with_pairs": float(counts[2])},
        )
