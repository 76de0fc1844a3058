"""Distances shared by the native losses.

Four jobs, kept apart on purpose:

* **Mining matrices** (no gradient): ``pairwise_sq_dists`` and ``PairDistance.matrix`` give ``[b, m]``
  distances between query rows and candidate rows. They follow LOSSES.md §0.6: small problems are computed
  from differences with float64 accumulation; large ones use the Gram form on centred data and then recompute,
  exactly from differences, every entry that is near cancellation, so duplicates get exactly 0 and near pairs
  are exact while far pairs keep a relative error of a few ulps / ``NEAR_TAU`` (``CandidateRows.sq_block``).
* **Pair distances** (differentiable): ``PairDistance.pairs(u, v)`` evaluates the distance row by row on
  gathered rows, with torch's own formula (so the value *and* the autograd gradient are torch's, e.g. the eps
  added to the difference in ``pairwise_distance``); ``pairs_grad`` gives the same value and gradient in closed
  form where there is one. Losses over a few selected pairs use these.
* **Pair backward** (no graph): ``PairDistance.backward(x, r, coef, ...)`` returns the gradient of
  ``Σ_ij coef_ij · d(x_i, r_j)`` for a dense coefficient matrix. Losses that reduce over O(n²) pairs (batch-all)
  use it so that memory stays O(block · m) instead of an O(n³) autograd graph. Euclidean kinds use one
  matmul-style formula on centred data plus an exact difference-based correction for near pairs
  (``SqBlock.diff_sum``).
* **Closed-form losses** (no graph): ``CandidateRows.sq_block(x)`` gives a block of squared distances in the input's
  dtype (Gram form, near entries exact), and ``SqBlock.diff_sum(w)`` the sums ``Σ_j w_ij (x_i − r_j)`` as matmuls
  with the near entries added exactly from differences; ``with_gradient`` hands such a gradient to autograd.
  Losses over all O(n²) pairs (contrastive) are written with these, in bounded blocks and reused buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cancellation

Tensor = torch.Tensor

# n*m*d at or below which matrices and backward sums are computed from explicit differences in float64.
SMALL_WORK = 2**22
# Gram entries with sq < NEAR_TAU * (|x~_i|² + |r~_j|²) (centred norms) are recomputed from differences: outside
# that cone the Gram form's cancellation error is at most ~eps/NEAR_TAU relative.
NEAR_TAU = 1e-2
# ... and so is every entry below this absolute floor: an entry that is not recomputed then has a true squared
# distance far above CLAMP_SQ, so the clamp of B.1 / E.1 (and a zero distance) only ever occurs at exact entries.
NEAR_FLOOR = 1e-10
# LOSSES.md B.1: D = sqrt(max(||x_i - x_j||², CLAMP_SQ)); below the clamp the gradient is 0.
CLAMP_SQ = 1e-12
# torch.nn.functional.cosine_similarity's per-norm eps.
COSINE_EPS = 1e-8
# Elements per chunk when recomputing selected entries or tiling broadcast differences.
_CHUNK_ELEMS = 2**22


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (distances cancel too badly in 16 bits)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _differences(x: Tensor, r: Tensor, shift: float = 0.0) -> Tensor:
    """[n, m, d] float64 ``x_i - r_j + shift`` (small problems only)."""
    diff = x.to(torch.float64)[:, None, :] - r.to(torch.float64)[None, :, :]
    return diff.add_(shift) if shift else diff


def pair_sq_dists(x: Tensor, r: Tensor, i: Tensor, j: Tensor, shift: float = 0.0) -> Tensor:
    """float64 ``||x_i - r_j + shift||²`` for index lists ``i``, ``j`` (from differences, chunked)."""
    out = torch.empty(i.numel(), dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(x.shape[1], 1))
    for s in range(0, i.numel(), step):
        cancellation.check()
        e = min(s + step, i.numel())
        diff = x.index_select(0, i[s:e]).to(torch.float64) - r.index_select(0, j[s:e]).to(torch.float64)
        if shift:
            diff.add_(shift)
        out[s:e] = (diff * diff).sum(1)
    return out


class CandidateRows:
    """Candidate rows ``r [m, d]`` prepared once for many query blocks: distances are to ``r - shift`` (``shift``
    added to every component of the difference, as ``torch.pairwise_distance``'s eps). The Gram form runs on
    centred rows (their mean subtracted, so its error scales with the spread of the data, not its offset);
    ``sq_block(x)`` then costs one matmul and a few passes over the block."""

    def __init__(self, r: Tensor, shift: float = 0.0) -> None:
        self.r = r
        self.shift = float(shift)
        self.center = r.mean(0) - self.shift if r.shape[0] else r.new_zeros(r.shape[1])
        self.rc = r - (self.center + self.shift) if self.shift else r - self.center
        self.nr = (self.rc * self.rc).sum(1)
        self.thr_col = self.nr * NEAR_TAU
        self.thr_col_max = float(self.thr_col.max()) if self.m else 0.0

    @property
    def m(self) -> int:
        return self.r.shape[0]

    def sq_block(self, x: Tensor, out: Tensor | None = None, self_col: int | None = None) -> "SqBlock":
        """``||x_i - r_j + shift||²`` for the query rows ``x [b, d]`` (``x``'s dtype; into ``out [b, m]`` if given).

        Small blocks (``b·m·d <= SMALL_WORK``) come from differences in float64. Larger ones use the Gram form on
        centred data; every entry with ``sq < NEAR_TAU·(|x~_i|² + |r~_j|²) + NEAR_FLOOR`` is then recomputed from
        differences, so duplicates are exactly 0 and near pairs exact (LOSSES.md §0.6); the others keep a relative
        error of a few ulps / NEAR_TAU. ``self_col``: query row ``k`` is candidate ``self_col + k`` (a shift-free
        distance of exactly 0, listed apart from the other exact entries: nothing needs recomputing there).
        """
        b, d = x.shape
        m = self.m
        if b * m * d <= SMALL_WORK:
            diff = _differences(x, self.r, self.shift)
            sq = (diff.mul_(diff)).sum(-1)
            if out is None:
                sq = sq.to(x.dtype)
            else:
                sq = out.copy_(sq)
            return SqBlock(sq, x, self, None, None, None, self_col)
        if self_col is not None and not self.shift:
            xc, nx = self.rc[self_col:self_col + b], self.nr[self_col:self_col + b]  # the query rows are candidates
        else:
            xc = x - self.center
            nx = (xc * xc).sum(1)
        if out is None:
            out = torch.empty(b, m, dtype=x.dtype, device=x.device)
        sq = torch.addmm(self.nr[None, :], xc, self.rc.T, beta=1.0, alpha=-2.0, out=out)
        sq.add_(nx[:, None]).clamp_min_(0.0)
        diag = None
        if self_col is not None:
            k = torch.arange(b, device=x.device)
            diag = (k, k + self_col)
            sq[diag] = torch.inf
        # near: sq < tau·nx_i + tau·nr_j + floor. A row whose smallest entry clears its largest threshold has none
        # (one fast reduction); the other rows are compared entry by entry, and their candidates exactly.
        thr_row = nx * NEAR_TAU + NEAR_FLOOR
        row_thr = thr_row + self.thr_col_max
        rows = (sq.amin(1) < row_thr).nonzero().squeeze(1)
        i = j = torch.zeros(0, dtype=torch.int64, device=x.device)
        if rows.numel():
            ii, j = torch.lt(sq[rows], row_thr[rows, None]).nonzero(as_tuple=True)
            i = rows[ii]
            keep = sq[i, j] < thr_row[i] + self.thr_col[j]
            i, j = i[keep], j[keep]
            if i.numel():
                sq[i, j] = pair_sq_dists(x, self.r, i, j, self.shift).to(sq.dtype)
        if diag is not None:
            sq[diag] = 0.0
        return SqBlock(sq, x, self, xc, i, j, self_col)


@dataclass
class SqBlock:
    """Squared distances ``sq [b, m]`` of query rows ``x`` to the candidates ``cand``; ``near_i``/``near_j`` are the
    entries that were recomputed from differences (None: the whole block came from differences)."""

    sq: Tensor
    x: Tensor
    cand: CandidateRows
    xc: Tensor | None
    near_i: Tensor | None
    near_j: Tensor | None
    self_col: int | None = None  # query row k is candidate self_col + k (distance exactly 0, not in near_*)
    # (limit, entries with sq < limit), noted by ``keep_below`` before ``sq`` is overwritten in place
    kept_below: tuple[float, tuple[Tensor, Tensor]] | None = None

    @property
    def exact(self) -> bool:
        """Whether every entry came from differences (small block)."""
        return self.xc is None

    def _diag(self) -> tuple[Tensor, Tensor]:
        assert self.self_col is not None
        k = torch.arange(self.x.shape[0], device=self.x.device)
        return k, k + self.self_col

    def below(self, limit: float) -> tuple[Tensor, Tensor]:
        """The entries with ``sq < limit`` for a tiny ``limit`` (duplicates: B.1's clamp, a zero distance), where
        the gradient is zero. Outside the exact entries there is none (NEAR_FLOOR), so only those are looked at;
        the ``self_col`` diagonal is left out (``diff_sum`` ignores it). Call before changing ``sq`` (or
        ``keep_below(limit)`` first)."""
        if self.kept_below is not None and self.kept_below[0] == limit:
            return self.kept_below[1]
        if self.exact:
            return (self.sq < limit).nonzero(as_tuple=True)
        assert self.near_i is not None and self.near_j is not None
        if not self.near_i.numel():
            return self.near_i, self.near_j
        tiny = self.sq[self.near_i, self.near_j] < limit
        return self.near_i[tiny], self.near_j[tiny]

    def keep_below(self, limit: float) -> None:
        """Note ``below(limit)`` now, so that ``sq`` may then be overwritten (e.g. by the distances)."""
        self.kept_below = (limit, self.below(limit))

    def below_clamp(self) -> tuple[Tensor, Tensor]:
        """``below(CLAMP_SQ)``."""
        return self.below(CLAMP_SQ)

    def diff_sum(self, w: Tensor, want_r: bool = False, r_cols: int | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        """``gx_i = Σ_j w_ij (x_i - r_j + shift)`` ``[b, d]`` and (``want_r``) ``gr_j = -Σ_i w_ij (x_i - r_j + shift)``
        for the first ``r_cols`` candidates (all by default) ``[r_cols, d]``. ``w [b, m]`` may be modified; its
        ``self_col`` diagonal is ignored (a zero difference).

        Matmuls on centred data (``rowsum(W)·x~ - W r~``); the near entries are taken out of them and added from
        exact differences in float64, so the gradient of a close pair is as exact as its distance.
        """
        x, r, shift = self.x, self.cand.r, self.cand.shift
        b, d = x.shape
        rc_n = r.shape[0] if r_cols is None else r_cols
        if self.self_col is not None:
            w[self._diag()] = 0.0  # x_i - x_i = 0 exactly (shift-free)
        if self.exact:
            g = _differences(x, r, shift).mul_(w.to(torch.float64)[:, :, None])
            gx = g.sum(1).to(x.dtype)
            gr = g[:, :rc_n].sum(0).neg_().to(x.dtype) if want_r else None
            return gx, gr
        ni, nj, wn = self.near_i, self.near_j, None
        if ni is not None and ni.numel():
            wn = w[ni, nj]
            nz = wn != 0
            if not bool(nz.all()):
                ni, nj, wn = ni[nz], nj[nz], wn[nz]
            if ni.numel():
                w[ni, nj] = 0.0
            else:
                wn = None
        xc, rc = self.xc, self.cand.rc
        assert xc is not None and ni is not None and nj is not None
        gx = (xc * w.sum(1)[:, None]).addmm_(w, rc, alpha=-1.0)
        gr = None
        if want_r:
            wr = w[:, :rc_n]
            gr = (rc[:rc_n] * wr.sum(0)[:, None]).addmm_(wr.T, xc, alpha=-1.0)
        if wn is not None:
            step = max(1, _CHUNK_ELEMS // max(d, 1))
            for s in range(0, ni.numel(), step):
                i, j = ni[s:s + step], nj[s:s + step]
                diff = x.index_select(0, i).to(torch.float64) - r.index_select(0, j).to(torch.float64)
                if shift:
                    diff.add_(shift)
                g = (diff * wn[s:s + step].to(torch.float64)[:, None]).to(x.dtype)
                gx.index_add_(0, i, g)
                if gr is not None:
                    inside = j < rc_n
                    gr.index_add_(0, j[inside], g[inside], alpha=-1)
        return gx, gr


def pairwise_sq_dists(x: Tensor, r: Tensor, self_col: int | None = None) -> Tensor:
    """Exact squared euclidean distances ``[n, m]`` between the rows of ``x`` and ``r`` (no gradient).

    Returned in ``x``'s dtype. Small problems (``n*m*d <= SMALL_WORK``) are computed from differences in float64;
    large ones with the Gram form on centred data, after which the entries near cancellation are recomputed from
    differences in float64 (LOSSES.md §0.6): duplicates get exactly 0 and near pairs are exact. ``self_col``: row
    ``k`` of ``x`` is row ``self_col + k`` of ``r``.
    """
    x = x.detach()
    r = r.detach().to(x.dtype)
    n = x.shape[0]
    m = r.shape[0]
    if n == 0 or m == 0:
        return x.new_zeros(n, m)
    if n * m * x.shape[1] <= SMALL_WORK:  # what sq_block does at this size, without preparing the candidates
        diff = _differences(x, r)
        return diff.mul_(diff).sum(-1).to(x.dtype)
    return CandidateRows(r).sq_block(x, self_col=self_col).sq


class _WithGradient(torch.autograd.Function):
    """``value`` (a 0-dim tensor computed without a graph) as a function of ``tensors`` whose gradients are
    ``grads``: ``apply(value, *tensors, *grads)``."""

    @staticmethod
    def forward(ctx, value: Tensor, *args: Tensor) -> Tensor:  # type: ignore[override]
        ctx.count = len(args) // 2
        ctx.save_for_backward(*args[ctx.count:])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads = ctx.saved_tensors
        return (None, *(grad_out * g for g in grads), *([None] * ctx.count))


def with_gradients(value: Tensor, pairs: list[tuple[Tensor, Tensor | None]]) -> Tensor:
    """The loss ``value`` (0-dim, no graph) made differentiable with the closed-form gradients of ``pairs``
    (``(tensor, ∂value/∂tensor)``), so that autograd (the compute layer, a head, gradcheck, a session optimiser)
    sees it like any other loss. Pairs whose tensor needs no gradient, or whose gradient is None, are left out."""
    live = [(t, g) for t, g in pairs if g is not None and t.requires_grad]
    value = value.to(pairs[0][0].dtype) if pairs else value
    if not live or not torch.is_grad_enabled():
        return value
    return _WithGradient.apply(value, *(t for t, _ in live), *(g.to(t.dtype) for t, g in live))


def with_gradient(x: Tensor, value: Tensor, grad: Tensor | None) -> Tensor:
    """``with_gradients(value, [(x, grad)])``: ``grad = ∂value/∂x`` (``x``'s shape; None: no gradient wanted)."""
    return with_gradients(value, [(x, grad)])


def _zero_at(w: Tensor, idx: tuple[Tensor, Tensor]) -> Tensor:
    if idx[0].numel():
        w[idx] = 0.0
    return w


class PairDistance(ABC):
    """A distance ``d(x_i, r_j)``, always evaluated query (anchor) first."""

    name: str
    # ``pairs_grad`` has a closed form; ``prepare`` returns candidate rows (Gram-form matrix and matmul backward).
    closed_form: bool = False
    gram: bool = False

    def prepare(self, r: Tensor) -> CandidateRows | None:
        """What ``matrix`` can reuse for every query block against the candidates ``r`` (None: nothing)."""
        return None

    @abstractmethod
    def matrix(self, x: Tensor, r: Tensor, prepared: CandidateRows | None = None,
               self_col: int | None = None) -> tuple[Tensor, SqBlock | None]:
        """``(dist [b, m], aux)`` without gradient; ``aux`` is whatever ``backward`` needs besides ``dist``.
        ``prepared``: ``prepare(r)``; ``self_col``: row ``k`` of ``x`` is row ``self_col + k`` of ``r`` (its own
        entry is then never used by the caller)."""

    @abstractmethod
    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        """Differentiable row-wise distance ``d(u_k, v_k)`` of gathered rows ``[k, d]`` -> ``[k]``."""

    @abstractmethod
    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: SqBlock | None) -> tuple[Tensor, Tensor]:
        """Gradients ``(∂/∂x [b, d], ∂/∂r [m, d])`` of ``Σ_ij coef_ij · d(x_i, r_j)``; ``coef`` may be modified.

        ``dist`` and ``aux`` are what ``matrix(x, r)`` returned."""

    def pairs_grad(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(d(u_k, v_k) [k], ∂d/∂u_k [k, d])`` in closed form (``∂d/∂v_k`` is its negative), with the same values
        as ``pairs`` and its autograd gradient; None where only autograd has it (then ``pairs`` is used)."""
        return None


def _both(aux: SqBlock, w: Tensor) -> tuple[Tensor, Tensor]:
    """``Σ_j w_ij (x_i - r_j)`` and its candidate-side counterpart, from a Gram-form block."""
    gx, gr = aux.diff_sum(w, want_r=True)
    assert gr is not None
    return gx, gr


class _SquaredDifferences(PairDistance):
    """A function of ``||x - r||²`` evaluated in Gram form on prepared candidate rows."""

    closed_form = gram = True

    def prepare(self, r: Tensor) -> CandidateRows | None:
        return CandidateRows(r.detach())

    @staticmethod
    def _block(x: Tensor, r: Tensor, prepared: CandidateRows | None, self_col: int | None) -> SqBlock:
        return (prepared or CandidateRows(r.detach().to(x.dtype))).sq_block(x.detach(), self_col=self_col)


class ClampedEuclidean(_SquaredDifferences):
    """LOSSES.md B.1: ``D = sqrt(max(||x - r||², 1e-12))``; zero gradient below the clamp (duplicates)."""

    name = "clamped_euclidean"

    def matrix(self, x: Tensor, r: Tensor, prepared: CandidateRows | None = None,
               self_col: int | None = None) -> tuple[Tensor, SqBlock | None]:
        blk = self._block(x, r, prepared, self_col)
        blk.keep_below(CLAMP_SQ)
        return blk.sq.clamp_min_(CLAMP_SQ).sqrt_(), blk  # one [b, m] matrix: the distances replace sq

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return (u - v).pow(2).sum(-1).clamp_min(CLAMP_SQ).sqrt()

    def pairs_grad(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        diff = u - v
        # sqrt(max(sq, 1e-12)) = max(|u - v|, 1e-6); clamp_min passes the gradient where sq >= CLAMP_SQ:
        # (u - v)/D there, 0 below (duplicates)
        norm = torch.linalg.vector_norm(diff, dim=-1)
        return norm.clamp_min(CLAMP_SQ ** 0.5), diff.div_(torch.where(norm >= CLAMP_SQ ** 0.5, norm, torch.inf)[:, None])

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: SqBlock | None) -> tuple[Tensor, Tensor]:
        assert aux is not None
        # clamp_min passes the gradient where sq >= CLAMP_SQ (torch's rule), so dD/dx = (x - r)/D there.
        return _both(aux, _zero_at(coef.div_(dist), aux.below_clamp()))


class TorchPairwiseDistance(PairDistance):
    """``torch.pairwise_distance(u, v, p, eps) = ||u - v + eps||_p`` (LOSSES.md C.1: eps added to the difference)."""

    name = "pairwise_distance"

    def __init__(self, p: float = 2.0, eps: float = 1e-6) -> None:
        self.p = float(p)
        self.eps = float(eps)
        self.closed_form = self.gram = self.p == 2.0

    def prepare(self, r: Tensor) -> CandidateRows | None:
        # ||x - r + eps|| = ||x - (r - eps)||: a plain distance to shifted candidates
        return CandidateRows(r.detach(), shift=self.eps) if self.p == 2.0 else None

    def matrix(self, x: Tensor, r: Tensor, prepared: CandidateRows | None = None,
               self_col: int | None = None) -> tuple[Tensor, SqBlock | None]:
        x, r = x.detach(), r.detach().to(x.dtype)
        b, d = x.shape
        m = r.shape[0]
        if b * m * d <= SMALL_WORK:
            # Small: torch's own broadcast evaluation, i.e. the same numbers the loss uses.
            return torch.pairwise_distance(x[:, None, :], r[None, :, :], p=self.p, eps=self.eps), None
        if self.p == 2.0:
            blk = (prepared or CandidateRows(r, shift=self.eps)).sq_block(x, self_col=self_col)
            blk.keep_below(torch.finfo(x.dtype).tiny)  # sq below it: a zero distance (norm backward: 0)
            return blk.sq.sqrt_(), blk  # one [b, m] matrix: the distances replace sq
        return torch.cdist(x, r - self.eps if self.eps else r, p=self.p), None

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.pairwise_distance(u, v, p=self.p, eps=self.eps)

    def pairs_grad(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.p != 2.0:
            return None
        diff = u - v + self.eps  # torch.pairwise_distance: norm(x1 - x2 + eps)
        dist = torch.linalg.vector_norm(diff, dim=-1)
        # norm backward: (x1 - x2 + eps)/d, and 0 where d == 0
        return dist, diff.div_(torch.where(dist > 0, dist, torch.inf)[:, None])

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: SqBlock | None) -> tuple[Tensor, Tensor]:
        if self.p != 2.0:
            return self._tiled_backward(x, r, coef)
        # torch's norm backward: (x - r + eps)/d, and 0 where d == 0.
        if aux is None:  # small problem: explicit differences
            w = torch.where(dist > 0, coef / dist, torch.zeros((), dtype=coef.dtype, device=coef.device))
            g = _differences(x, r, self.eps).mul_(w.to(torch.float64)[:, :, None])
            return g.sum(1).to(x.dtype), g.sum(0).neg_().to(x.dtype)
        return _both(aux, _zero_at(coef.div_(dist), aux.below(torch.finfo(dist.dtype).tiny)))

    def _tiled_backward(self, x: Tensor, r: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
        # General p has no matmul form: autograd through torch's own distance on bounded broadcast tiles.
        b, d = x.shape
        m = r.shape[0]
        gx = torch.zeros_like(x)
        gr = torch.zeros_like(r)
        cols = max(1, min(m, _CHUNK_ELEMS // max(d, 1)))
        rows = max(1, _CHUNK_ELEMS // (cols * max(d, 1)))
        with torch.enable_grad():
            for i0 in range(0, b, rows):
                for j0 in range(0, m, cols):
                    w = coef[i0:i0 + rows, j0:j0 + cols]
                    if not bool((w != 0).any()):
                        continue
                    xi = x[i0:i0 + rows].detach().requires_grad_(True)
                    rj = r[j0:j0 + cols].detach().requires_grad_(True)
                    dd = torch.pairwise_distance(xi[:, None, :], rj[None, :, :], p=self.p, eps=self.eps)
                    g_i, g_j = torch.autograd.grad((dd * w).sum(), (xi, rj))
                    gx[i0:i0 + rows] += g_i
                    gr[j0:j0 + cols] += g_j
        return gx, gr


class SquaredEuclidean(_SquaredDifferences):
    """``||u - v||²`` (TF-Addons' "L_2"); smooth everywhere."""

    name = "squared_euclidean"

    def matrix(self, x: Tensor, r: Tensor, prepared: CandidateRows | None = None,
               self_col: int | None = None) -> tuple[Tensor, SqBlock | None]:
        blk = self._block(x, r, prepared, self_col)
        return blk.sq, blk

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return (u - v).pow(2).sum(-1)

    def pairs_grad(self, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        diff = u - v
        return (diff * diff).sum(-1), diff.mul_(2.0)

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: SqBlock | None) -> tuple[Tensor, Tensor]:
        assert aux is not None
        return _both(aux, coef.mul_(2.0))


class CosineDistance(PairDistance):
    """``1 - torch.nn.functional.cosine_similarity(u, v, eps=1e-8)`` (each norm clamped at eps, as torch does)."""

    name = "cosine"

    def matrix(self, x: Tensor, r: Tensor, prepared: CandidateRows | None = None,
               self_col: int | None = None) -> tuple[Tensor, SqBlock | None]:
        x, r = x.detach(), r.detach().to(x.dtype)
        b, d = x.shape
        m = r.shape[0]
        if b * m * d <= SMALL_WORK:
            return 1.0 - F.cosine_similarity(x[:, None, :], r[None, :, :], dim=-1, eps=COSINE_EPS), None
        xh = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(COSINE_EPS)
        rh = r / torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min(COSINE_EPS)
        return torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), xh, rh.T, alpha=-1.0), None

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return 1.0 - F.cosine_similarity(u, v, dim=-1, eps=COSINE_EPS)

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: SqBlock | None) -> tuple[Tensor, Tensor]:
        # torch clamps each norm at eps outside autograd, so d cos/dx_i = (r^_j - cos_ij·x_i/|x_i|)/max(|x_i|, eps)
        # with r^ = r/max(|r|, eps) (and x_i/|x_i| := 0 for a zero row).
        def parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            nz = torch.linalg.vector_norm(z, dim=1, keepdim=True)
            nc = nz.clamp_min(COSINE_EPS)
            unit = z / torch.where(nz > 0, nz, torch.ones_like(nz))  # a zero row stays 0
            return z / nc, unit, nc

        xh, ux, ncx = parts(x)
        rh, ur, ncr = parts(r)
        wc = coef * (1.0 - dist)
        gx = (wc.sum(1)[:, None] * ux - coef @ rh) / ncx
        gr = (wc.sum(0)[:, None] * ur - coef.T @ xh) / ncr
        return gx, gr


def make_distance(kind: str, p: float = 2.0, eps: float = 1e-6) -> PairDistance:
    """The distance for a wire name of LOSSES.md C.1 (or ``clamped_euclidean`` for B.1)."""
    if kind == "pairwise_distance":
        return TorchPairwiseDistance(p, eps)
    if kind == "squared_euclidean":
        return SquaredEuclidean()
    if kind == "cosine":
        return CosineDistance()
    if kind == "clamped_euclidean":
        return ClampedEuclidean()
    raise ValueError(f"unknown distance kind {kind!r}")


def clamped_dist(x: Tensor, r: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Differentiable B.1 distance ``sqrt(max(||x_i - r_j||², 1e-12))`` for index lists ``i``, ``j``."""
    return ClampedEuclidean().pairs(x[i], r[j])


__all__ = [
    "CLAMP_SQ", "COSINE_EPS", "NEAR_FLOOR", "NEAR_TAU", "SMALL_WORK", "CandidateRows", "ClampedEuclidean",
    "CosineDistance", "PairDistance", "SqBlock", "SquaredEuclidean", "TorchPairwiseDistance", "clamped_dist",
    "make_distance", "pair_sq_dists", "pairwise_sq_dists", "with_gradient", "with_gradients", "work_dtype",
]


def sq_dists_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i − b_j||²`` as a float64 [n, m] tensor without grad, exact as LOSSES.md §0.6 asks (differences,
    or the Gram form with every near-cancelling entry recomputed from differences; see ``distances``)."""
    with torch.no_grad():
        return pairwise_sq_dists(a.detach().to(torch.float64), b.detach().to(torch.float64))


def sq_dists_with_grad(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor | None = None) -> torch.Tensor:
    """``||a_i − b_j||²`` in ``a``'s dtype, valued at the exact (difference-form) distances and differentiable
    in ``a`` and ``b`` with the analytic ``2(a_i − b_j)``.

    The gradient flows through the Gram form, which needs O(n·m) memory where autograd of the differences would
    keep O(n·m·d). Its backward, ``2(Σ_j g_ij)a_i − 2Σ_j g_ij b_j``, cancels like the Gram value does, so it runs
    in float64: float32 near-duplicates far from the origin still get the gradient of their true difference.
    """
    if exact is None:
        exact = sq_dists_exact(a, b)
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    gram = (a64 * a64).sum(1, keepdim=True) + (b64 * b64).sum(1)[None, :] - 2.0 * (a64 @ b64.T)
    return (gram + (exact - gram).detach()).to(a.dtype)
