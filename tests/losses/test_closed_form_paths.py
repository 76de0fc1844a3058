"""The closed-form (no autograd graph) paths of the native losses against references that do not share their code:
pair and anchor loops written from LOSSES.md, autograd through torch built-ins, and finite differences.

Contrastive, multi-similarity and island compute their loss and gradient in closed form
(``distances.with_gradient``); contrastive and the triplet evaluator take squared distances in the Gram form with
the entries near cancellation recomputed from differences (``distances.CandidateRows``). These tests force those
paths on small inputs (``SMALL_WORK = 0``, tiny blocks) and include the cases the exact recompute is for:
duplicates, near-duplicates far from the origin in float32, zero rows and zero-norm centres.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embtrain_server.losses import ComputeContext, Memory, _mining, contrastive, distances, get, load_all
from embtrain_server.losses import island as island_module
from embtrain_server.losses import multi_similarity

load_all()

F64, F32 = torch.float64, torch.float32
CPU = torch.device("cpu")


@pytest.fixture
def gram_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gram form + exact near recompute and many small blocks, on small inputs."""
    monkeypatch.setattr(distances, "SMALL_WORK", 0)
    monkeypatch.setattr(distances, "_CHUNK_ELEMS", 7)
    monkeypatch.setitem(contrastive.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setitem(multi_similarity.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setitem(_mining.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setattr(_mining, "CHUNK_ELEMS", 11)


def _forward(name: str, params: dict, inputs: dict[str, torch.Tensor], memory: Memory | None = None,
             wrt: tuple[str, ...] = ("embeddings",)):
    loss = get(name)(params)
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in wrt else v) for k, v in inputs.items()}
    out = loss.forward(leaves, ComputeContext(device=CPU, max_triplets=1 << 20, want_per_item=True, memory=memory))
    grads = torch.autograd.grad(out.loss, [leaves[k] for k in wrt])
    return out, dict(zip(wrt, grads))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ---- contrastive ---------------------------------------------------------------------------------------------

def _contrastive_ref(x: torch.Tensor, y: torch.Tensor, margin: float, reduction: str, mem: Memory | None):
    """float64 pairs (i < j) and (i, memory row), by autograd through explicit differences."""
    x = x.detach().double().requires_grad_(True)
    cand = x if mem is None else torch.cat([x, mem.embeddings.double()])
    cy = y if mem is None else torch.cat([y, mem.labels])
    n = x.shape[0]
    sq = (x[:, None, :] - cand[None, :, :]).pow(2).sum(-1)
    same = y[:, None] == cy[None, :]
    used = torch.arange(cand.shape[0])[None, :] > torch.arange(n)[:, None]
    gap = (margin - sq.clamp_min(1e-12).sqrt()).clamp_min(0)
    v = torch.where(same, 0.5 * sq, 0.5 * gap * gap)[used]
    loss = v.sum() / (v.numel() if reduction == "mean" and v.numel() else 1)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, v.detach(), int((same & used).sum()), int((~same & used & (gap > 0)).sum())


def _batch(seed: int, n: int, d: int, classes: int, scale: float, offset: float, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=F64) * scale + offset).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    x[3] = x[7]  # duplicates: a positive or a clamped negative pair
    x[11], y[11] = x[12], y[12]  # a duplicate positive
    x[20], y[20] = x[21], (y[21] + 1) % max(classes, 2)  # a duplicate negative
    x[14], y[14] = x[15] + 3e-7, y[15]  # a positive pair below the clamp: ½sq is smooth, its gradient is not 0
    return x, y


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("classes", [1, 4, 15])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "offset"])
@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "memory"])
@pytest.mark.parametrize("large", [False, True], ids=["direct", "gram"])
def test_contrastive_against_pair_loop(dtype: torch.dtype, classes: int, offset: float, with_memory: bool,
                                       large: bool, request: pytest.FixtureRequest) -> None:
    if large:
        request.getfixturevalue("gram_path")
    x, y = _batch(5, 30, 5, classes, 0.4, offset, dtype)
    g = torch.Generator().manual_seed(6)
    mem = Memory((torch.randn(7, 5, generator=g, dtype=F64) * 0.4 + offset).to(dtype),
                 torch.randint(0, classes, (7,), generator=g), torch.arange(7)) if with_memory else None
    tol = 1e-10 if dtype == F64 else 2e-5
    for margin, reduction in [(0.6, "mean"), (2.5, "sum")]:
        out, grads = _forward("contrastive", {"margin": margin, "reduction": reduction}, {"embeddings": x,
                                                                                         "labels": y}, mem)
        ref, ref_grad, ref_items, pos, active = _contrastive_ref(x, y, margin, reduction, mem)
        assert abs(float(out.loss.detach()) - float(ref)) <= tol * abs(float(ref))
        assert _rel(grads["embeddings"], ref_grad) <= tol
        assert _rel(out.per_item, ref_items) <= tol
        assert out.stats["positive_pairs"] == pos and out.stats["active_negative_pairs"] == active


def test_contrastive_near_duplicates_far_from_the_origin_float32(gram_path: None) -> None:
    # Every pair is within 1e-3 of the others and 1000 from the origin: the plain Gram form would be noise.
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + 1e-3 * torch.randn(40, 8, generator=g, dtype=F64)).to(F32)
    y = torch.arange(40) % 3
    out, grads = _forward("contrastive", {"margin": 0.01}, {"embeddings": x, "labels": y})
    ref, ref_grad, *_ = _contrastive_ref(x, y, 0.01, "mean", None)  # the same float32 values, in float64
    assert abs(float(out.loss.detach()) - float(ref)) <= 1e-5 * abs(float(ref))
    assert _rel(grads["embeddings"], ref_grad) <= 1e-5


def test_contrastive_gradcheck_in_the_gram_path(gram_path: None) -> None:
    x, y = _batch(9, 24, 3, 3, 0.5, 2.0, F64)
    x[3] = x[7] + 1e-4  # near, not equal: finite differences stay on one side of the clamp
    x[11] = x[12] + 2e-4
    x[20] = x[21] + 3e-4
    loss = get("contrastive")({"margin": 1.3})

    def fn(z: torch.Tensor) -> torch.Tensor:
        return loss.forward({"embeddings": z, "labels": y}, ComputeContext(device=CPU, max_triplets=1)).loss

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-7, atol=1e-6, rtol=1e-5)


# ---- multi-similarity ----------------------------------------------------------------------------------------

def _ms_ref(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, base: float, eps: float,
            mem: Memory | None):
    """Anchor by anchor, from LOSSES.md §E.2, autograd through F.normalize (float64)."""
    x = x.detach().double().requires_grad_(True)
    xn = F.normalize(x, dim=1, eps=1e-12)
    cand, cy = xn, y
    if mem is not None:
        cand = torch.cat([xn, F.normalize(mem.embeddings.double(), dim=1, eps=1e-12)])
        cy = torch.cat([y, mem.labels])
    sim = xn @ cand.T
    total = x.sum() * 0
    kept = [0, 0, 0]
    for i in range(x.shape[0]):
        s = sim[i].detach()
        pos = [j for j in range(cand.shape[0]) if j != i and cy[j] == y[i]]
        neg = [j for j in range(cand.shape[0]) if cy[j] != y[i]]
        if not pos or not neg:
            continue
        hn = [k for k in neg if s[k] + eps > min(s[j] for j in pos)]
        hp = [j for j in pos if s[j] - eps < max(s[k] for k in neg)]
        if not hp or not hn:
            continue
        kept = [kept[0] + len(hp), kept[1] + len(hn), kept[2] + 1]
        total = total + torch.log1p(torch.exp(-alpha * (sim[i, hp] - base)).sum()) / alpha
        total = total + torch.log1p(torch.exp(beta * (sim[i, hn] - base)).sum()) / beta
    loss = total / x.shape[0]
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, kept


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("classes", [1, 3, 8])
@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "memory"])
@pytest.mark.parametrize("small_blocks", [False, True], ids=["one_block", "blocks"])
def test_multi_similarity_against_anchor_loop(dtype: torch.dtype, classes: int, with_memory: bool,
                                               small_blocks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if small_blocks:
        monkeypatch.setitem(multi_similarity.BLOCK_ELEMS, "cpu", 37)
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(30, 6, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, classes, (30,), generator=g)
    x[8], y[8] = x[9] * 3, y[9]  # same direction: similarity 1 with a genuine positive
    x[5] = 0.0  # a zero row: x̂ = 0
    mem = Memory(torch.randn(9, 6, generator=g, dtype=F64).to(dtype), torch.randint(0, classes, (9,), generator=g),
                 torch.arange(9)) if with_memory else None
    tol = 1e-10 if dtype == F64 else 2e-5
    for params in ({}, {"alpha": 1.5, "beta": 20.0, "base": 0.2, "epsilon": 0.3},
                   {"beta": 400.0, "base": -0.2, "epsilon": 0.0}):
        full = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1} | params
        out, grads = _forward("multi_similarity", params, {"embeddings": x, "labels": y}, mem)
        ref, ref_grad, kept = _ms_ref(x, y, full["alpha"], full["beta"], full["base"], full["epsilon"], mem)
        assert abs(float(out.loss.detach()) - float(ref)) <= tol * max(abs(float(ref)), 1e-300)
        assert _rel(grads["embeddings"], ref_grad) <= tol * 10
        assert [out.stats["kept_positive_pairs"], out.stats["kept_negative_pairs"],
                out.stats["anchors_with_pairs"]] == kept


def test_multi_similarity_gradcheck_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(multi_similarity.BLOCK_ELEMS, "cpu", 37)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(14, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (14,), generator=g)
    mem = Memory(torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g), torch.arange(5))
    loss = get("multi_similarity")({"beta": 10.0, "epsilon": 0.5})

    def fn(z: torch.Tensor) -> torch.Tensor:
        return loss.forward({"embeddings": z, "labels": y}, ComputeContext(device=CPU, max_triplets=1,
                                                                          memory=mem)).loss

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- island --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("params", [{}, {"lambda1": 2.0, "pairs": "ordered", "center_reduction": "sum",
                                         "loss_weight": 0.3}, {"lambda1": 0.0}])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_island_closed_form_equals_autograd(dtype: torch.dtype, params: dict, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(9, 4, generator=g, dtype=F64).to(dtype)
    centers = torch.randn(k, 4, generator=g, dtype=F64).to(dtype)
    if k > 2:
        centers[1] = 0.0  # zero norm: cos := 0, no gradient through it
    y = torch.randint(0, k, (9,), generator=g)
    loss = get("island")(params)
    out, grads = _forward("island", params, {"embeddings": x, "labels": y, "centers": centers},
                          wrt=("embeddings", "centers"))
    xa, ca = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    ref, center_loss, island = island_module.island_terms(xa, y, ca, loss.params)
    ref_x, ref_c = torch.autograd.grad(ref, (xa, ca))
    ref, center_loss, island = ref.detach(), center_loss.detach(), island.detach()
    tol = 1e-12 if dtype == F64 else 1e-5
    assert abs(float(out.loss.detach()) - float(ref)) <= tol * abs(float(ref))
    assert out.stats["center_loss"] == pytest.approx(float(center_loss), rel=tol)
    assert out.stats["island_term"] == pytest.approx(float(island), rel=tol, abs=tol)
    assert _rel(grads["embeddings"], ref_x) <= tol and _rel(grads["centers"], ref_c) <= tol * 10


# ---- triplet evaluation: closed form against autograd ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["clamped_euclidean", "pairwise_distance", "squared_euclidean"])
@pytest.mark.parametrize("soft,swap", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_triplet_evaluation_closed_form_equals_autograd(kind: str, soft: bool, swap: bool,
                                                        dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, generator=g, dtype=F64).to(dtype)
    x[4] = x[2]  # a zero distance: zero gradient (clamp / norm backward)
    y = torch.arange(12) % 3
    c = _mining.make_candidates(x, y, None)
    t = torch.tensor([[0, 3, 1], [2, 5, 4], [4, 2, 7], [6, 9, 10], [2, 4, 6], [11, 8, 0], [0, 3, 1]])
    dist = distances.make_distance(kind, 2.0, 1e-6)
    for margin in (0.5, 3.0):
        got = torch.zeros_like(c.r)
        args = (dist, c.r, got, t[:, 0], t[:, 1], t[:, 2], margin, soft, swap)
        ell, dap, dan = _mining._triplet_chunk_closed(*args)
        ref_grad = torch.zeros_like(c.r)
        ref_ell, ref_dap, ref_dan = _mining._triplet_chunk_autograd(dist, c.r, ref_grad, *args[3:])
        tol = 1e-12 if dtype == F64 else 1e-5
        for a, b in ((ell, ref_ell), (dap, ref_dap), (dan, ref_dan), (got, ref_grad)):
            assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


# ---- distances -----------------------------------------------------------------------------------------------

def test_sq_block_self_column_and_shift(gram_path: None) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(20, 6, generator=g, dtype=F64) + 30.0).to(F32)
    x[5] = x[9]
    rows = distances.CandidateRows(x)
    blk = rows.sq_block(x[4:12], self_col=4)
    ref = (x[4:12].double()[:, None] - x.double()[None]).pow(2).sum(-1)
    assert torch.all(blk.sq[torch.arange(8), torch.arange(8) + 4] == 0) and blk.sq[1, 9] == 0
    assert torch.allclose(blk.sq.double(), ref, rtol=2e-5, atol=0)
    # shift: ||x - r + eps||² as torch.pairwise_distance (eps added to the difference)
    shifted = distances.CandidateRows(x, shift=1e-3).sq_block(x[:7])
    ref = torch.pairwise_distance(x[:7, None].double(), x[None].double(), eps=1e-3).pow(2)
    assert torch.allclose(shifted.sq.double(), ref, rtol=2e-5, atol=1e-12)


# ---- the benchmark's PML compositions compute the native values ----------------------------------------------

def test_bench_pml_compositions_equal_the_native_losses() -> None:
    pytest.importorskip("pytorch_metric_learning", reason="needs the pml extra")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        import losses as bench  # bench/losses.py
    finally:
        sys.path.pop(0)
    for label, (n, d) in itertools.product(["island", "weighted_margin_ranking[unweighted]"], [(64, 8), (96, 5)]):
        case = next(c for c in bench.CASES if c.label == label)
        x, y, extra = bench._inputs(case, n, d, CPU)
        x, extra = x.double(), {k: v.double() for k, v in extra.items()}
        wrt = ("embeddings", "centers") if case.loss == "island" else ("embeddings",)
        out, grads = _forward(case.loss, dict(case.params), {"embeddings": x, "labels": y, **extra}, wrt=wrt)
        captured: dict[str, torch.Tensor] = {}
        real_backward = torch.Tensor.backward

        def capture(self: torch.Tensor, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            captured["loss"] = self.detach()
            real_backward(self, *args, **kwargs)

        torch.Tensor.backward = capture  # type: ignore[method-assign]
        try:
            bench._pml_step(case, x, y, extra)()
        finally:
            torch.Tensor.backward = real_backward  # type: ignore[method-assign]
        assert float(captured["loss"]) == pytest.approx(float(out.loss.detach()), rel=1e-12)
