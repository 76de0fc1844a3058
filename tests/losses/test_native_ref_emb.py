"""``ref_emb`` / ``ref_labels`` for the native losses (issue 15): anchors are the batch rows, positives and
negatives (pair partners) come only from the reference set, with no self-exclusion; the gradient comes back for
the embeddings and for ``ref_emb``.

References, none of them produced by the code under test: pytorch-metric-learning 2.9 in-process with matched
conventions (``BatchHardMiner`` + ``TripletMarginLoss`` with ``LpDistance(normalize_embeddings=False)`` and
``MeanReducer`` / ``AvgNonZeroReducer``, called with ``ref_emb``/``ref_labels``), brute-force float64 references
written here from LOSSES.md's formulas (explicit loops or index lists, gradients by torch autograd), and central
finite differences of the served loss for both gradients. Everything runs the way the service runs a stateless
batch (validation, the loss's checks, ``compute.run``), except the cross-batch-memory and shard-mode checks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from served import serve, validated

from embtrain_server import compute, sharding
from embtrain_server.errors import InvalidArgument
from embtrain_server.losses import ComputeContext, Memory, _mining, contrastive, distances, get, load_all
from embtrain_server.losses import multi_similarity

load_all()

F64, F32 = torch.float64, torch.float32
Tensor = torch.Tensor
NATIVE = ("batch_hard_triplet", "batch_all_triplet", "triplet_margin", "contrastive", "multi_similarity")
TOL = {F64: dict(rtol=1e-9, atol=1e-12), F32: dict(rtol=1e-4, atol=1e-5)}  # LOSSES.md §0.7


# ---- data and running --------------------------------------------------------------------------------------------

def make_data(n: int, m: int, d: int, classes: int, seed: int = 0, dtype: torch.dtype = F64,
              duplicates: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch and a reference set with shared classes; ``duplicates``: some reference rows are exact copies of
    anchors, with the anchor's label and with another label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    r = torch.randn(m, d, generator=g, dtype=F64)
    yr = torch.randint(0, classes, (m,), generator=g)
    if duplicates:
        r[0], yr[0] = x[0], y[0]  # an anchor's copy with its label
        r[1], yr[1] = x[1], (y[1] + 1) % classes  # an anchor's copy with another label
        r[2], yr[2] = x[2], y[2]
        r[3], yr[3] = x[2], y[2]  # two copies of one anchor
    return x.to(dtype), y, r.to(dtype), yr


class Served:
    """One stateless batch with a reference set, as the service computes it."""

    def __init__(self, name: str, params: dict[str, Any], x: Tensor, y: Tensor | None, r: Tensor,
                 yr: Tensor | None, triplets: Tensor | None = None, max_triplets: int = 1 << 30) -> None:
        inputs = {"embeddings": x.clone(), "ref_emb": r.clone()}
        if y is not None:
            inputs["labels"] = y
        if yr is not None:
            inputs["ref_labels"] = yr
        if triplets is not None:
            inputs["triplets"] = triplets
        res = serve(get(name)(params), inputs, max_triplets=max_triplets)
        self.loss = res.loss
        self.gx = res.gradients["embeddings"]
        self.gr = res.gradients["ref_emb"]
        self.triplets = res.triplets
        self.total = res.triplets_total
        self.per_item = res.per_item
        self.stats = res.stats
        assert self.gx.dtype == x.dtype and self.gr.dtype == r.dtype
        assert self.gx.shape == x.shape and self.gr.shape == r.shape
        assert np.isfinite(self.loss) and torch.isfinite(self.gx).all() and torch.isfinite(self.gr).all()


def assert_close(got: Served, loss: Tensor | float, gx: Tensor, gr: Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(torch.tensor(got.loss, dtype=F64), torch.as_tensor(loss, dtype=F64).detach(), **tol)
    torch.testing.assert_close(got.gx.to(F64), gx.detach().to(F64), **tol)
    torch.testing.assert_close(got.gr.to(F64), gr.detach().to(F64), **tol)


def with_grads(fn: Callable[[Tensor, Tensor], tuple[Tensor, Any]], x: Tensor, r: Tensor) -> tuple[Tensor, Tensor,
                                                                                                    Tensor, Any]:
    """Run a float64 reference ``fn(x, r) -> (loss, extra)`` and return (loss, ∂/∂x, ∂/∂r, extra) by autograd."""
    xl = x.detach().to(F64).requires_grad_(True)
    rl = r.detach().to(F64).requires_grad_(True)
    loss, extra = fn(xl, rl)
    if loss.requires_grad:
        gx, gr = torch.autograd.grad(loss, (xl, rl), allow_unused=True)
    else:
        gx = gr = None
    gx = torch.zeros_like(xl) if gx is None else gx
    gr = torch.zeros_like(rl) if gr is None else gr
    return loss.detach(), gx, gr, extra


# ---- brute-force references (float64, LOSSES.md) ------------------------------------------------------------------

def clamped(u: Tensor, v: Tensor) -> Tensor:
    """B.1: ``sqrt(max(||u − v||², 1e-12))`` row-wise (the squared distance from differences)."""
    return ((u - v) ** 2).sum(-1).clamp_min(1e-12).sqrt()


def pair_dist(kind: str, p: float = 2.0, eps: float = 1e-6) -> Callable[[Tensor, Tensor], Tensor]:
    """C.1's distances, by torch's own functions."""
    if kind == "pairwise_distance":
        return lambda u, v: F.pairwise_distance(u, v, p=p, eps=eps)
    if kind == "squared_euclidean":
        return lambda u, v: ((u - v) ** 2).sum(-1)
    if kind == "cosine":
        return lambda u, v: 1.0 - F.cosine_similarity(u, v, dim=-1, eps=1e-8)
    return clamped


def dist_matrix(dist: Callable[[Tensor, Tensor], Tensor], x: Tensor, r: Tensor) -> Tensor:
    n, m = x.shape[0], r.shape[0]
    return dist(x[:, None, :].expand(n, m, -1), r[None, :, :].expand(n, m, -1))


def mine_ref(dist: Callable[[Tensor, Tensor], Tensor], miner: str, x: Tensor, y: Tensor, r: Tensor,
             yr: Tensor) -> Tensor:
    """LOSSES.md B.2 / C.2 selections with the reference set as the candidates (no self-exclusion), by loops;
    ``[k, 3]`` (anchor row, positive ref row, negative ref row). "all" is every (a, p, n) with y_p = y_a != y_n,
    listed lexicographically from the explicit [n, m, m] mask."""
    if miner == "all":
        same = y[:, None] == yr[None, :]
        return (same[:, :, None] & ~same[:, None, :]).nonzero()
    with torch.no_grad():
        dm = dist_matrix(dist, x, r).tolist()
    out: list[tuple[int, int, int]] = []
    for a in range(x.shape[0]):
        pos = [j for j in range(r.shape[0]) if yr[j] == y[a]]
        neg = [j for j in range(r.shape[0]) if yr[j] != y[a]]
        if not pos or not neg:
            continue
        if miner == "batch_hard":
            p = max(pos, key=lambda j: (dm[a][j], -j))  # farthest, ties to the lowest index
            n = min(neg, key=lambda j: (dm[a][j], j))
            out.append((a, p, n))
        else:  # semihard
            for p in pos:
                farther = [j for j in neg if dm[a][j] > dm[a][p]]
                n = min(farther, key=lambda j: (dm[a][j], j)) if farther else max(neg, key=lambda j: (dm[a][j], -j))
                out.append((a, p, n))
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 3)


def triplet_losses(dist: Callable[[Tensor, Tensor], Tensor], x: Tensor, r: Tensor, t: Tensor, margin: float,
                   soft: bool = False, swap: bool = False) -> Tensor:
    """Per-triplet ``[margin + d(a,p) − d(a,n)]_+`` (or softplus) on an explicit index list ``t [k, 3]`` (anchor
    rows of ``x``, positive and negative rows of ``r``), read from the full distance matrices (every pair
    evaluated by the distance function itself)."""
    if not t.shape[0]:
        return x.new_zeros(0)
    dxr = dist_matrix(dist, x, r)
    dap, dan = dxr[t[:, 0], t[:, 1]], dxr[t[:, 0], t[:, 2]]
    if swap:
        dpn = dist_matrix(dist, r, r)[t[:, 1], t[:, 2]]
        dan = torch.where(dpn < dan, dpn, dan)
    return F.softplus(dap - dan) if soft else torch.relu(margin + dap - dan)


def active_sorted(t: Tensor, values: Tensor) -> list[list[int]]:
    """The triplets with ℓ > 0, de-duplicated, lexicographic."""
    act = t[values.detach() > 0]
    if not act.shape[0]:
        return []
    big = int(act.max()) + 1
    key = torch.unique((act[:, 0] * big + act[:, 1]) * big + act[:, 2])  # sorted like the rows
    return torch.stack([key // (big * big), key // big % big, key % big], 1).tolist()


def ref_contrastive(x: Tensor, y: Tensor, r: Tensor, yr: Tensor, margin: float, reduction: str = "mean"
                    ) -> Tensor:
    """E.1 over the pairs (batch i, reference j): same label ½||x_i − r_j||², else ½[margin − D]_+²."""
    sq = ((x[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    same = y[:, None] == yr[None, :]
    v = torch.where(same, 0.5 * sq, 0.5 * torch.relu(margin - sq.clamp_min(1e-12).sqrt()) ** 2)
    if reduction == "sum":
        return v.sum()
    return v.sum() / max(v.numel(), 1)


def ref_multi_similarity(x: Tensor, y: Tensor, r: Tensor, yr: Tensor, alpha: float = 2.0, beta: float = 50.0,
                         base: float = 0.5, eps: float = 0.1) -> Tensor:
    """E.2 with ``P_i``/``N_i`` the reference rows with / without the anchor's label, by loops."""
    s = F.normalize(x, dim=1, eps=1e-12) @ F.normalize(r, dim=1, eps=1e-12).T
    sv = s.detach().tolist()
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        pos = [j for j in range(r.shape[0]) if yr[j] == y[i]]
        neg = [j for j in range(r.shape[0]) if yr[j] != y[i]]
        if not pos or not neg:
            continue
        min_pos = min(sv[i][j] for j in pos)
        max_neg = max(sv[i][k] for k in neg)
        hp = [j for j in pos if sv[i][j] - eps < max_neg]
        hn = [k for k in neg if sv[i][k] + eps > min_pos]
        if not hp or not hn:
            continue
        total = total + torch.log1p(torch.exp(-alpha * (s[i, hp] - base)).sum()) / alpha \
            + torch.log1p(torch.exp(beta * (s[i, hn] - base)).sum()) / beta
    return total / x.shape[0]


# ---- against pytorch-metric-learning ------------------------------------------------------------------------------

pml = pytest.importorskip("pytorch_metric_learning", reason="needs the pml extra: pip install 'embtrain[pml]'")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402


def _lp() -> Any:
    return pml_distances.LpDistance(normalize_embeddings=False, p=2, power=1)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_matches_pml(dtype: torch.dtype, soft: bool) -> None:
    """B.2 with ref_emb = PML BatchHardMiner + TripletMarginLoss(LpDistance, MeanReducer) with ref_emb: the
    hardest positive and negative among the reference rows, mean over the anchors that have both."""
    x, y, r, yr = make_data(24, 30, 6, 4, seed=1, dtype=dtype)
    margin = 0.3
    got = Served("batch_hard_triplet", {"margin": margin, "soft": soft}, x, y, r, yr)

    def reference(xl: Tensor, rl: Tensor) -> tuple[Tensor, Any]:
        miner = pml_miners.BatchHardMiner(distance=_lp())
        idx = miner(xl, y, rl, yr)
        # PML's smooth loss is softplus(d_ap − d_an + margin): margin 0 is B.2's soft variant
        loss_fn = pml_losses.TripletMarginLoss(margin=0.0 if soft else margin, smooth_loss=soft, distance=_lp(),
                                               reducer=pml_reducers.MeanReducer())
        return loss_fn(xl, y, idx, rl, yr), idx

    loss, gx, gr, idx = with_grads(reference, x, r)
    assert_close(got, loss, gx, gr, dtype)
    # the same selection: every valid anchor, its p* and n* (reference rows)
    mined = torch.stack(idx, 1)
    assert got.stats["valid_anchors"] == mined.shape[0]
    values = triplet_losses(clamped, x.to(F64), r.to(F64), mined, margin, soft)
    assert got.triplets.tolist() == active_sorted(mined, values)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_batch_all_matches_pml(dtype: torch.dtype, reduction: str) -> None:
    """B.3 with ref_emb = PML TripletMarginLoss(LpDistance, all triplets) with ref_emb: MeanReducer is the mean
    over every valid (batch anchor, ref positive, ref negative), AvgNonZeroReducer the mean over the active ones."""
    x, y, r, yr = make_data(20, 26, 5, 3, seed=2, dtype=dtype)
    margin = 0.8
    got = Served("batch_all_triplet", {"margin": margin, "reduction": reduction}, x, y, r, yr)
    reducer = pml_reducers.MeanReducer() if reduction == "mean" else pml_reducers.AvgNonZeroReducer()

    def reference(xl: Tensor, rl: Tensor) -> tuple[Tensor, Any]:
        loss_fn = pml_losses.TripletMarginLoss(margin=margin, distance=_lp(), reducer=reducer)
        return loss_fn(xl, y, None, rl, yr), None

    loss, gx, gr, _ = with_grads(reference, x, r)
    assert_close(got, loss, gx, gr, dtype)
    t = mine_ref(clamped, "all", x, y, r, yr)
    assert got.stats["selected_triplets"] == len(t)
    values = triplet_losses(clamped, x.to(F64), r.to(F64), t, margin)
    assert got.triplets.tolist() == active_sorted(t, values)
    assert got.stats["active_triplets"] == int((values > 0).sum())


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_triplet_margin_given_matches_pml(dtype: torch.dtype) -> None:
    """Miner 'given' with ref_emb: (anchor row, positive ref row, negative ref row), PML's indices_tuple with
    ref_emb; pairwise_distance with eps = 0 is PML's LpDistance; duplicates in the list count (MeanReducer)."""
    x, y, r, yr = make_data(10, 14, 4, 3, seed=3, dtype=dtype)
    g = torch.Generator().manual_seed(9)
    t = torch.stack([torch.randint(0, 10, (40,), generator=g), torch.randint(0, 14, (40,), generator=g),
                     torch.randint(0, 14, (40,), generator=g)], 1)
    t = torch.cat([t, t[:5]])  # repeated triplets count twice
    got = Served("triplet_margin", {"miner": "given", "eps": 0.0, "margin": 1.5}, x, None, r, None, triplets=t)

    def reference(xl: Tensor, rl: Tensor) -> tuple[Tensor, Any]:
        loss_fn = pml_losses.TripletMarginLoss(margin=1.5, distance=_lp(), reducer=pml_reducers.MeanReducer())
        return loss_fn(xl, None, (t[:, 0], t[:, 1], t[:, 2]), rl, None), None

    loss, gx, gr, _ = with_grads(reference, x, r)
    assert_close(got, loss, gx, gr, dtype)
    assert got.stats["selected_triplets"] == t.shape[0]


# ---- against brute-force references -------------------------------------------------------------------------------

def check_triplet_loss(name: str, params: dict[str, Any], x: Tensor, y: Tensor, r: Tensor, yr: Tensor) -> Served:
    """Serve ``name`` and compare with the loop references (selection, loss, both gradients, triplets)."""
    dtype = x.dtype
    got = Served(name, params, x, y, r, yr)
    if name == "triplet_margin":
        dist = pair_dist(params.get("distance_kind", "pairwise_distance"), params.get("p", 2.0),
                         params.get("eps", 1e-6))
        miner, margin, soft = params.get("miner", "semihard"), params.get("margin", 1.0), False
    else:
        dist, miner = clamped, "batch_hard" if name == "batch_hard_triplet" else "all"
        margin, soft = params.get("margin", 0.3), params.get("soft", False)
    swap = params.get("swap", False)
    t = mine_ref(dist, miner, x.to(F64), y, r.to(F64), yr)

    def reference(xl: Tensor, rl: Tensor) -> tuple[Tensor, Any]:
        values = triplet_losses(dist, xl, rl, t, margin, soft, swap)
        if name == "batch_all_triplet" and params.get("reduction") == "mean_nonzero":
            active = int((values > 0).sum())
            return values.sum() / max(active, 1), values
        if params.get("reduction") == "sum":
            return values.sum(), values
        return values.sum() / max(len(t), 1), values

    loss, gx, gr, values = with_grads(reference, x, r)
    assert_close(got, loss, gx, gr, dtype)
    assert got.triplets.tolist() == active_sorted(t, values)
    if name != "batch_all_triplet" and got.per_item is not None:
        # ℓ = margin + d_ap − d_an cancels: its absolute error scales with the distances (squared, d = 130: ~260)
        scale = max(1.0, got.stats["mean_d_an"])
        torch.testing.assert_close(got.per_item.to(F64), values, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * scale)
    return got


TRIPLET_CASES = [
    ("batch_hard_triplet", {"margin": 0.5}),
    ("batch_hard_triplet", {"soft": True}),
    ("batch_all_triplet", {"margin": 1.0}),
    ("batch_all_triplet", {"margin": 1.0, "reduction": "mean_nonzero"}),
    ("batch_all_triplet", {"soft": True, "reduction": "sum"}),
    ("triplet_margin", {"miner": "all", "margin": 1.0}),
    ("triplet_margin", {"miner": "all", "margin": 1.0, "swap": True}),
    ("triplet_margin", {"miner": "semihard", "distance_kind": "squared_euclidean"}),
    ("triplet_margin", {"miner": "semihard", "margin": 0.5}),
    ("triplet_margin", {"miner": "batch_hard", "distance_kind": "cosine", "margin": 0.2}),
    ("triplet_margin", {"miner": "batch_hard", "p": 1.0}),
    ("triplet_margin", {"miner": "semihard", "swap": True, "reduction": "sum"}),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("name,params", TRIPLET_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TRIPLET_CASES)])
def test_triplet_losses_against_loops(name: str, params: dict[str, Any], duplicates: bool,
                                      dtype: torch.dtype) -> None:
    """Selections among the reference rows only (a reference row equal to an anchor is a candidate like any
    other: as a positive at distance 0 with zero gradient through the clamp, as the closest negative)."""
    x, y, r, yr = make_data(12, 15, 4, 3, seed=4, dtype=dtype, duplicates=duplicates)
    check_triplet_loss(name, params, x, y, r, yr)


@pytest.fixture()
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gram-form distances and matmul backward (SMALL_WORK = 0), many anchor blocks and chunks."""
    monkeypatch.setattr(distances, "SMALL_WORK", 0)
    monkeypatch.setattr(distances, "_CHUNK_ELEMS", 7)
    monkeypatch.setitem(_mining.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setattr(_mining, "CHUNK_ELEMS", 11)
    monkeypatch.setitem(contrastive.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setitem(multi_similarity.BLOCK_ELEMS, "cpu", 37)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,params", TRIPLET_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TRIPLET_CASES)])
def test_triplet_losses_in_blocks(name: str, params: dict[str, Any], dtype: torch.dtype, tiny_blocks: None) -> None:
    # With swap, an anchor's copy as the positive makes d(p,n) = d(a,n) exactly: a tie (LOSSES.md C.3 keeps
    # d(a,n)) that Gram-form blocks of different shapes may round either way, so swap runs on distinct rows.
    x, y, r, yr = make_data(12, 15, 4, 3, seed=5, dtype=dtype, duplicates=not params.get("swap"))
    check_triplet_loss(name, params, x, y, r, yr)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,params", [
    ("batch_hard_triplet", {}), ("batch_all_triplet", {"margin": 2.0}),
    ("triplet_margin", {"miner": "semihard", "distance_kind": "squared_euclidean"}),
    ("triplet_margin", {"miner": "batch_hard"}),
], ids=["bh", "ba", "tm-semihard", "tm-batch-hard"])
def test_triplet_losses_above_small_work(name: str, params: dict[str, Any], dtype: torch.dtype) -> None:
    """128 x 256 x 130 is above SMALL_WORK (2^22): Gram-form blocks with the near pairs recomputed, and for
    semi-hard the by-rows evaluation (many triplets per anchor)."""
    n, m, d = 128, 256, 130
    assert n * m * d > distances.SMALL_WORK
    x, y, r, yr = make_data(n, m, d, 4, seed=6, dtype=dtype, duplicates=True)
    check_triplet_loss(name, params, x, y, r, yr)


PAIR_CASES = [
    ("contrastive", {"margin": 1.0}), ("contrastive", {"margin": 4.0, "reduction": "sum"}),
    ("multi_similarity", {}), ("multi_similarity", {"alpha": 1.0, "beta": 10.0, "base": 0.2, "epsilon": 0.5}),
]


def check_pair_loss(name: str, params: dict[str, Any], x: Tensor, y: Tensor, r: Tensor, yr: Tensor) -> Served:
    got = Served(name, params, x, y, r, yr)
    if name == "contrastive":
        fn = lambda xl, rl: (ref_contrastive(xl, y, rl, yr, params["margin"], params.get("reduction", "mean")),  # noqa
                             None)
    else:
        kw = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1} | params
        fn = lambda xl, rl: (ref_multi_similarity(xl, y, rl, yr, kw["alpha"], kw["beta"], kw["base"],  # noqa
                                                  kw["epsilon"]), None)
    loss, gx, gr, _ = with_grads(fn, x, r)
    assert_close(got, loss, gx, gr, x.dtype)
    return got


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicates"])
@pytest.mark.parametrize("name,params", PAIR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PAIR_CASES)])
def test_pair_losses_against_loops(name: str, params: dict[str, Any], duplicates: bool, dtype: torch.dtype) -> None:
    x, y, r, yr = make_data(12, 15, 4, 3, seed=7, dtype=dtype, duplicates=duplicates)
    got = check_pair_loss(name, params, x, y, r, yr)
    if name == "contrastive":
        same = (y[:, None] == yr[None, :])
        assert got.stats["positive_pairs"] == int(same.sum())
        assert got.stats["negative_pairs"] == int((~same).sum())
        # per-pair losses, every (i, j) row-major
        with torch.no_grad():
            sq = ((x.to(F64)[:, None] - r.to(F64)[None]) ** 2).sum(-1)
            v = torch.where(same, 0.5 * sq, 0.5 * torch.relu(params["margin"] - sq.clamp_min(1e-12).sqrt()) ** 2)
        torch.testing.assert_close(got.per_item.to(F64), v.reshape(-1), **TOL[dtype])
    else:
        assert got.per_item.shape == (12,)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,params", PAIR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PAIR_CASES)])
def test_pair_losses_in_blocks(name: str, params: dict[str, Any], dtype: torch.dtype, tiny_blocks: None) -> None:
    x, y, r, yr = make_data(12, 15, 4, 3, seed=8, dtype=dtype, duplicates=True)
    check_pair_loss(name, params, x, y, r, yr)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_pair_losses_above_small_work(name: str, dtype: torch.dtype) -> None:
    x, y, r, yr = make_data(128, 256, 130, 4, seed=9, dtype=dtype, duplicates=True)
    check_pair_loss(name, {"margin": 20.0} if name == "contrastive" else {}, x, y, r, yr)


# ---- finite differences --------------------------------------------------------------------------------------------

FD_CASES = [
    ("batch_hard_triplet", {"margin": 1.0}, None),
    ("batch_hard_triplet", {"soft": True}, None),
    ("batch_all_triplet", {"margin": 1.0}, None),
    ("triplet_margin", {"miner": "semihard"}, None),
    ("triplet_margin", {"miner": "all", "swap": True, "distance_kind": "cosine"}, None),
    ("triplet_margin", {"miner": "given"}, torch.tensor([[0, 1, 2], [3, 4, 0], [5, 2, 6], [0, 1, 2]])),
    ("contrastive", {"margin": 2.0}, None),
    ("multi_similarity", {"epsilon": 1.0}, None),
]


@pytest.mark.parametrize("name,params,triplets", FD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FD_CASES)])
def test_gradients_by_finite_differences(name: str, params: dict[str, Any], triplets: Tensor | None) -> None:
    """Central differences of the served loss w.r.t. every entry of embeddings and ref_emb (float64, a point
    where no selection changes within the step)."""
    x, y, r, yr = make_data(6, 7, 3, 2, seed=10)
    labels = None if triplets is not None else y
    got = Served(name, params, x, labels, r, yr, triplets=triplets)
    h = 1e-6

    def value(xv: Tensor, rv: Tensor) -> float:
        return Served(name, params, xv, labels, rv, yr, triplets=triplets).loss

    for which, base, grad in (("x", x, got.gx), ("r", r, got.gr)):
        num = torch.zeros_like(base)
        for k in range(base.numel()):
            plus, minus = base.clone().view(-1), base.clone().view(-1)
            plus[k] += h
            minus[k] -= h
            plus, minus = plus.view_as(base), minus.view_as(base)
            up = value(plus, r) if which == "x" else value(x, plus)
            down = value(minus, r) if which == "x" else value(x, minus)
            num.view(-1)[k] = (up - down) / (2 * h)
        torch.testing.assert_close(grad, num, rtol=1e-5, atol=1e-7, msg=f"gradient of {which}")
    assert float(got.gr.abs().sum()) > 0  # the reference set does get gradient


# ---- empty selections ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [(n, {}) for n in NATIVE if n != "triplet_margin"]
                         + [("triplet_margin", {"miner": m}) for m in ("all", "semihard", "batch_hard")])
@pytest.mark.parametrize("case", ["disjoint_labels", "single_ref_class", "empty_ref"])
def test_empty_selections(name: str, params: dict[str, Any], case: str) -> None:
    """No valid triplet / pair: loss 0 (contrastive: its negatives still count), zero gradients, no triplets."""
    x, y, r, yr = make_data(6, 5, 3, 2, seed=11)
    if case == "disjoint_labels":
        yr = yr + 10  # no anchor has a positive in the reference set
    elif case == "single_ref_class":
        yr = torch.full_like(yr, int(y[0]))  # anchors of y[0] have no negative, the others no positive
    else:
        r, yr = r[:0], yr[:0]
    got = Served(name, params, x, y, r, yr)
    if name == "contrastive" and case != "empty_ref":
        check_pair_loss(name, {"margin": 1.0}, x, y, r, yr)
        return
    assert got.loss == 0.0
    assert not got.gx.any() and not got.gr.any()
    assert got.triplets is None or got.triplets.numel() == 0


# ---- errors --------------------------------------------------------------------------------------------------------

def _error(name: str, inputs: dict[str, Tensor], params: dict[str, Any] | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        validated(get(name)(params or {}), inputs)
    return info.value


@pytest.mark.parametrize("name", NATIVE)
def test_bad_reference_inputs(name: str) -> None:
    x, y, r, yr = make_data(6, 5, 3, 2, seed=12)
    params = {"miner": "all"} if name == "triplet_margin" else {}
    base = {"embeddings": x, "labels": y}
    cases = [
        ({"ref_emb": r}, "inputs.ref_labels", "required"),
        ({"ref_labels": yr}, "inputs.ref_labels", "without inputs.ref_emb"),
        ({"ref_emb": r[:, :2], "ref_labels": yr}, "inputs.ref_emb", "width"),
        ({"ref_emb": r[0], "ref_labels": yr}, "inputs.ref_emb", "expected [m, 3]"),
        ({"ref_emb": r.float(), "ref_labels": yr}, "inputs.ref_emb", "dtype float32, expected float64"),
        ({"ref_emb": r, "ref_labels": yr[:4]}, "inputs.ref_labels", "expected [5]"),
        ({"ref_emb": r, "ref_labels": yr, "ids": torch.arange(6)}, "inputs.ids", "not with inputs.ref_emb"),
        ({"ref_emb": r, "ref_labels": yr.double()}, "inputs.ref_labels", "integer dtype"),
    ]
    for extra, field, text in cases:
        err = _error(name, base | extra, params)
        assert err.field == field, (extra.keys(), err)
        assert text in str(err), (text, str(err))


def test_triplet_margin_given_indices_refer_to_the_reference_set() -> None:
    x, _, r, yr = make_data(6, 4, 3, 2, seed=13)
    ok = {"embeddings": x, "ref_emb": r, "triplets": torch.tensor([[5, 3, 0]])}
    validated(get("triplet_margin")({}), ok)  # anchors < 6, positives and negatives < 4; ref_labels optional
    err = _error("triplet_margin", ok | {"triplets": torch.tensor([[0, 1, 2], [1, 4, 0]])})
    assert err.field == "inputs.triplets" and "outside [0, 4) (rows of inputs.ref_emb)" in str(err)
    err = _error("triplet_margin", ok | {"triplets": torch.tensor([[6, 1, 2]])})
    assert err.field == "inputs.triplets" and "outside [0, 6) (embedding rows)" in str(err)
    err = _error("triplet_margin", {"embeddings": x, "ref_emb": r, "labels": torch.zeros(6, dtype=torch.int64)},
                 {"miner": "semihard"})
    assert err.field == "inputs.ref_labels"


@pytest.mark.parametrize("name", NATIVE)
def test_reference_set_refused_with_a_memory(name: str) -> None:
    """A cross-batch memory already extends the candidates: the loss refuses a reference set with one."""
    x, y, r, yr = make_data(6, 5, 3, 2, seed=14)
    mem = Memory(torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 0, 1]), torch.full((4,), -1))
    params = {"miner": "all"} if name == "triplet_margin" else {}
    inputs = {"embeddings": x, "labels": y, "ref_emb": r, "ref_labels": yr}
    with pytest.raises(InvalidArgument) as info:
        get(name)(params).forward(inputs, ComputeContext(device=torch.device("cpu"), max_triplets=10, memory=mem))
    assert info.value.field == "inputs.ref_emb"


def test_list_losses_advertises_the_reference_inputs() -> None:
    for name in NATIVE:
        specs = {s.name: s for s in get(name).inputs}
        assert specs["ref_emb"].differentiable and not specs["ref_emb"].required and specs["ref_emb"].dtype == "float"
        assert specs["ref_labels"].dtype == "int" and not specs["ref_labels"].required


# ---- shard mode -----------------------------------------------------------------------------------------------------

def _threaded_shards(count: int) -> list[sharding.Shard]:
    """``count`` in-process shards whose collectives meet at a barrier (threads stand in for replicas)."""
    barrier = threading.Barrier(count)
    slots: list[Any] = [None] * count

    def make(i: int) -> sharding.Shard:
        def gather(t: Tensor) -> list[Tensor]:
            slots[i] = t.clone()
            barrier.wait()
            out = [s.clone() for s in slots]
            barrier.wait()
            return out

        def reduce(t: Tensor) -> Tensor:
            parts = gather(t)
            total = parts[0].to(F64) if t.is_floating_point() else parts[0]
            for p in parts[1:]:
                total = total + (p.to(F64) if t.is_floating_point() else p)
            return total.to(t.dtype)

        return sharding.Shard(i, count, reduce, gather)

    return [make(i) for i in range(count)]


@pytest.mark.parametrize("name,params", [("batch_hard_triplet", {}), ("batch_all_triplet", {}),
                                         ("contrastive", {}), ("multi_similarity", {})])
def test_shard_mode_sums_to_the_whole(name: str, params: dict[str, Any]) -> None:
    """The shardable losses split the anchors between replicas; with a reference set the summed shares (loss,
    embeddings' and ref_emb's gradients) equal one server's result."""
    x, y, r, yr = make_data(13, 11, 4, 3, seed=15)
    loss = get(name)(params)
    inputs = validated(loss, {"embeddings": x, "labels": y, "ref_emb": r, "ref_labels": yr})
    opts = compute.ComputeOptions(max_triplets=1 << 20, per_item=True)
    whole = compute.run(loss, inputs, device=torch.device("cpu"), options=opts)
    shards = _threaded_shards(3)
    results: list[Any] = [None] * 3

    def work(i: int) -> None:
        results[i] = compute.forward_backward(get(name)(params), inputs, device=torch.device("cpu"), options=opts,
                                              shard=shards[i]).result

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for res in results:
        assert res is not None
        assert res.loss == pytest.approx(whole.loss, rel=1e-12, abs=1e-15)
        for key in ("embeddings", "ref_emb"):
            torch.testing.assert_close(res.gradients[key], whole.gradients[key], rtol=1e-12, atol=1e-15)
        if whole.triplets is not None:
            assert torch.equal(res.triplets, whole.triplets)
        torch.testing.assert_close(res.per_item, whole.per_item, rtol=1e-12, atol=1e-15)


# ---- through the gRPC service ---------------------------------------------------------------------------------------

def test_reference_set_through_grpc(client: Any) -> None:
    """ref_emb / ref_labels over the wire: the loss and both gradients as the in-process reference; errors name the
    field; a session with a memory refuses a reference set."""
    import embtrain

    x, y, r, yr = make_data(10, 12, 4, 3, seed=16)
    res = client.compute(x.numpy(), y.numpy(), loss="batch_hard_triplet", params={"margin": 0.5},
                         ref_emb=r.numpy(), ref_labels=yr.numpy())
    want = Served("batch_hard_triplet", {"margin": 0.5}, x, y, r, yr)
    np.testing.assert_allclose(res.loss, want.loss, rtol=1e-12)
    np.testing.assert_allclose(res.gradient, want.gx.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.gradients["ref_emb"], want.gr.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(res.triplets, want.triplets.numpy())
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(x.numpy(), y.numpy(), loss="contrastive", ref_emb=r.numpy())
    assert info.value.fields == ["inputs.ref_labels"]
    session = client.create_session("batch_all_triplet", memory={"size": 16})
    with pytest.raises(embtrain.InvalidArgument) as info:
        session.compute(x.numpy(), y.numpy(), ref_emb=r.numpy(), ref_labels=yr.numpy())
    assert info.value.fields == ["inputs.ref_emb"]
