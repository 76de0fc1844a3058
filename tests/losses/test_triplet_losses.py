"""The native triplet losses (batch_hard_triplet, batch_all_triplet, triplet_margin), computed the way the service
computes a stateless batch (validation, then ``compute.run``; with a cross-batch memory, the loss's own forward).

References, none of them produced by the code under test: the spec's vectors (LOSSES.md §F), torch's
TripletMarginLoss / TripletMarginWithDistanceLoss, pytorch-metric-learning 2.9.0 with matched conventions,
brute-force loops written from the spec's text, and finite differences (gradcheck).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from served import serve
from vectors import load_vector, run_vector, vector_names

from embtrain_server.errors import InvalidArgument
from embtrain_server.losses import ComputeContext, Memory, _mining, distances, get, load_all

load_all()

CPU = torch.device("cpu")
F64, F32 = torch.float64, torch.float32
Tensor = torch.Tensor
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
PML_REASON = "needs the pml extra: pip install 'embtrain[pml]'"


class Out(NamedTuple):
    """What the tests read of one computed batch (CPU tensors)."""

    loss: Tensor  # 0-dim, in the dtype the batch was computed in
    triplets: Tensor | None
    triplets_total: int
    per_item: Tensor | None
    stats: dict[str, float]


def run(name: str, params: dict, x: Tensor, labels: Tensor | None = None, triplets: Tensor | None = None, *,
        max_triplets: int = 1 << 30, per_item: bool = True, memory: Memory | None = None) -> tuple[Out, Tensor]:
    """Compute one batch on the CPU; returns (output, gradient w.r.t. ``x``).

    Without a memory this is the service's stateless path: validation, then ``compute.run``. A cross-batch memory
    is session state that ``compute.run`` does not take, so with one the loss's own ``forward`` is called (the
    gradient by autograd, or the one the loss returns).
    """
    loss_fn = get(name)(params)
    inputs = {"embeddings": x.detach().clone()}
    if labels is not None:
        inputs["labels"] = labels
    if triplets is not None:
        inputs["triplets"] = triplets
    if memory is None:
        res = serve(loss_fn, inputs, max_triplets=max_triplets, per_item=per_item)
        out = Out(torch.tensor(res.loss, dtype=x.dtype), res.triplets, res.triplets_total, res.per_item, res.stats)
        grad = res.gradients["embeddings"]
    else:
        loss_fn.check_inputs(inputs)
        leaf = inputs["embeddings"].requires_grad_(True)
        raw = loss_fn.forward(inputs, ComputeContext(device=CPU, max_triplets=max_triplets, want_triplets=True,
                                                     want_per_item=per_item, memory=memory))
        if raw.gradients is not None:
            grad = raw.gradients["embeddings"]
        else:
            (grad,) = torch.autograd.grad(raw.loss, leaf, allow_unused=True)
            grad = torch.zeros_like(x) if grad is None else grad
        out = Out(raw.loss.detach(), raw.triplets, raw.triplets_total,
                  None if raw.per_item is None else raw.per_item.detach(), raw.stats)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    return out, grad


def pk_labels(p: int, k: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the large-problem code paths (Gram form + near recompute, matmul backward, many blocks and chunks)
    on small inputs."""
    monkeypatch.setattr(distances, "SMALL_WORK", 0)
    monkeypatch.setattr(distances, "_CHUNK_ELEMS", 7)
    monkeypatch.setitem(_mining.BLOCK_ELEMS, "cpu", 37)
    monkeypatch.setattr(_mining, "CHUNK_ELEMS", 11)


# ---- spec vectors ----------------------------------------------------------------------------------------------

VECTORS = vector_names(["b", "c"])


def _expected_per_item(vec: dict) -> list[float]:
    e = vec["expected"]
    if vec["loss"] != "batch_all_triplet":
        return e["per_triplet_loss"]
    # batch_all's per_item is the per-anchor sum of the per-triplet losses.
    n = len(vec["inputs"]["embeddings"])
    sums = [0.0] * n
    for (a, _, _), v in zip(e["selected_triplets"], e["per_triplet_loss"]):
        sums[a] += v
    return sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("large_path", [False, True], ids=["direct", "blocked"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", VECTORS)
def test_vector(name: str, dtype: torch.dtype, large_path: bool, device: str, request: pytest.FixtureRequest) -> None:
    """The spec's vector through validation and the compute layer on ``device``: loss, gradient (in the input's
    dtype, on the CPU) and mined triplets within the vector's tolerance."""
    if large_path:
        request.getfixturevalue("tiny_blocks")
    vec = load_vector(name)
    tol = vec["tolerance"]["float64" if dtype == F64 else "float32"]
    expected = vec["expected"]
    res = run_vector(vec, dtype, device=device)
    assert torch.allclose(torch.tensor(res.loss, dtype=F64), torch.tensor(expected["loss"], dtype=F64), **tol)
    assert torch.allclose(res.grad.to(F64), torch.tensor(expected["grad_embeddings"], dtype=F64), **tol)
    assert res.grad.dtype == dtype and res.grad.device.type == "cpu"
    assert res.triplets == expected["mined_triplets"]


@pytest.mark.parametrize("per_item", [True, False])
@pytest.mark.parametrize("name", VECTORS)
def test_vector_per_item_and_stats(name: str, per_item: bool) -> None:
    vec = load_vector(name)
    params, inputs = vec["hyperparameters"], vec["inputs"]
    out, grad = run(vec["loss"], params, torch.tensor(inputs["embeddings"], dtype=F64),
                    torch.tensor(inputs["labels"]) if "labels" in inputs else None,
                    torch.tensor(inputs["triplets"]) if "triplets" in inputs else None, per_item=per_item)
    e = vec["expected"]
    tol = vec["tolerance"]["float64"]
    # The "all" miner takes another code path when no per-triplet list is wanted: same loss and gradient.
    if params.get("reduction") != "none":
        assert torch.allclose(out.loss, torch.tensor(e["loss"], dtype=F64), **tol)
    assert torch.allclose(grad, torch.tensor(e["grad_embeddings"], dtype=F64), **tol)
    assert out.triplets.tolist() == e["mined_triplets"] and out.triplets_total == len(e["mined_triplets"])
    if per_item or params.get("reduction") == "none":
        assert torch.allclose(out.per_item, torch.tensor(_expected_per_item(vec), dtype=F64), **tol)
    else:
        assert out.per_item is None
    assert out.stats["selected_triplets"] == len(e["selected_triplets"])
    assert out.stats["active_triplets"] == sum(v > 0 for v in e["per_triplet_loss"])


def test_vector_x01_is_left_to_the_generic_layer() -> None:
    # x01 (NaN embedding) is rejected by the generic validation before any loss runs; nothing to do here but
    # make sure the vector still names a loss of this file, so the skip stays deliberate.
    assert load_vector("x01_nan_embedding_rejected")["loss"] == "batch_hard_triplet"


# ---- finite differences -----------------------------------------------------------------------------------------

class _Wrapped(torch.autograd.Function):
    """Exposes a loss's returned gradient to gradcheck as the backward of its loss value."""

    @staticmethod
    def forward(fctx, x, name, params, labels, triplets, memory):  # type: ignore[override]
        out, grad = run(name, params, x, labels, triplets, memory=memory)
        fctx.save_for_backward(grad)
        return out.loss.detach().clone()

    @staticmethod
    def backward(fctx, g):  # type: ignore[override]
        (grad,) = fctx.saved_tensors
        return g * grad, None, None, None, None, None


GRADCHECK = [
    ("batch_hard_triplet", {"margin": 0.5}),
    ("batch_hard_triplet", {"soft": True}),
    ("batch_all_triplet", {"margin": 0.5}),
    ("batch_all_triplet", {"margin": 0.5, "reduction": "mean_nonzero"}),
    ("batch_all_triplet", {"soft": True, "reduction": "sum"}),
    ("triplet_margin", {"miner": "given"}),
    ("triplet_margin", {"miner": "given", "p": 1.0, "swap": True}),
    ("triplet_margin", {"miner": "all", "margin": 1.5}),
    ("triplet_margin", {"miner": "all", "margin": 1.5, "swap": True, "reduction": "sum"}),
    ("triplet_margin", {"miner": "all", "margin": 0.5, "distance_kind": "cosine"}),
    ("triplet_margin", {"miner": "all", "margin": 2.0, "distance_kind": "pairwise_distance", "p": 3.0}),
    ("triplet_margin", {"miner": "semihard", "margin": 1.0}),
    ("triplet_margin", {"miner": "semihard", "margin": 2.0, "distance_kind": "squared_euclidean", "swap": True}),
    ("triplet_margin", {"miner": "batch_hard", "margin": 1.0, "distance_kind": "cosine"}),
    ("triplet_margin", {"miner": "batch_hard", "margin": 1.0, "reduction": "none"}),
]


@pytest.mark.parametrize("large_path", [False, True], ids=["direct", "blocked"])
@pytest.mark.parametrize("name,params", GRADCHECK, ids=[f"{n}-{p}" for n, p in GRADCHECK])
def test_gradcheck(name: str, params: dict, large_path: bool, request: pytest.FixtureRequest) -> None:
    if large_path:
        request.getfixturevalue("tiny_blocks")
    x = randn(10, 4, seed=3).requires_grad_(True)
    labels = pk_labels(3, 4, seed=1)[:10]
    triplets = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 4], [0, 1, 2], [2, 5, 9]])
    memory = Memory(randn(4, 4, seed=9), torch.tensor([0, 1, 2, 5]), torch.full((4,), -1)) \
        if name != "triplet_margin" or params["miner"] != "given" else None
    loss = _Wrapped.apply(x, name, params, labels, triplets, memory)
    assert float(loss.detach()) > 0  # the configuration is not trivially zero
    assert torch.autograd.gradcheck(lambda z: _Wrapped.apply(z, name, params, labels, triplets, memory), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- brute-force references written from the spec ---------------------------------------------------------------

def ref_distance(kind: str, p: float = 2.0, eps: float = 1e-6) -> Callable[[Tensor, Tensor], Tensor]:
    """Row-wise distance with torch built-ins: anchor (first argument) first."""
    if kind == "clamped_euclidean":
        return lambda u, v: (u - v).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    if kind == "pairwise_distance":
        return lambda u, v: F.pairwise_distance(u, v, p=p, eps=eps)
    if kind == "squared_euclidean":
        return lambda u, v: (u - v).pow(2).sum(-1)
    return lambda u, v: 1 - F.cosine_similarity(u, v, dim=-1, eps=1e-8)


def brute_select(miner: str, cand: Tensor, y: Tensor, n: int, dist) -> list[tuple[int, int, int]]:
    """The selection of LOSSES.md B.2 / C.2 by explicit loops (anchors: rows < n; candidates: all rows)."""
    m = cand.shape[0]

    def d(i: int, j: int) -> float:
        return float(dist(cand[i:i + 1], cand[j:j + 1])[0])

    out = []
    for a in range(n):
        pos = [j for j in range(m) if j != a and y[j] == y[a]]
        neg = [j for j in range(m) if y[j] != y[a]]
        if not pos or not neg:
            continue
        if miner == "all":
            out += [(a, p, q) for p in pos for q in neg]
        elif miner == "batch_hard":
            p_star = pos[0]
            for j in pos:
                if d(a, j) > d(a, p_star):
                    p_star = j
            n_star = neg[0]
            for j in neg:
                if d(a, j) < d(a, n_star):
                    n_star = j
            out.append((a, p_star, n_star))
        else:  # semihard
            for p in pos:
                farther = [j for j in neg if d(a, j) > d(a, p)]
                if farther:
                    best = farther[0]
                    for j in farther:
                        if d(a, j) < d(a, best):
                            best = j
                else:
                    best = neg[0]
                    for j in neg:
                        if d(a, j) > d(a, best):
                            best = j
                out.append((a, p, best))
    return out


def brute_loss(x: Tensor, mem: Tensor | None, sel: list[tuple[int, int, int]], dist, margin: float, swap: bool,
               soft: bool = False) -> tuple[Tensor, Tensor]:
    """Per-triplet losses over the selection, differentiable w.r.t. x (memory is a constant)."""
    cand = x if mem is None else torch.cat([x, mem])
    if not sel:
        return torch.zeros(0, dtype=x.dtype), x.sum() * 0
    t = torch.tensor(sel)
    u, v, w = cand[t[:, 0]], cand[t[:, 1]], cand[t[:, 2]]
    dap, dan = dist(u, v), dist(u, w)
    if swap:
        dpn = dist(v, w)
        dan = torch.where(dpn < dan, dpn, dan)
    ell = torch.logaddexp(dap - dan, torch.zeros_like(dap)) if soft else torch.relu(margin + dap - dan)
    return ell, ell


BRUTE = [
    ("semihard", "pairwise_distance", {}, False),
    ("semihard", "squared_euclidean", {}, True),
    ("semihard", "cosine", {}, False),
    ("semihard", "pairwise_distance", {"p": 1.0, "eps": 0.0}, False),
    ("all", "pairwise_distance", {}, False),
    ("all", "pairwise_distance", {}, True),
    ("all", "squared_euclidean", {}, False),
    ("all", "cosine", {}, True),
    ("all", "pairwise_distance", {"p": 1.0}, False),
    ("batch_hard", "pairwise_distance", {}, True),
    ("batch_hard", "cosine", {}, False),
]


@pytest.mark.parametrize("large_path", [False, True], ids=["direct", "blocked"])
@pytest.mark.parametrize("with_memory", [False, True], ids=["batch", "memory"])
@pytest.mark.parametrize("miner,kind,extra,swap", BRUTE)
def test_triplet_margin_against_brute_force(miner: str, kind: str, extra: dict, swap: bool, with_memory: bool,
                                            large_path: bool, request: pytest.FixtureRequest) -> None:
    if large_path:
        request.getfixturevalue("tiny_blocks")
    x = randn(11, 3, seed=5)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 4, 0])  # label 3 and 4 singletons
    mem = randn(5, 3, seed=6) if with_memory else None
    y_mem = torch.tensor([1, 3, 7, 0, 2])
    margin = 0.7 if kind != "cosine" else 0.2
    params = {"miner": miner, "distance_kind": kind, "margin": margin, "swap": swap, **extra}
    memory = Memory(mem, y_mem, torch.arange(5)) if with_memory else None
    for reduction in ("mean", "sum", "none"):
        out, grad = run("triplet_margin", params | {"reduction": reduction}, x, y, memory=memory)
        dist = ref_distance(kind, extra.get("p", 2.0), extra.get("eps", 1e-6))
        cand = x if mem is None else torch.cat([x, mem])
        sel = brute_select(miner, cand, y if mem is None else torch.cat([y, y_mem]), x.shape[0], dist)
        xr = x.clone().requires_grad_(True)
        ell, _ = brute_loss(xr, mem, sel, dist, margin, swap)
        total = ell.sum() / (len(sel) if reduction == "mean" else 1)
        (ref_grad,) = torch.autograd.grad(total, xr)
        assert torch.allclose(out.loss, total.detach(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-11)
        assert torch.allclose(out.per_item, ell.detach(), rtol=1e-10, atol=1e-12)
        active = sorted({t for t, v in zip(sel, ell.tolist()) if v > 0})
        assert [tuple(t) for t in out.triplets.tolist()] == active
        assert out.stats["selected_triplets"] == len(sel)
        if with_memory:
            assert any(max(t) >= x.shape[0] for t in sel)  # memory rows took part


@pytest.mark.parametrize("large_path", [False, True], ids=["direct", "blocked"])
@pytest.mark.parametrize("name,params", [
    ("batch_hard_triplet", {"margin": 0.4}), ("batch_hard_triplet", {"soft": True}),
    ("batch_all_triplet", {"margin": 0.4}), ("batch_all_triplet", {"soft": True, "reduction": "mean_nonzero"}),
    ("batch_all_triplet", {"margin": 0.4, "reduction": "sum"}),
])
def test_batch_losses_against_brute_force_with_memory(name: str, params: dict, large_path: bool,
                                                      request: pytest.FixtureRequest) -> None:
    if large_path:
        request.getfixturevalue("tiny_blocks")
    x = randn(9, 3, seed=8)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3, 1])
    mem, y_mem = randn(6, 3, seed=10), torch.tensor([3, 0, 5, 1, 1, 2])
    for per_item in (True, False):
        out, grad = run(name, params, x, y, per_item=per_item, memory=Memory(mem, y_mem, torch.arange(6)))
        dist = ref_distance("clamped_euclidean")
        miner = "batch_hard" if name == "batch_hard_triplet" else "all"
        sel = brute_select(miner, torch.cat([x, mem]), torch.cat([y, y_mem]), 9, dist)
        soft = params.get("soft", False)
        xr = x.clone().requires_grad_(True)
        ell, _ = brute_loss(xr, mem, sel, dist, params.get("margin", 0.3), False, soft=soft)
        n_active = len(sel) if soft else int((ell > 0).sum())
        denom = {"mean": len(sel), "mean_nonzero": n_active, "sum": 1}[params.get("reduction", "mean")]
        if name == "batch_hard_triplet":
            denom = len(sel)
        total = ell.sum() / denom
        (ref_grad,) = torch.autograd.grad(total, xr)
        assert torch.allclose(out.loss, total.detach(), rtol=1e-10, atol=1e-12)
        assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-11)
        active = sorted({t for t, v in zip(sel, ell.tolist()) if soft or v > 0})
        assert [tuple(t) for t in out.triplets.tolist()] == active
        if per_item and name == "batch_all_triplet":
            sums = torch.zeros(9, dtype=F64).index_add_(0, torch.tensor([t[0] for t in sel]), ell.detach())
            assert torch.allclose(out.per_item, sums, rtol=1e-10, atol=1e-12)
        elif per_item:
            assert torch.allclose(out.per_item, ell.detach(), rtol=1e-10, atol=1e-12)


# ---- torch built-ins (miner "given") ----------------------------------------------------------------------------

GIVEN = [
    ({}, lambda **kw: torch.nn.TripletMarginLoss(**kw)),
    ({"swap": True}, lambda **kw: torch.nn.TripletMarginLoss(swap=True, **kw)),
    ({"p": 1.0, "margin": 2.0}, lambda **kw: torch.nn.TripletMarginLoss(p=1.0, margin=2.0, **kw)),
    ({"p": 3.0, "eps": 0.0, "swap": True}, lambda **kw: torch.nn.TripletMarginLoss(p=3.0, eps=0.0, swap=True, **kw)),
    ({"p": 0.5}, lambda **kw: torch.nn.TripletMarginLoss(p=0.5, **kw)),
    ({"eps": 0.1, "margin": 0.3}, lambda **kw: torch.nn.TripletMarginLoss(eps=0.1, margin=0.3, **kw)),
    ({"distance_kind": "cosine", "margin": 0.5},
     lambda **kw: torch.nn.TripletMarginWithDistanceLoss(
         distance_function=lambda a, b: 1 - F.cosine_similarity(a, b), margin=0.5, **kw)),
    ({"distance_kind": "cosine", "margin": 0.5, "swap": True},
     lambda **kw: torch.nn.TripletMarginWithDistanceLoss(
         distance_function=lambda a, b: 1 - F.cosine_similarity(a, b), margin=0.5, swap=True, **kw)),
    ({"distance_kind": "squared_euclidean", "margin": 3.0},
     lambda **kw: torch.nn.TripletMarginWithDistanceLoss(
         distance_function=lambda a, b: (a - b).pow(2).sum(-1), margin=3.0, **kw)),
    ({}, lambda **kw: torch.nn.TripletMarginWithDistanceLoss(**kw)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", range(len(GIVEN)))
def test_given_matches_torch(case: int, dtype: torch.dtype, reduction: str) -> None:
    params, make = GIVEN[case]
    x = randn(12, 5, seed=case, dtype=dtype)
    g = torch.Generator().manual_seed(100 + case)
    t = torch.randint(0, 12, (40, 3), generator=g)
    t = torch.cat([t, t[:5]])  # repeated triplets count twice
    out, grad = run("triplet_margin", params | {"miner": "given", "reduction": reduction}, x, triplets=t)
    xr = x.clone().requires_grad_(True)
    ref = make(reduction=reduction)(xr[t[:, 0]], xr[t[:, 1]], xr[t[:, 2]])
    (ref_grad,) = torch.autograd.grad(ref.sum(), xr)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-6}
    if reduction == "none":
        assert torch.allclose(out.per_item, ref.detach(), **tol)
        assert torch.allclose(out.loss, ref.detach().sum(), **tol)
    else:
        assert torch.allclose(out.loss, ref.detach(), **tol)
    assert torch.allclose(grad, ref_grad, **tol)
    per = make(reduction="none")(x[t[:, 0]], x[t[:, 1]], x[t[:, 2]])
    expected = sorted({tuple(r) for r, v in zip(t.tolist(), per.tolist()) if v > 0})
    assert 0 < len(expected) < len(t)
    assert [tuple(r) for r in out.triplets.tolist()] == expected


def test_given_memory_is_ignored_and_labels_optional() -> None:
    x = randn(6, 3, seed=1)
    t = torch.tensor([[0, 1, 2], [3, 4, 5]])
    mem = Memory(randn(3, 3, seed=2), torch.tensor([0, 1, 2]), torch.arange(3))
    a, ga = run("triplet_margin", {}, x, triplets=t)
    b, gb = run("triplet_margin", {"miner": "given"}, x, torch.tensor([0, 0, 1, 1, 2, 2]), t, memory=mem)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    ref = torch.nn.TripletMarginLoss()(x[t[:, 0]], x[t[:, 1]], x[t[:, 2]])
    assert torch.allclose(a.loss, ref, rtol=1e-12)


# ---- pytorch-metric-learning ------------------------------------------------------------------------------------

@pytest.fixture
def pml() -> SimpleNamespace:
    """pytorch-metric-learning's distances, losses, miners and reducers; the test is skipped without the extra
    (only these tests: the rest of the file needs nothing optional)."""
    pytest.importorskip("pytorch_metric_learning", reason=PML_REASON)
    from pytorch_metric_learning import distances, losses, miners, reducers
    return SimpleNamespace(distances=distances, losses=losses, miners=miners, reducers=reducers)


def _pml_triplet_loss(pml: SimpleNamespace, margin: float) -> torch.nn.Module:
    return pml.losses.TripletMarginLoss(margin=margin, distance=pml.distances.LpDistance(normalize_embeddings=False),
                                        reducer=pml.reducers.MeanReducer())


@pytest.mark.parametrize("n_classes,k,d,margin", [(8, 4, 16, 0.3), (16, 4, 8, 5.0), (64, 8, 32, 0.3)],
                         ids=["small", "all-active", "large-path"])
def test_batch_hard_matches_pml(pml: SimpleNamespace, n_classes: int, k: int, d: int, margin: float) -> None:
    labels = pk_labels(n_classes, k, seed=2)
    x = randn(n_classes * k, d, seed=4)
    out, grad = run("batch_hard_triplet", {"margin": margin}, x, labels)
    xr = x.clone().requires_grad_(True)
    miner = pml.miners.BatchHardMiner(distance=pml.distances.LpDistance(normalize_embeddings=False))
    a, p, n = miner(xr, labels)
    ref = _pml_triplet_loss(pml, margin)(xr, labels, (a, p, n))
    (ref_grad,) = torch.autograd.grad(ref, xr)
    assert torch.allclose(out.loss, ref.detach(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-11)
    with torch.no_grad():
        mat = pml.distances.LpDistance(normalize_embeddings=False)(x)
        keep = (mat[a, p] - mat[a, n] + margin) > 0
    pml_active = sorted(map(tuple, torch.stack([a, p, n], 1)[keep].tolist()))
    assert [tuple(t) for t in out.triplets.tolist()] == pml_active
    if margin == 5.0:
        assert len(pml_active) == x.shape[0]


@pytest.mark.parametrize("per_item", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("n_classes,k,d", [(6, 4, 8), (32, 8, 32)], ids=["small", "large-path"])
def test_batch_all_mean_matches_pml(pml: SimpleNamespace, n_classes: int, k: int, d: int, per_item: bool) -> None:
    labels = pk_labels(n_classes, k, seed=3)
    x = randn(n_classes * k, d, seed=5)
    margin = 1.0
    out, grad = run("batch_all_triplet", {"margin": margin}, x, labels, per_item=per_item)
    # The same selection through triplet_margin (distance ||a - p + 0||_2, the "all" miner) must agree as well.
    out2, grad2 = run("triplet_margin", {"miner": "all", "margin": margin, "eps": 0.0}, x, labels,
                      per_item=per_item)
    xr = x.clone().requires_grad_(True)
    ref = _pml_triplet_loss(pml, margin)(xr, labels)
    (ref_grad,) = torch.autograd.grad(ref, xr)
    for o, g in ((out, grad), (out2, grad2)):
        assert 0 < o.stats["active_triplets"] < o.stats["selected_triplets"]
        assert torch.allclose(o.loss, ref.detach(), rtol=1e-9, atol=1e-12)
        assert torch.allclose(g, ref_grad, rtol=1e-8, atol=1e-11)
    assert torch.equal(out.triplets, out2.triplets)


# ---- memory, ties, exact zeros, truncation -----------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("batch_hard_triplet", {}),
                                         ("triplet_margin", {"miner": "batch_hard"})])
def test_hardest_negative_from_memory(name: str, params: dict) -> None:
    x = randn(8, 4, seed=11)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mem_x = torch.cat([randn(3, 4, seed=12) + 20.0, x[5:6] + 1e-3])  # row 3: next to anchor 5, other label
    mem = Memory(mem_x, torch.tensor([0, 1, 2, 9]), torch.tensor([100, 101, 102, 103]))
    out, grad = run(name, params, x, y, memory=mem)
    rows = {t[0]: t for t in out.triplets.tolist()}
    assert rows[5][2] == 8 + 3  # candidate index n + 3: memory row 3
    without, _ = run(name, params, x, y)
    assert all(t[2] < 8 for t in without.triplets.tolist())
    assert grad.shape == x.shape  # memory rows get no gradient: there is no row for them


def test_batch_hard_ties_go_to_the_lowest_index() -> None:
    # Anchor 0 (label 0) at the origin; rows 1 and 2 are equally far positives; rows 3, 5 are identical closest
    # negatives, row 4 a farther one. The spec's rule picks p* = 1 and n* = 3.
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0], [1.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    out, _ = run("batch_hard_triplet", {"margin": 1.0}, x, y)
    assert out.triplets.tolist()[0] == [0, 1, 3]
    out, _ = run("triplet_margin", {"miner": "batch_hard", "margin": 1.0}, x, y)
    assert out.triplets.tolist()[0] == [0, 1, 3]


def test_semihard_ties_go_to_the_lowest_index() -> None:
    # Squared distances on a line. (a=0, p=1): d_ap = 1; the negatives strictly farther are rows 3 and 4 (both 4)
    # and farther ones: n* = 3. (a=0, p=7): d_ap = 10^4, no negative is farther; the farthest negatives are
    # rows 5 and 6 (both 25): n* = 5. (a=1, p=0): d_ap = 1; row 3 is at exactly 1 (not strictly farther), so
    # n* is row 4 (9).
    x = torch.tensor([[0.0], [1.0], [0.5], [2.0], [-2.0], [-5.0], [5.0], [100.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0])
    out, _ = run("triplet_margin", {"miner": "semihard", "distance_kind": "squared_euclidean", "margin": 10.0},
                 x, y)
    sel = out.triplets.tolist()
    assert [0, 1, 3] in sel and [0, 1, 4] not in sel
    assert [0, 7, 5] in sel and [0, 7, 6] not in sel
    assert [1, 0, 4] in sel and [1, 0, 3] not in sel


def test_exact_zero_hinge_is_inactive() -> None:
    # 1-D integers, margin 1: anchor 1 has D(1,0) = 1 and D(1,2) = 2, so its hinge argument is exactly 0; anchor
    # 0's is -1. Nothing is active, and an exact 0 gives no (sub)gradient.
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    for name, params in (("batch_hard_triplet", {"margin": 1.0}), ("batch_all_triplet", {"margin": 1.0}),
                         ("batch_all_triplet", {"margin": 1.0, "reduction": "sum"}),
                         ("triplet_margin", {"miner": "all", "margin": 1.0, "eps": 0.0}),
                         ("triplet_margin", {"miner": "given", "margin": 1.0, "eps": 0.0})):
        for per_item in (False, True):
            triplets = torch.tensor([[1, 0, 2]]) if params.get("miner") == "given" else None
            out, grad = run(name, params, x, None if triplets is not None else y, triplets, per_item=per_item)
            assert float(out.loss) == 0.0
            assert torch.count_nonzero(grad) == 0
            assert out.triplets.shape == (0, 3) and out.triplets_total == 0
            assert out.stats["active_triplets"] == 0


@pytest.mark.parametrize("name,params,labels,triplets", [
    ("batch_hard_triplet", {}, [0], None), ("batch_hard_triplet", {}, [1, 1, 1], None),
    ("batch_hard_triplet", {}, [0, 1, 2], None), ("batch_all_triplet", {"reduction": "mean_nonzero"}, [0, 1, 2], None),
    ("batch_all_triplet", {"soft": True}, [4, 4], None),
    ("triplet_margin", {"miner": "semihard"}, [2, 2, 2], None), ("triplet_margin", {"miner": "all"}, [0], None),
    ("triplet_margin", {"miner": "batch_hard", "reduction": "none"}, [0, 1, 2], None),
    ("triplet_margin", {"miner": "given", "reduction": "none"}, None, []),
])
def test_empty_selection_is_zero(name: str, params: dict, labels, triplets) -> None:
    n = len(labels) if labels is not None else 3
    x = randn(n, 3, seed=n)
    out, grad = run(name, params, x, torch.tensor(labels) if labels is not None else None,
                    torch.tensor(triplets, dtype=torch.int64).reshape(-1, 3) if triplets is not None else None)
    assert float(out.loss) == 0.0 and torch.count_nonzero(grad) == 0
    assert out.triplets.shape == (0, 3) and out.triplets_total == 0
    if params.get("reduction") == "none":
        assert out.per_item.numel() == 0


def test_mean_nonzero_without_active_triplets_is_zero() -> None:
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]], dtype=F64)
    out, grad = run("batch_all_triplet", {"reduction": "mean_nonzero", "margin": 0.1}, x, torch.tensor([0, 0, 1, 1]))
    assert out.stats["selected_triplets"] == 8 and out.stats["active_triplets"] == 0
    assert float(out.loss) == 0.0 and torch.count_nonzero(grad) == 0


def test_duplicates_in_the_blocked_path_get_exact_zero_distance(tiny_blocks: None) -> None:
    # Far from the origin and with duplicates: the Gram form alone would give ~1e-3 distances between copies.
    x = randn(40, 16, seed=3, dtype=F32) + 300.0
    x[7] = x[3]
    x[20] = x[3]
    sq = distances.pairwise_sq_dists(x, x)
    assert sq[3, 7] == 0 and sq[7, 20] == 0 and torch.all(sq.diagonal() == 0)
    ref = ((x.double()[:, None] - x.double()[None]) ** 2).sum(-1)
    assert torch.allclose(sq.double(), ref, rtol=2e-5, atol=0)
    y = torch.arange(40) % 5
    y[7], y[20] = y[3], (y[3] + 1) % 5  # 7 is a duplicate positive of 3, 20 a duplicate negative
    out, grad = run("batch_hard_triplet", {"margin": 0.5}, x, y)
    out_ref, grad_ref = run("batch_hard_triplet", {"margin": 0.5}, x.double(), y)
    assert torch.allclose(grad.double(), grad_ref, rtol=1e-4, atol=1e-6)
    assert out.triplets.tolist() == out_ref.triplets.tolist()


@pytest.mark.parametrize("name,params", [
    ("batch_all_triplet", {"margin": 1.0}), ("batch_all_triplet", {"soft": True}),
    ("batch_hard_triplet", {"margin": 2.0}), ("triplet_margin", {"miner": "all"}),
    ("triplet_margin", {"miner": "semihard", "margin": 3.0}),
])
@pytest.mark.parametrize("limit", [0, 1, 7, 50])
def test_max_triplets_keeps_the_first_in_order(name: str, params: dict, limit: int, tiny_blocks: None) -> None:
    x = randn(16, 3, seed=21)
    y = pk_labels(4, 4, seed=5)
    full, g_full = run(name, params, x, y)
    cut, g_cut = run(name, params, x, y, max_triplets=limit)
    rows = full.triplets.tolist()
    assert rows == [list(t) for t in sorted(set(map(tuple, rows)))]
    assert len(rows) > 7
    assert cut.triplets.tolist() == rows[:limit]
    assert cut.triplets_total == full.triplets_total == len(rows)
    assert torch.equal(g_full, g_cut) and torch.equal(full.loss, cut.loss)


def test_given_triplets_are_deduplicated_sorted_and_truncated() -> None:
    x = randn(6, 2, seed=2)
    t = torch.tensor([[5, 4, 0], [0, 1, 2], [5, 4, 0], [2, 3, 1], [0, 1, 2]])
    out, _ = run("triplet_margin", {"margin": 50.0}, x, triplets=t, max_triplets=2)
    assert out.triplets.tolist() == [[0, 1, 2], [2, 3, 1]] and out.triplets_total == 3
    assert out.stats["selected_triplets"] == 5


# ---- larger batches: blocked code against a float64 reference ----------------------------------------------------

def _anchor_rows(x: Tensor, anchors: Tensor) -> Tensor:
    """float64 euclidean distances of the chosen anchors to every row, from differences."""
    return ((x[anchors].double()[:, None, :] - x.double()[None]) ** 2).sum(-1).sqrt()


def test_large_batch_all_and_semihard_match_float64_reference() -> None:
    n, d = 2048, 64
    y = pk_labels(n // 16, 16, seed=7)
    x = randn(n, d, seed=8, dtype=F32) / 4
    anchors = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:24]
    drow = _anchor_rows(x, anchors).clamp_min(1e-6)
    same = y[anchors][:, None] == y[None]
    pos = same.clone()
    pos[torch.arange(24), anchors] = False

    out, grad = run("batch_all_triplet", {"margin": 0.3}, x, y, max_triplets=1000)
    assert grad.shape == x.shape and out.triplets.shape == (1000, 3)
    for i in range(24):
        dap = drow[i][pos[i]]
        dan = drow[i][~same[i]]
        ref = torch.relu(dap[:, None] - dan[None, :] + 0.3).sum()
        assert torch.allclose(out.per_item[anchors[i]].double(), ref, rtol=2e-4, atol=1e-4)
    assert out.stats["selected_triplets"] == n * 15 * (n - 16)

    out, grad = run("triplet_margin", {"miner": "semihard", "margin": 0.2, "eps": 0.0}, x, y,
                    max_triplets=1000)
    per_pair = out.per_item.double()
    # pairs are listed anchor by anchor, 15 positives each (every anchor has negatives)
    for i in range(24):
        a = int(anchors[i])
        dap = drow[i][pos[i]]
        negs = drow[i][~same[i]]
        ref = []
        for v in dap:
            farther = negs[negs > v]
            dn = farther.min() if farther.numel() else negs.max()
            ref.append(torch.relu(0.2 + v - dn))
        assert torch.allclose(per_pair[a * 15:(a + 1) * 15], torch.stack(ref), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["clamped", "pairwise_distance", "squared_euclidean", "cosine"])
def test_matmul_backward_float32_matches_float64(kind: str) -> None:
    # 600 x 600 x 16 is above SMALL_WORK: the Gram matrix and the matmul backward with near-pair correction run.
    n, d = 600, 16
    y = pk_labels(150, 4, seed=1)
    x = randn(n, d, seed=2, dtype=F64) + 3.0
    x[int((y != y[10]).nonzero()[0])] = x[10]  # a duplicate negative
    x[int((y == y[20]).nonzero()[-1])] = x[20]  # a duplicate positive (or row 20 itself)
    if kind == "clamped":
        name, params = "batch_all_triplet", {"margin": 0.5}
    else:
        name, params = "triplet_margin", {"miner": "all", "distance_kind": kind,
                                          "margin": {"cosine": 0.05, "squared_euclidean": 2.0}.get(kind, 0.5)}
    out32, g32 = run(name, params, x.float(), y, per_item=False)
    out64, g64 = run(name, params, x, y, per_item=False)
    assert out64.stats["active_triplets"] > 1000
    assert torch.allclose(out32.loss.double(), out64.loss, rtol=1e-4)
    scale = g64.abs().max()
    assert torch.allclose(g32.double(), g64, rtol=1e-3, atol=2e-4 * float(scale))


def test_large_classes_use_the_binary_search_path() -> None:
    # A class of 40 (more positives per anchor than the compare-and-add bucketing handles) next to small ones.
    x = randn(60, 3, seed=31)
    y = torch.cat([torch.zeros(40, dtype=torch.int64), torch.arange(1, 6).repeat_interleave(4)])
    y = y[torch.randperm(60, generator=torch.Generator().manual_seed(3))]
    xr = x.clone().requires_grad_(True)
    dmat = (xr[:, None] - xr[None]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    same = y[:, None] == y[None]
    eye = torch.eye(60, dtype=torch.bool)
    total = sum(torch.relu(dmat[a][same[a] & ~eye[a]][:, None] - dmat[a][~same[a]][None, :] + 0.5).sum()
                for a in range(60))
    count = int(sum(((same[a] & ~eye[a]).sum() * (~same[a]).sum()) for a in range(60)))
    (ref_grad,) = torch.autograd.grad(total / count, xr)
    out, grad = run("batch_all_triplet", {"margin": 0.5}, x, y, per_item=False)
    assert torch.allclose(out.loss, total.detach() / count, rtol=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)

    out, _ = run("triplet_margin", {"miner": "semihard", "margin": 0.5, "eps": 0.0}, x, y)
    d = dmat.detach()
    ref = []
    for a in range(60):
        negs = (~same[a]).nonzero()[:, 0]
        for p in (same[a] & ~eye[a]).nonzero()[:, 0]:
            farther = negs[d[a, negs] > d[a, p]]
            n_star = farther[d[a, farther].argmin()] if farther.numel() else negs[d[a, negs].argmax()]
            ref.append(float(torch.relu(0.5 + d[a, p] - d[a, n_star])))
    assert torch.allclose(out.per_item, torch.tensor(ref, dtype=F64), rtol=1e-10, atol=1e-12)


# ---- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,inputs,field", [
    ("batch_hard_triplet", {}, {"labels": [0, 1]}, "inputs.labels"),
    ("batch_all_triplet", {}, {"labels": [[0, 1, 2]]}, "inputs.labels"),
    ("batch_all_triplet", {}, {}, "inputs.labels"),
    ("triplet_margin", {"miner": "semihard"}, {}, "inputs.labels"),
    ("triplet_margin", {}, {}, "inputs.labels"),
    ("triplet_margin", {"miner": "given"}, {"labels": [0, 1, 2]}, "inputs.triplets"),
    ("triplet_margin", {}, {"triplets": [[0, 1, 3]]}, "inputs.triplets"),
    ("triplet_margin", {}, {"triplets": [[0, -1, 2]]}, "inputs.triplets"),
    ("triplet_margin", {}, {"triplets": [[0, 1]]}, "inputs.triplets"),
    ("triplet_margin", {"miner": "all"}, {"labels": [0, 1, 2, 3]}, "inputs.labels"),
])
def test_invalid_inputs_name_the_field(name: str, params: dict, inputs: dict, field: str) -> None:
    loss_fn = get(name)(params)
    tensors = {"embeddings": torch.zeros(3, 2)} | {k: torch.tensor(v) for k, v in inputs.items()}
    with pytest.raises(InvalidArgument) as err:
        loss_fn.check_inputs(tensors)
    assert err.value.field == field and str(err.value).startswith(field + ":")


@pytest.mark.parametrize("name,params,field", [
    ("batch_hard_triplet", {"margin": -0.1}, "params.margin"),
    ("batch_hard_triplet", {"margin": float("inf")}, "params.margin"),
    ("batch_all_triplet", {"reduction": "none"}, "params.reduction"),
    ("triplet_margin", {"margin": 0.0}, "params.margin"),
    ("triplet_margin", {"p": 0.0}, "params.p"),
    ("triplet_margin", {"eps": -1e-6}, "params.eps"),
    ("triplet_margin", {"miner": "hard"}, "params.miner"),
    ("triplet_margin", {"distance_kind": "l2"}, "params.distance_kind"),
    ("triplet_margin", {"size_average": True}, "params.size_average"),
    ("batch_all_triplet", {"swap": True}, "params.swap"),
])
def test_invalid_params_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(name)(params)
    assert err.value.field == field


def test_declarations() -> None:
    for name in ("batch_hard_triplet", "batch_all_triplet", "triplet_margin"):
        cls = get(name)
        assert cls.mines_triplets and cls.description
        assert [s.name for s in cls.inputs][:2] == ["embeddings", "labels"]
    assert dict(zip(get("triplet_margin").schema.names(), [p.default for p in get("triplet_margin").schema.params])) \
        == {"margin": 1.0, "distance_kind": "pairwise_distance", "p": 2.0, "eps": 1e-6, "swap": False,
            "reduction": "mean", "miner": None}
    assert get("batch_all_triplet")({}).params == {"margin": 0.3, "soft": False, "reduction": "mean"}
    assert get("batch_hard_triplet")({}).params == {"margin": 0.3, "soft": False}
