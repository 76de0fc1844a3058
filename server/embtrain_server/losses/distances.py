"""Distances shared by the native losses.

Three jobs, kept apart on purpose:

* **Mining matrices** (no gradient): ``pairwise_sq_dists`` and ``PairDistance.matrix`` give ``[b, m]``
  distances between query rows and candidate rows. They follow LOSSES.md §0.6: small problems are computed
  from differences with float64 accumulation; large ones use the Gram form on centred data and then recompute,
  exactly from differences, every entry that is near cancellation, so duplicates get exactly 0 and near pairs
  are exact while far pairs keep a relative error of a few ulps / ``NEAR_TAU``.
* **Pair distances** (differentiable): ``PairDistance.pairs(u, v)`` evaluates the distance row by row on
  gathered rows, with torch's own formula (so the value *and* the autograd gradient are torch's, e.g. the eps
  added to the difference in ``pairwise_distance``). Losses over a few selected pairs use this.
* **Pair backward** (no graph): ``PairDistance.backward(x, r, coef, ...)`` returns the gradient of
  ``Σ_ij coef_ij · d(x_i, r_j)`` for a dense coefficient matrix. Losses that reduce over O(n²) pairs (batch-all)
  use it so that memory stays O(block · m) instead of an O(n³) autograd graph. Euclidean kinds use one
  matmul-style formula on centred data plus an exact difference-based correction for near pairs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from .. import cancellation

Tensor = torch.Tensor

# n*m*d at or below which matrices and backward sums are computed from explicit differences in float64.
SMALL_WORK = 2**22
# Gram entries with sq < NEAR_TAU * (|x~_i|² + |r~_j|²) (centred norms) are recomputed from differences: outside
# that cone the Gram form's cancellation error is at most ~eps/NEAR_TAU relative.
NEAR_TAU = 1e-2
# LOSSES.md B.1: D = sqrt(max(||x_i - x_j||², CLAMP_SQ)); below the clamp the gradient is 0.
CLAMP_SQ = 1e-12
# torch.nn.functional.cosine_similarity's per-norm eps.
COSINE_EPS = 1e-8
# Elements per chunk when recomputing selected entries or tiling broadcast differences.
_CHUNK_ELEMS = 2**22


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32 (distances cancel too badly in 16 bits)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _center(x: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    # Distances are translation invariant; subtracting the candidates' mean makes the Gram form's error scale
    # with the spread of the data instead of its offset (e.g. all-positive ReLU features).
    c = (r.sum(0, dtype=torch.float64) / max(r.shape[0], 1)).to(x.dtype)
    return x - c, r - c


def _sq_from_differences(x: Tensor, r: Tensor) -> Tensor:
    """[n, m] float64 squared distances from explicit differences (small problems only)."""
    diff = x.to(torch.float64)[:, None, :] - r.to(torch.float64)[None, :, :]
    return diff.pow_(2).sum(-1)


def pair_sq_dists(x: Tensor, r: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """float64 ``||x_i - r_j||²`` for index lists ``i``, ``j`` (from differences, chunked)."""
    out = torch.empty(i.numel(), dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(x.shape[1], 1))
    for s in range(0, i.numel(), step):
        cancellation.check()
        e = min(s + step, i.numel())
        diff = x[i[s:e]].to(torch.float64) - r[j[s:e]].to(torch.float64)
        out[s:e] = diff.pow_(2).sum(1)
    return out


def _near_mask(sq: Tensor, xc: Tensor, rc: Tensor) -> Tensor:
    scale = (xc * xc).sum(1)[:, None] + (rc * rc).sum(1)[None, :]
    return sq < NEAR_TAU * scale


def pairwise_sq_dists(x: Tensor, r: Tensor) -> Tensor:
    """Exact squared euclidean distances ``[n, m]`` between the rows of ``x`` and ``r`` (no gradient).

    Returned in ``x``'s dtype. Small problems (``n*m*d <= SMALL_WORK``) are computed from differences in float64;
    large ones with the Gram form on centred data, after which the entries near cancellation are recomputed from
    differences in float64 (LOSSES.md §0.6): duplicates get exactly 0 and near pairs are exact.
    """
    x = x.detach()
    r = r.detach().to(x.dtype)
    n, d = x.shape
    m = r.shape[0]
    if n == 0 or m == 0:
        return x.new_zeros(n, m)
    if n * m * d <= SMALL_WORK:
        return _sq_from_differences(x, r).to(x.dtype)
    xc, rc = _center(x, r)
    nx = (xc * xc).sum(1)
    nr = (rc * rc).sum(1)
    scale = nx[:, None] + nr[None, :]
    sq = torch.addmm(scale, xc, rc.T, alpha=-2.0).clamp_min_(0.0)
    i, j = (sq < scale.mul_(NEAR_TAU)).nonzero(as_tuple=True)
    del scale
    if i.numel():
        sq[i, j] = pair_sq_dists(x, r, i, j).to(sq.dtype)
    return sq


def _difference_backward(x: Tensor, r: Tensor, w: Tensor, shift: float = 0.0,
                         near_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``gx_i = Σ_j w_ij (x_i - r_j + shift)`` and ``gr_j = -Σ_i w_ij (x_i - r_j + shift)``.

    Small problems sum explicit differences in float64. Large ones use ``rowsum(W)·x - W @ r`` on centred data;
    the entries whose squared distance ``near_sq`` is near cancellation are taken out of the matmul and added
    from exact differences, so the gradient of a close pair is as exact as its distance.
    """
    b, d = x.shape
    m = r.shape[0]
    if b * m * d <= SMALL_WORK:
        diff = x.to(torch.float64)[:, None, :] - r.to(torch.float64)[None, :, :]
        if shift:
            diff.add_(shift)
        g = diff.mul_(w.to(torch.float64)[:, :, None])
        return g.sum(1).to(x.dtype), g.sum(0).neg_().to(x.dtype)
    rs = r - shift if shift else r
    xc, rc = _center(x, rs)
    wf = w
    near_i = near_j = None
    if near_sq is not None:
        near = _near_mask(near_sq, xc, rc) & (w != 0)
        near_i, near_j = near.nonzero(as_tuple=True)
        if near_i.numel():
            wf = w.masked_fill(near, 0.0)
        del near
    gx = wf.sum(1)[:, None] * xc - wf @ rc
    gr = wf.sum(0)[:, None] * rc - wf.T @ xc
    if near_i is not None and near_i.numel():
        step = max(1, _CHUNK_ELEMS // max(d, 1))
        for s in range(0, near_i.numel(), step):
            i, j = near_i[s:s + step], near_j[s:s + step]
            diff = x[i].to(torch.float64) - r[j].to(torch.float64)
            if shift:
                diff.add_(shift)
            g = (diff * w[i, j].to(torch.float64)[:, None]).to(x.dtype)
            gx.index_add_(0, i, g)
            gr.index_add_(0, j, g, alpha=-1)
    return gx, gr


class PairDistance(ABC):
    """A distance ``d(x_i, r_j)``, always evaluated query (anchor) first."""

    name: str

    @abstractmethod
    def matrix(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(dist [b, m], aux)`` without gradient; ``aux`` is whatever ``backward`` needs besides ``dist``."""

    @abstractmethod
    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        """Differentiable row-wise distance ``d(u_k, v_k)`` of gathered rows ``[k, d]`` -> ``[k]``."""

    @abstractmethod
    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gradients ``(∂/∂x [b, d], ∂/∂r [m, d])`` of ``Σ_ij coef_ij · d(x_i, r_j)``.

        ``dist`` and ``aux`` are what ``matrix(x, r)`` returned."""


class ClampedEuclidean(PairDistance):
    """LOSSES.md B.1: ``D = sqrt(max(||x - r||², 1e-12))``; zero gradient below the clamp (duplicates)."""

    name = "clamped_euclidean"

    def matrix(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor | None]:
        sq = pairwise_sq_dists(x, r)
        return sq.clamp_min(CLAMP_SQ).sqrt_(), sq

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return (u - v).pow(2).sum(-1).clamp_min(CLAMP_SQ).sqrt()

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: Tensor | None) -> tuple[Tensor, Tensor]:
        assert aux is not None
        # clamp_min passes the gradient where sq >= CLAMP_SQ (torch's rule), so dD/dx = (x - r)/D there.
        w = torch.where(aux >= CLAMP_SQ, coef / dist, torch.zeros((), dtype=coef.dtype, device=coef.device))
        return _difference_backward(x, r, w, near_sq=aux)


class TorchPairwiseDistance(PairDistance):
    """``torch.pairwise_distance(u, v, p, eps) = ||u - v + eps||_p`` (LOSSES.md C.1: eps added to the difference)."""

    name = "pairwise_distance"

    def __init__(self, p: float = 2.0, eps: float = 1e-6) -> None:
        self.p = float(p)
        self.eps = float(eps)

    def matrix(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor | None]:
        x, r = x.detach(), r.detach().to(x.dtype)
        b, d = x.shape
        m = r.shape[0]
        if b * m * d <= SMALL_WORK:
            # Small: torch's own broadcast evaluation, i.e. the same numbers the loss uses.
            return torch.pairwise_distance(x[:, None, :], r[None, :, :], p=self.p, eps=self.eps), None
        # ||x - r + eps||_p = ||x - (r - eps)||_p: shift the candidates and use a plain distance.
        shifted = r - self.eps if self.eps else r
        if self.p == 2.0:
            return pairwise_sq_dists(x, shifted).sqrt_(), None
        return torch.cdist(x, shifted, p=self.p), None

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return torch.pairwise_distance(u, v, p=self.p, eps=self.eps)

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.p == 2.0:
            # torch's norm backward: (x - r + eps)/d, and 0 where d == 0.
            w = torch.where(dist > 0, coef / dist, torch.zeros((), dtype=coef.dtype, device=coef.device))
            return _difference_backward(x, r, w, shift=self.eps, near_sq=dist * dist)
        return self._tiled_backward(x, r, coef)

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


class SquaredEuclidean(PairDistance):
    """``||u - v||²`` (TF-Addons' "L_2"); smooth everywhere."""

    name = "squared_euclidean"

    def matrix(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor | None]:
        return pairwise_sq_dists(x, r), None

    def pairs(self, u: Tensor, v: Tensor) -> Tensor:
        return (u - v).pow(2).sum(-1)

    def backward(self, x: Tensor, r: Tensor, coef: Tensor, dist: Tensor,
                 aux: Tensor | None) -> tuple[Tensor, Tensor]:
        return _difference_backward(x, r, 2.0 * coef, near_sq=dist)


class CosineDistance(PairDistance):
    """``1 - torch.nn.functional.cosine_similarity(u, v, eps=1e-8)`` (each norm clamped at eps, as torch does)."""

    name = "cosine"

    def matrix(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor | None]:
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
                 aux: Tensor | None) -> tuple[Tensor, Tensor]:
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
    "CLAMP_SQ", "COSINE_EPS", "NEAR_TAU", "SMALL_WORK", "ClampedEuclidean", "CosineDistance", "PairDistance",
    "SquaredEuclidean", "TorchPairwiseDistance", "clamped_dist", "make_distance", "pair_sq_dists",
    "pairwise_sq_dists", "work_dtype",
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
