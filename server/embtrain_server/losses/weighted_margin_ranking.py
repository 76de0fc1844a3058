"""Weighted-margin ranking loss (LOSSES.md §A): FTEmbed / Kim et al. dense triplets on continuous ground truth.

An anchor and the other rows come with ground-truth distances; every pair (r, c) where r should be closer than
c is a triplet (anchor, r, c) with the hinge ``[||a - x_r||² - ||a - x_c||² + w_rc]_+``. Two layouts of
``gt_distances`` are accepted:

* a vector of length ``n - 1``: row 0 is the anchor, ``gt_distances[i]`` belongs to row ``i + 1`` (the spec);
* an ``n x n`` matrix: every row is an anchor, ``gt[i, j]`` is the ground truth from ``i`` to ``j`` (the diagonal
  is ignored). Each anchor is reduced on its own exactly like the vector form over the other ``n - 1`` rows, and
  the loss is the mean over the anchors that have at least one pair.

**Counting instead of enumerating.** The loss is piecewise linear in the squared distances ``sq_j = ||a - x_j||²``,
so it is rebuilt as ``Σ k_aj · sq_aj + const`` and autograd through one ``[A, n]`` distance matrix gives the exact
gradient of §A.3. The coefficients need, per anchor and row j, only ``act_r[j]`` (active pairs in which j is the
closer sample r) and ``act_c[j]`` (... the farther one c); ``Σ w`` over the active pairs follows from them
(``m·(n_active + Σ_j act_c[j]·gn_j − Σ_j act_r[j]·gn_j)``, weighted). No pair is built for that:

* The used pairs are ``P = {(r, c): valid_r, valid_c, not excl_r, key_r < key_c}`` with ``key = g`` and
  ``excl = far`` (pair_order "gt"; a far r only precedes far samples, the one un-far "closest" of the all-far case
  included, so ``not (far_r and far_c)`` reduces to ``not far_r``), or ``key`` = the input position and ``excl`` =
  the don't-care tail (pair_order "index"; the tail is a suffix of the valid positions).
* The hinge splits as ``ℓ_rc = A_r − B_c`` with ``A_r = sq_r − m·gn_r + m`` and ``B_c = sq_c − m·gn_c`` (weighted;
  unweighted ``gn`` is left out). So ``act_r[r] = #{c: key_c > key_r, B_c < A_r}`` and ``act_c[c] = #{r: key_r <
  key_c, A_r > B_c}``: two-dimensional dominance counts. Per anchor, the ``2n`` events (thresholds A, values B)
  are sorted by value once and the counts are read from one wavelet matrix over the key ranks in that order
  (``_dominance_counts``): ``⌊log2(n + 1)⌋ + 2`` levels of a stable partition by one bit plus prefix counts, all ``2n``
  range counts advancing together, vectorised over a block of anchors with only cumsum / gather / scatter.
  ``O(n log n)`` per anchor: ``O(n² log n)`` for the matrix form instead of ``O(n³)``, ``O(n log n)`` for the
  vector form instead of ``O(n²)``; memory ``O(n²)`` (the distance matrix) plus small blocks.

**Exactness.** The decisions are exactly those of the direct evaluation ``(sq_r − sq_c) + m·(1 + gn_c − gn_r) > 0``
(in float64, as the spec's §0.3 zero rule is applied to it), not merely within rounding: the split form can round
differently from the direct one only when ``|A_r − B_c|`` is below ``tol = 2⁻⁴⁸·(max sq + 2m)`` (at least four
times the combined rounding error of both forms), so the counts use the strict threshold ``A_r − tol`` and
every pair whose ``B_c`` lies in ``[A_r − tol, A_r + tol]`` is re-evaluated with the direct expression (with
``margin = 0`` the two forms agree bit for bit and there is no window). Such near-ties are rare; in degenerate
batches (e.g. collapsed embeddings with many gt clipped to both ends of ``[min_dist, max_dist]``) the window can
hold ``O(n²)`` pairs per anchor and the cost falls back towards the old ``O(n³)``. Only ``Σ w`` and the sums of
the reduction are summed in another order than before (float64 rounding, ~1e-16 relative).

**Small blocks** (anchors x n x n up to ``_DENSE_ELEMENTS``, e.g. the vector form up to n = 512) skip the counting
structure, whose few hundred small operations cost more than the pairs themselves there: every pair of the block is
decided at once with the direct expression (``_AnchorSetup.all_pairs``), the same decisions and values.

The mined triplets (lexicographic, capped at ``max_triplets``) and ``per_item`` (every pair's loss; ``O(n³)`` in
the matrix form by nature) are still enumerated row by row with the direct expression, but only for the rows
they need: ``triplets_total`` comes from the counts, and the rows after the cap is reached are not visited.
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
from .distances import sq_dists_exact, with_gradient

# Elements of one block (float64) of the enumeration (rows x n): bounds the transient memory.
_BLOCK_ELEMENTS = 1 << 22
# Events (2n per anchor) of one block of anchors in the counting. Its few hundred small operations on [B, 2n]
# tensors stay below torch's intra-op parallel grain (32768 elements), so they run serially: on the project's 2-core
# VM under load, OpenMP teams of 2 on 64K-element blocks ran up to 10x slower than this, and the dozen [B, 2n]
# buffers stay in cache.
_COUNT_EVENTS = 1 << 14
# ... on an accelerator, where each operation's launch costs more than its work at that size.
_COUNT_EVENTS_ACCELERATOR = 1 << 21
# Pairs (anchors x n x n) of a block small enough to decide directly, all at once: below it the counting
# structure's fixed cost (a few hundred small operations) is larger than the O(n²) pairs themselves.
_DENSE_ELEMENTS = 1 << 18
# Half-width of the window around A_r whose pairs are re-evaluated directly, relative to max sq + 2·margin.
_TOL = 2.0 ** -48


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
        # The matrix form counts every anchor's pairs in O(n log n) (module docstring): O(n² log n); the vector form
        # is one anchor, dominated by the O(n·d) distances. per_item (every pair, O(n³) in the matrix form) is an
        # option of the call, which this hook does not see.
        gt = inputs.get("gt_distances")
        return "n2log" if gt is not None and gt.dim() == 2 else "n2"

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
        x64 = x.detach().to(torch.float64)  # (also the gradient's)
        sq64 = sq_dists_exact(x64[anchors], x64)

        p = self.params
        m = p["margin"]
        n_anchor = anchors.numel()
        coef = torch.zeros_like(sq64)  # d loss / d sq (before the mean over anchors)
        const = sq64.new_zeros(())  # Σ over anchors of base·Σ w over the active pairs
        n_pairs = torch.zeros(n_anchor, dtype=torch.long, device=dev)
        n_active = torch.zeros((), dtype=torch.long, device=dev)
        kept: list[torch.Tensor] = []
        n_kept = 0
        cap = ctx.max_triplets if ctx.want_triplets else 0
        per_item: list[torch.Tensor] = []
        # Blocks of whole anchors, in order, so that the enumerated outputs stay in lexicographic (anchor, r, c)
        # order.
        events = _COUNT_EVENTS if dev.type == "cpu" else _COUNT_EVENTS_ACCELERATOR
        block = max(1, min(events, _BLOCK_ELEMENTS) // (2 * n))
        for a0 in range(0, n_anchor, block):
            cancellation.check()
            sl = slice(a0, a0 + block)
            setup = _AnchorSetup(g_all[sl], valid_all[sl], p)
            sq_a = sq64[sl]
            dense = None
            if sq_a.numel() * n <= _DENSE_ELEMENTS:
                # Small: every pair of the block at once, with the direct expression (no counting structure).
                dense = setup.all_pairs(sq_a, p)
                act = dense[1] > 0
                act &= dense[0]
                ar, ac = torch.count_nonzero(act, 2), torch.count_nonzero(act, 1)
                row_pairs = torch.count_nonzero(dense[0], 2)
            else:
                ar, ac, row_pairs = setup.count(sq_a, p)
            pairs_a = row_pairs.sum(1)
            n_pairs[sl] = pairs_a
            base = torch.where(pairs_a > 0, 1.0 / pairs_a.clamp_min(1).to(torch.float64), 0.0) \
                if p["reduction"] == "mean" else (pairs_a > 0).to(torch.float64)
            # d ell_rc / d sq_r = +1 and d ell_rc / d sq_c = -1 on the active pairs.
            coef[sl] = base[:, None] * (ar - ac).to(torch.float64)
            active_a = ar.sum(1).to(torch.float64)
            n_active += ar.sum()
            # Σ w_rc over the active pairs = m·(n_active + Σ_c act_c·gn_c − Σ_r act_r·gn_r) (weighted).
            w_sum = m * (active_a + ((ac - ar) * setup.gn).sum(1)) if p["weighted"] else m * active_a
            const += (base * w_sum).sum()
            if dense is not None:
                pairs, ell = dense
                if ctx.want_per_item:
                    per_item.append(ell.clamp_min(0)[pairs])
                if n_kept < cap:
                    t = act.nonzero()[: cap - n_kept]  # (anchor in the block, r, c), lexicographic
                    kept.append(torch.stack([anchors[sl][t[:, 0]], t[:, 1], t[:, 2]], 1))
                    n_kept += t.shape[0]
                continue
            if ctx.want_per_item:
                rows = row_pairs.flatten().nonzero().squeeze(1)  # every row with a pair
            elif n_kept < cap:
                # Only the rows (with an active pair) up to the one that reaches the cap.
                flat = ar.flatten()
                before = flat.cumsum(0) - flat
                rows = ((flat > 0) & (before < cap - n_kept)).nonzero().squeeze(1)
            else:
                continue
            step = max(1, _BLOCK_ELEMENTS // max(1, n))
            for i0 in range(0, rows.numel(), step):
                cancellation.check()  # O(n³) when every pair is listed: a cancelled call stops between blocks
                flat_rows = rows[i0:i0 + step]
                bi, ri = flat_rows // n, flat_rows % n
                pairs, ell = setup.rows(bi, ri, sq_a, p)
                if ctx.want_per_item:
                    per_item.append(ell.clamp_min(0)[pairs])
                if n_kept < cap:
                    t = (pairs & (ell > 0)).nonzero()[: cap - n_kept]
                    kept.append(torch.stack([anchors[sl][bi[t[:, 0]]], ri[t[:, 0]], t[:, 1]], 1))
                    n_kept += t.shape[0]

        n_anchors = int((n_pairs > 0).sum())
        scale = 1.0 / max(n_anchors, 1)
        # On the active set the loss is Σ coef·sq + Σ base·w: the same value as the hinge sum. Its gradient (§A.3)
        # in closed form, d sq_aj = 2(x_a − x_j)·(dx_a − dx_j), in float64 like the distances (the terms cancel like
        # the Gram form does), handed to autograd by ``with_gradient``.
        loss = (coef * sq64).sum() * scale + const * scale
        coef = coef * (2.0 * scale)
        if gt.dim() == 1:  # one anchor, row 0
            grad = coef[0, :, None] * (x64 - x64[0])
            grad[0] = -grad.sum(0)  # d/dx_0 = −Σ_j d/dx_j (the j = 0 term is 0)
        else:  # every row an anchor: d/dx_i = 2Σ_j (coef_ij + coef_ji)(x_i − x_j)
            both = coef + coef.T
            grad = both.sum(1)[:, None] * x64 - both @ x64
        triplets = torch.cat(kept) if kept else torch.zeros((0, 3), dtype=torch.long, device=dev)
        n_active = int(n_active)
        return LossOutput(
            loss=with_gradient(x, loss, grad),
            triplets=triplets,
            triplets_total=n_active,
            per_item=torch.cat([x.new_zeros(0, dtype=torch.float64), *per_item]).to(x.dtype) if ctx.want_per_item
            else None,
            stats={"pairs": float(n_pairs.sum()), "active_pairs": float(n_active),
                   "anchors_with_pairs": float(n_anchors)},
        )


class _AnchorSetup:
    """The per-anchor quantities of §A.2 for a block of anchors ([B, n]): the pair keys and masks, the pair
    counts (``count``) and the direct hinge of selected rows (``rows``).

    ``g_raw`` is [B, n] float64 (gt anchor -> candidate), ``valid`` excludes the anchor itself. The used pairs are
    ``(r, c)`` with ``first[r] & valid[c] & key[r] < key[c]`` (module docstring).
    """

    def __init__(self, g_raw: torch.Tensor, valid: torch.Tensor, p: Mapping[str, Any]) -> None:
        inf = torch.tensor(math.inf, dtype=torch.float64, device=g_raw.device)
        g = torch.where(valid, g_raw.clamp_min(p["min_dist"]), inf)
        finite_max = math.isfinite(p["max_dist"])
        m = valid.sum(1) if finite_max or p["pair_order"] != "gt" else None
        far = n_far = None  # nothing is beyond an infinite max_dist
        if finite_max:
            assert m is not None
            far = valid & (g > p["max_dist"])
            n_far = far.sum(1)
            # Everything far: the closest sample (lowest index on ties; argmin returns the first) stays the reference.
            all_far = (n_far == m) & (m > 0)
            closest = g.argmin(1)
            far[all_far, closest[all_far]] = False

        # gn, the normalised gt of the weighted margin (None: unweighted, not used).
        self.gn: torch.Tensor | None = None
        if p["weighted"]:
            lo = p["min_dist"]
            if finite_max:
                hi = torch.full(g.shape[:1], p["max_dist"], dtype=torch.float64, device=g.device)
            else:
                hi = torch.where(valid, g, -inf).amax(1)
            span = hi - lo
            gn = torch.where(span[:, None] > 0, ((g - lo) / span.clamp_min(1e-300)[:, None]).clamp(0.0, 1.0), 0.0)
            self.gn = torch.where(valid, gn, 0.0)
        self.valid = valid
        if p["pair_order"] == "gt":
            # A far r has no pair: every c with g_c > g_r is far too (the all-far case's un-far sample is the
            # closest, so never such a c).
            self.key = g
            self.first = valid & ~far if far is not None else valid
        else:
            # Literal Lua rule: the source's "don't care" block is the last nneg = clamp(#far, 1, m-1) positions; a
            # tail r has no pair, as every later valid position is in the tail too.
            assert m is not None
            pos = valid.cumsum(1) - 1
            n_neg = torch.minimum(n_far, m - 1).clamp_min(1) if n_far is not None else torch.ones_like(m)
            tail = valid & (pos >= (m - n_neg)[:, None])
            self.key = torch.arange(g.shape[1], dtype=torch.float64, device=g.device).repeat(g.shape[0], 1)
            self.first = valid & ~tail

    def rows(self, bi: torch.Tensor, ri: torch.Tensor, sq: torch.Tensor, p: Mapping[str, Any]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows ``(bi[k], ri[k])`` (anchor in the block, row r): the used pairs ``P[k, c]`` and the direct
        hinge argument ``ell[k, c] = (sq_r - sq_c) + w_rc`` (the expression whose sign decides activity)."""
        key = self.key[bi]
        pairs = self.first[bi, ri][:, None] & self.valid[bi] & (key > key.gather(1, ri[:, None]))
        ell = sq[bi, ri][:, None] - sq[bi]
        if p["weighted"]:
            gn = self.gn[bi]
            ell += p["margin"] * (1.0 + gn - gn.gather(1, ri[:, None]))
        else:
            ell += p["margin"]
        return pairs, ell

    def all_pairs(self, sq: torch.Tensor, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` for every (anchor, r) of the block at once: the used pairs and the direct hinge argument,
        [B, n, n] (the same expression, so the same decisions and values)."""
        # key_c > key_r with c's key -inf where c is not valid and r's +inf where r is not first: one comparison.
        inf = torch.tensor(math.inf, dtype=self.key.dtype, device=self.key.device)
        key_c, key_r = torch.where(self.valid, self.key, -inf), torch.where(self.first, self.key, inf)
        pairs = key_c[:, None, :] > key_r[:, :, None]
        ell = sq[:, :, None] - sq[:, None, :]
        if p["weighted"]:
            ell += p["margin"] * ((1.0 + self.gn[:, None, :]) - self.gn[:, :, None])
        else:
            ell += p["margin"]
        return pairs, ell

    def count(self, sq: torch.Tensor, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(act_r, act_c, pairs per row r), int64 [B, n], for the squared distances ``sq`` [B, n] (float64)."""
        key, first, valid = self.key, self.first, self.valid
        b, n = key.shape
        dev = key.device
        # Ranks of the keys (1..n, equal keys share one) and the pairs per row (valid c with a larger key).
        if p["pair_order"] == "gt":
            sorted_keys, order = torch.where(valid, key, math.inf).sort(1)
            idx = torch.arange(n, device=dev).expand(b, n)
            new = torch.ones((b, n), dtype=torch.bool, device=dev)
            new[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
            lower = torch.where(new, idx, 0).cummax(1).values  # first sorted position of each value
            upper = torch.where(new, idx, n).flip(1).cummin(1).values.flip(1)  # ... and of the next value
            upper = torch.cat([upper[:, 1:], upper.new_full((b, 1), n)], 1)
            rank = torch.empty_like(order).scatter_(1, order, lower + 1)
            greater = valid.sum(1, keepdim=True) - torch.empty_like(order).scatter_(1, order, upper)
        else:
            rank = torch.arange(1, n + 1, device=dev).expand(b, n)
            greater = valid.sum(1, keepdim=True) - valid.cumsum(1)
        row_pairs = greater * first

        m = float(p["margin"])
        b_val = sq - m * self.gn if p["weighted"] else sq
        a_val = b_val + m
        if m > 0:
            scale = torch.where(valid, sq, 0.0).amax(1, keepdim=True) + 2.0 * m
            tol = scale * _TOL + 2.0 ** -1000
            lo = a_val - tol
        else:
            tol, lo = None, a_val  # = sq exactly, as is the direct ell = sq_r - sq_c: the decisions agree bit for bit
        # The events in value order; on ties the thresholds (queries) come first, so a datum before a query is
        # exactly B_c < lo_r.
        values, perm = torch.cat([lo, b_val], 1).sort(dim=1, stable=True)
        act_r, act_c, q_pos = _dominance_counts(rank, first, valid, perm)
        if tol is not None:
            _fix_window(self, act_r, act_c, sq, values, perm, q_pos, a_val + tol, p)
        return act_r, act_c, row_pairs


def _fix_window(setup: _AnchorSetup, act_r: torch.Tensor, act_c: torch.Tensor, sq: torch.Tensor,
                values: torch.Tensor, perm: torch.Tensor, q_pos: torch.Tensor, hi: torch.Tensor,
                p: Mapping[str, Any]) -> None:
    """Add the active pairs with ``lo_r <= B_c <= hi_r`` (not counted by the strict ``B_c < lo_r``), decided by the
    direct expression, to ``act_r`` / ``act_c`` in place. Those c are the valid data events after the query's
    position ``q_pos`` (event order ``perm``, sorted ``values``) up to the value ``hi_r``."""
    b, n = sq.shape
    is_data = perm >= n
    data = is_data & setup.valid.gather(1, (perm - n).clamp_min(0))
    # Smallest valid B at or after each event position: the first datum after q_pos decides whether the window
    # of row r is empty (the common case: nothing to do).
    nxt = torch.where(data, values, math.inf).flip(1).cummin(1).values.flip(1)
    nxt = torch.cat([nxt, nxt.new_full((b, 1), math.inf)], 1)
    flagged = setup.first & (nxt.gather(1, q_pos + 1) <= hi)
    if not bool(flagged.any()):
        return
    length = 2 * n
    rows = flagged.flatten().nonzero().squeeze(1)  # flat b * n + r
    anchor = rows // n
    start = q_pos.flatten()[rows] + 1  # the window's first and last + 1 event positions
    stop = torch.searchsorted(values, hi, right=True).flatten()[rows]
    width = (stop - start).clamp_min(0)
    ev0 = anchor * length + start  # flat event index of the window's first event
    sq_f, key_f = sq.flatten(), setup.key.flatten()
    gn_f = setup.gn.flatten() if setup.gn is not None else None
    data_f, perm_f = data.flatten(), perm.flatten()
    act_r_f, act_c_f = act_r.view(-1), act_c.view(-1)
    ends = width.cumsum(0)
    budget = max(_BLOCK_ELEMENTS, length)
    j0 = 0
    while j0 < rows.numel():  # rows in chunks of at most ``budget`` window events
        cancellation.check()
        done = int(ends[j0 - 1]) if j0 else 0
        j1 = max(j0 + 1, int(torch.searchsorted(ends, done + budget, right=True)))
        w = width[j0:j1]
        row = torch.repeat_interleave(torch.arange(j1 - j0, device=sq.device), w)  # the row of each event
        ev = ev0[j0:j1][row] + torch.arange(row.numel(), device=sq.device) - (ends[j0:j1] - w - done)[row]
        keep = data_f[ev]
        row, ev = row[keep], ev[keep]
        r_f = rows[j0:j1]
        c_f = (anchor[j0:j1] * n)[row] + perm_f[ev] - n
        # The direct expression, in the same operation order as ``_AnchorSetup.rows``.
        ell = sq_f[r_f][row] - sq_f[c_f]
        if gn_f is not None:
            ell += p["margin"] * (1.0 + gn_f[c_f] - gn_f[r_f][row])
        else:
            ell += p["margin"]
        active = ((key_f[c_f] > key_f[r_f][row]) & (ell > 0)).long()
        act_r_f.index_add_(0, r_f, torch.zeros_like(r_f).index_add_(0, row, active))
        act_c_f.index_add_(0, c_f, active)
        j0 = j1


def _dominance_counts(rank: torch.Tensor, qmask: torch.Tensor, dmask: torch.Tensor, perm: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched 2-D dominance counts over [B, n] rows, in one wavelet matrix per row.

    ``perm`` [B, 2n] orders the events: ``e < n`` is the query of element e, ``e >= n`` the datum of element
    ``e - n``. With ``pos`` an event's place in that order, returns (int64 [B, n] each)

    ``cnt_q[j] = #{c: dmask[c], rank[c] > rank[j], pos(datum c) < pos(query j)}`` where ``qmask[j]`` (else 0),
    ``cnt_d[j] = #{r: qmask[r], rank[r] < rank[j], pos(query r) > pos(datum j)}`` where ``dmask[j]`` (else 0),

    and the queries' positions. The sequence in event order holds ``rank`` for a query, ``2^h + rank`` for a datum
    and ``2^h`` for an event that counts in neither role; ``cnt_q`` counts the values above ``2^h + rank[j]`` before
    the query, ``cnt_d`` the values below ``rank[j]`` after the datum. A wavelet matrix answers all 2n of these
    range counts level by level (one bit of the value per level, h + 1 levels, each a stable partition by that bit
    plus prefix counts), vectorised over the rows and the events: ``O(n log n)`` per row with only cumsum, gather
    and scatter.
    """
    b, n = rank.shape
    dev = rank.device
    length = 2 * n
    steps = torch.arange(length, device=dev)
    pos = torch.empty_like(perm).scatter_(1, perm, steps.expand(b, length))
    h = (n + 1).bit_length()  # 2^h > n + 1: every value below fits in h + 1 bits
    top = 1 << h
    seq = torch.cat([torch.where(qmask, rank, top), torch.where(dmask, rank + top, top)], 1).gather(1, perm)
    # Per event, the range [s, e) of the sequence and the bound v of its count "values < v".
    s = torch.cat([torch.zeros_like(rank), pos[:, n:] + 1], 1)
    e = torch.cat([pos[:, :n], torch.full_like(rank, length)], 1)
    v = torch.cat([rank + (top + 1), rank], 1)
    acc = torch.zeros_like(s)
    # zeros[:, i]: the 0-bits in seq[:, :i] at the current level. Every level works in place in these buffers (fresh
    # allocations of this size cost more than the arithmetic).
    zeros = torch.zeros((b, length + 1), dtype=torch.long, device=dev)
    prefix, before, n_zeros = zeros[:, 1:], zeros[:, :-1], zeros[:, -1:]
    bit, zero_bit, vb, zs, ze, tmp, spare = (torch.empty_like(s) for _ in range(7))
    for level in range(h, -1, -1):
        torch.bitwise_right_shift(seq, level, out=bit).bitwise_and_(1)
        torch.cumsum(torch.sub(1, bit, out=zero_bit), 1, out=prefix)
        torch.bitwise_right_shift(v, level, out=vb).bitwise_and_(1)
        torch.gather(zeros, 1, s, out=zs)
        torch.gather(zeros, 1, e, out=ze)
        # Bound bit 1: the values in the range with bit 0 here (and the same higher bits) are below the bound.
        acc.add_(torch.sub(ze, zs, out=tmp).mul_(vb))
        # Follow the range into the 1-part (after all n_zeros 0-bits: s - zs + n_zeros) or the 0-part (zs) of the
        # next level; the arithmetic form of where(), in place.
        s.sub_(zs).sub_(zs).add_(n_zeros).mul_(vb).add_(zs)
        e.sub_(ze).sub_(ze).add_(n_zeros).mul_(vb).add_(ze)
        if level:
            # Stable partition by this bit: the 0s keep their order in front, the 1s follow.
            torch.sub(steps, before, out=tmp).sub_(before).add_(n_zeros).mul_(bit).add_(before)
            spare.scatter_(1, tmp, seq)
            seq, spare = spare, seq
    q_pos = pos[:, :n]
    return (q_pos - acc[:, :n]) * qmask, acc[:, n:] * dmask, q_pos
