"""The compute layer (``embtrain_server.compute.run``) on its own, without a server, against numbers computed here
independently of it: torch.nn.functional for the ``torch.*`` adapters, and brute-force loops over every triplet
for the native losses, differentiated with autograd.

Every batch goes the service's way: ``validate_inputs`` on CPU tensors, the loss's ``check_inputs``, then
``compute.run``. Covered: loss values and gradients, the options (gradient, triplets, max_triplets, per_item), the
compute dtype, the refusal of non-finite results, and triplet ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from embtrain_server import compute
from embtrain_server.errors import InvalidArgument
from embtrain_server.losses import get, load_all
from embtrain_server.validation import validate_inputs

load_all()

F32, F64 = torch.float32, torch.float64
Tensor = torch.Tensor
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
# float64 agreement between the compute layer and the references (CPU or GPU kernels, other summation orders).
TOL64 = {"rtol": 1e-10, "atol": 1e-12}


def run(name: str, params: dict[str, Any], raw: dict[str, Tensor], *, device: str = "cpu",
        compute_dtype: str = "input", **options: Any) -> compute.ComputeResult:
    """Validate ``raw`` as the service does, then ``compute.run`` with ``ComputeOptions(**options)``."""
    loss = get(name)(params)
    inputs = validate_inputs(type(loss), raw, max_batch_elements=1 << 30)
    loss.check_inputs(inputs)
    return compute.run(loss, inputs, device=torch.device(device), compute_dtype=compute_dtype,
                       options=compute.ComputeOptions(**options))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labelled(seed: int = 0, classes: int = 4, per_class: int = 3, d: int = 5, dtype: torch.dtype = F64
             ) -> tuple[Tensor, Tensor]:
    """A shuffled P x K batch of random embeddings."""
    n = classes * per_class
    y = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(n, generator=_gen(seed))]
    return torch.randn(n, d, generator=_gen(seed + 1), dtype=dtype), y


# ---- brute-force references ----------------------------------------------------------------------------------

def dist(u: Tensor, v: Tensor) -> Tensor:
    """Euclidean distance of two rows with the squared distance clamped at 1e-12 (the native losses' distance)."""
    return (u - v).pow(2).sum().clamp_min(1e-12).sqrt()


class Reference(NamedTuple):
    loss: Tensor  # differentiable w.r.t. the embeddings
    active: list[tuple[int, int, int]]  # triplets with a positive term, sorted
    per_item: list[Tensor]


def batch_all_reference(x: Tensor, y: Tensor, margin: float) -> Reference:
    """Mean of max(0, d(a,p) - d(a,n) + margin) over every (a, p, n) with y_p = y_a, p != a and y_n != y_a."""
    terms, active = [], []
    rows = range(len(y))
    for a in rows:
        for p in (j for j in rows if j != a and y[j] == y[a]):
            for q in (j for j in rows if y[j] != y[a]):
                term = torch.relu(dist(x[a], x[p]) - dist(x[a], x[q]) + margin)
                terms.append(term)
                if term > 0:
                    active.append((a, p, q))
    return Reference(torch.stack(terms).mean(), sorted(active), terms)


def batch_hard_reference(x: Tensor, y: Tensor, margin: float) -> Reference:
    """Per anchor with a positive and a negative: its farthest positive p* and nearest negative n*; the mean of
    max(0, d(a,p*) - d(a,n*) + margin) over those anchors, one term per anchor in anchor order."""
    terms, active = [], []
    rows = range(len(y))
    for a in rows:
        pos = [j for j in rows if j != a and y[j] == y[a]]
        neg = [j for j in rows if y[j] != y[a]]
        if not pos or not neg:
            continue
        p = max(pos, key=lambda j: float(dist(x[a], x[j]).detach()))
        q = min(neg, key=lambda j: float(dist(x[a], x[j]).detach()))
        term = torch.relu(dist(x[a], x[p]) - dist(x[a], x[q]) + margin)
        terms.append(term)
        if term > 0:
            active.append((a, p, q))
    return Reference(torch.stack(terms).mean(), sorted(active), terms)


def given_reference(x: Tensor, triplets: Tensor, margin: float) -> Reference:
    """torch's triplet margin loss on the gathered rows (distance ||u - v + 1e-6||_2), mean over the triplets."""
    per = F.triplet_margin_loss(x[triplets[:, 0]], x[triplets[:, 1]], x[triplets[:, 2]], margin=margin,
                                reduction="none")
    active = sorted({tuple(t) for t, v in zip(triplets.tolist(), per.tolist()) if v > 0})
    return Reference(per.mean(), active, list(per))


def reference_grad(ref: Callable[[Tensor], Reference], x: Tensor) -> tuple[Reference, Tensor]:
    """The reference at ``x`` and its gradient w.r.t. ``x`` by autograd."""
    leaf = x.detach().clone().requires_grad_(True)
    r = ref(leaf)
    (g,) = torch.autograd.grad(r.loss, leaf)
    return r, g


# ---- (a) values and gradients against independent references -------------------------------------------------

class TorchCase(NamedTuple):
    name: str
    params: dict[str, Any]
    inputs: Callable[[torch.Generator], dict[str, Tensor]]
    reference: Callable[[dict[str, Tensor]], Tensor]
    differentiable: set[str]  # written out here, not read from the code under test


def _signs(g: torch.Generator, n: int) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(F64)


TORCH_CASES = [
    TorchCase("torch.MSELoss", {},
              lambda g: {"input": torch.randn(6, 4, generator=g, dtype=F64),
                         "target": torch.randn(6, 4, generator=g, dtype=F64)},
              lambda i: F.mse_loss(i["input"], i["target"]), {"input", "target"}),
    TorchCase("torch.CrossEntropyLoss", {"label_smoothing": 0.1},
              lambda g: {"input": torch.randn(8, 5, generator=g, dtype=F64),
                         "target": torch.randint(0, 5, (8,), generator=g),
                         "weight": 0.5 + torch.rand(5, generator=g, dtype=F64)},
              lambda i: F.cross_entropy(i["input"], i["target"], weight=i["weight"], label_smoothing=0.1),
              {"input"}),
    TorchCase("torch.GaussianNLLLoss", {"full": True},
              lambda g: {"input": torch.randn(6, 3, generator=g, dtype=F64),
                         "target": torch.randn(6, 3, generator=g, dtype=F64),
                         "var": 0.2 + torch.rand(6, 3, generator=g, dtype=F64)},
              lambda i: F.gaussian_nll_loss(i["input"], i["target"], i["var"], full=True),
              {"input", "target", "var"}),
    TorchCase("torch.TripletMarginLoss", {"margin": 1.5, "swap": True},
              lambda g: {k: torch.randn(7, 4, generator=g, dtype=F64) for k in ("anchor", "positive", "negative")},
              lambda i: F.triplet_margin_loss(i["anchor"], i["positive"], i["negative"], margin=1.5, swap=True),
              {"anchor", "positive", "negative"}),
    TorchCase("torch.CosineEmbeddingLoss", {"margin": 0.2},
              lambda g: {"input1": torch.randn(6, 3, generator=g, dtype=F64),
                         "input2": torch.randn(6, 3, generator=g, dtype=F64), "target": _signs(g, 6)},
              lambda i: F.cosine_embedding_loss(i["input1"], i["input2"], i["target"], margin=0.2),
              {"input1", "input2"}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.name for c in TORCH_CASES])
def test_torch_adapter_matches_functional(case: TorchCase, device: str) -> None:
    """A torch.* loss through compute.run: the loss and the gradient of every differentiable input equal
    torch.nn.functional differentiated by autograd; gradients come back on the CPU in the input's dtype."""
    raw = case.inputs(_gen(7))
    res = run(case.name, case.params, raw, device=device)

    ref_inputs = {k: v.clone().requires_grad_(k in case.differentiable) for k, v in raw.items()}
    ref = case.reference(ref_inputs)
    names = sorted(case.differentiable)
    ref_grads = dict(zip(names, torch.autograd.grad(ref, [ref_inputs[n] for n in names])))

    assert res.loss == pytest.approx(float(ref.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    assert set(res.gradients) == case.differentiable
    for n in names:
        g = res.gradients[n]
        assert g.dtype == F64 and g.device.type == "cpu"
        assert g.abs().sum() > 0, f"the case leaves the gradient of {n} at zero"
        torch.testing.assert_close(g, ref_grads[n], **TOL64)


class NativeCase(NamedTuple):
    name: str
    params: dict[str, Any]
    reference: Callable[[Tensor, Tensor], Reference]  # (embeddings, labels) -> reference


NATIVE_CASES = [
    NativeCase("batch_all_triplet", {"margin": 0.5}, lambda x, y: batch_all_reference(x, y, 0.5)),
    NativeCase("batch_hard_triplet", {"margin": 0.3}, lambda x, y: batch_hard_reference(x, y, 0.3)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[c.name for c in NATIVE_CASES])
def test_native_loss_matches_brute_force(case: NativeCase, device: str) -> None:
    """A native triplet loss through compute.run: loss, gradient and active triplets equal the loop over every
    triplet written above, with autograd for the gradient."""
    x, y = labelled(seed=3)
    res = run(case.name, case.params, {"embeddings": x, "labels": y}, device=device)
    ref, ref_grad = reference_grad(lambda e: case.reference(e, y), x)
    assert 0 < len(ref.active)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    assert set(res.gradients) == {"embeddings"}
    assert res.gradients["embeddings"].dtype == F64 and res.gradients["embeddings"].device.type == "cpu"
    torch.testing.assert_close(res.gradients["embeddings"], ref_grad, **TOL64)
    assert res.triplets is not None and res.triplets.device.type == "cpu"
    assert [tuple(t) for t in res.triplets.tolist()] == ref.active
    assert res.triplets_total == len(ref.active)
    assert res.n == x.shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_given_triplets_match_torch(device: str) -> None:
    """triplet_margin with client-chosen triplets (an int input besides the embeddings) equals torch's triplet
    margin loss on the gathered rows; the gradient reaches the embedding rows the triplets index."""
    x = torch.randn(9, 4, generator=_gen(11), dtype=F64)
    t = torch.randint(0, 9, (20, 3), generator=_gen(12))
    res = run("triplet_margin", {"miner": "given", "margin": 1.0}, {"embeddings": x, "triplets": t}, device=device)
    ref, ref_grad = reference_grad(lambda e: given_reference(e, t, 1.0), x)
    assert 0 < len(ref.active) < len(t)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    assert set(res.gradients) == {"embeddings"}  # the int input "triplets" has none
    torch.testing.assert_close(res.gradients["embeddings"], ref_grad, **TOL64)
    assert [tuple(r) for r in res.triplets.tolist()] == ref.active


# ---- (b) options -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gradient", [True, False])
def test_gradient_option(gradient: bool) -> None:
    """gradient=False returns no gradients at all; the loss and the triplets are those of the full computation."""
    x, y = labelled(seed=5)
    res = run("batch_all_triplet", {"margin": 0.5}, {"embeddings": x, "labels": y}, gradient=gradient)
    ref, ref_grad = reference_grad(lambda e: batch_all_reference(e, y, 0.5), x)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    assert [tuple(t) for t in res.triplets.tolist()] == ref.active
    if gradient:
        assert set(res.gradients) == {"embeddings"}
        torch.testing.assert_close(res.gradients["embeddings"], ref_grad, **TOL64)
    else:
        assert res.gradients == {}


@pytest.mark.parametrize("triplets", [True, False])
def test_triplets_option(triplets: bool) -> None:
    """triplets=False returns no triplets (and no triplet ids, although ids were sent); loss and gradient are
    unchanged."""
    x, y = labelled(seed=6)
    ids = torch.arange(100, 100 + len(y))
    res = run("batch_all_triplet", {"margin": 0.5}, {"embeddings": x, "labels": y, "ids": ids}, triplets=triplets)
    ref, ref_grad = reference_grad(lambda e: batch_all_reference(e, y, 0.5), x)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    torch.testing.assert_close(res.gradients["embeddings"], ref_grad, **TOL64)
    if triplets:
        assert [tuple(t) for t in res.triplets.tolist()] == ref.active
        assert res.triplet_ids is not None and res.triplet_ids.shape == (len(ref.active), 3)
    else:
        assert res.triplets is None and res.triplet_ids is None


@pytest.mark.parametrize("cap", [0, 1, 5, 10**6])
def test_max_triplets_caps_the_list_but_counts_all(cap: int) -> None:
    """max_triplets keeps the first ``cap`` active triplets in sorted order; triplets_total counts every active
    triplet of the brute-force loop; the loss and the gradient do not depend on the cap."""
    x, y = labelled(seed=8)
    res = run("batch_all_triplet", {"margin": 0.5}, {"embeddings": x, "labels": y}, max_triplets=cap)
    ref, ref_grad = reference_grad(lambda e: batch_all_reference(e, y, 0.5), x)
    assert len(ref.active) > 5  # the small caps do cut
    assert [tuple(t) for t in res.triplets.tolist()] == ref.active[:cap]
    assert res.triplets.shape == (min(cap, len(ref.active)), 3)
    assert res.triplets_total == len(ref.active)
    assert res.loss == pytest.approx(float(ref.loss.detach()), rel=TOL64["rtol"], abs=TOL64["atol"])
    torch.testing.assert_close(res.gradients["embeddings"], ref_grad, **TOL64)


# ---- (c) compute dtype -------------------------------------------------------------------------------------------

class DtypeCase(NamedTuple):
    name: str
    params: dict[str, Any]
    inputs: Callable[[], dict[str, Tensor]]  # float32
    reference: Callable[[dict[str, Tensor]], Tensor]  # on float64 inputs
    differentiable: str


def _ce_inputs() -> dict[str, Tensor]:
    g = _gen(21)
    return {"input": (4 * torch.randn(64, 10, generator=g)).to(F32), "target": torch.randint(0, 10, (64,), generator=g)}


def _triplet_inputs() -> dict[str, Tensor]:
    x, y = labelled(seed=22, classes=3, per_class=4, d=6, dtype=F32)
    return {"embeddings": x, "labels": y}


DTYPE_CASES = [
    DtypeCase("torch.CrossEntropyLoss", {}, _ce_inputs, lambda i: F.cross_entropy(i["input"], i["target"]), "input"),
    DtypeCase("batch_all_triplet", {"margin": 0.5}, _triplet_inputs,
              lambda i: batch_all_reference(i["embeddings"], i["labels"], 0.5).loss, "embeddings"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=[c.name for c in DTYPE_CASES])
def test_float64_compute_dtype_on_float32_input(case: DtypeCase, device: str) -> None:
    """compute_dtype="float64" on float32 inputs computes in float64 (the loss agrees with a float64 reference to
    1e-12, which a float32 computation of the same batch does not) and returns the gradient in float32, the
    input's dtype, equal to the float64 reference's gradient rounded to float32 (within one float32 ulp)."""
    raw = case.inputs()
    ref_inputs = {k: v.to(F64) if v.is_floating_point() else v for k, v in raw.items()}
    ref_inputs[case.differentiable].requires_grad_(True)
    ref = case.reference(ref_inputs)
    (ref_grad,) = torch.autograd.grad(ref, ref_inputs[case.differentiable])

    res = run(case.name, case.params, raw, device=device, compute_dtype="float64")
    g = res.gradients[case.differentiable]
    assert g.dtype == F32 and g.device.type == "cpu"
    assert res.loss == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(g, ref_grad.to(F32), rtol=2.0**-23, atol=0.0)

    in_float32 = run(case.name, case.params, raw, device=device)
    assert in_float32.gradients[case.differentiable].dtype == F32
    assert in_float32.loss != pytest.approx(float(ref.detach()), rel=1e-12)  # the case tells the two dtypes apart


# ---- (d) non-finite results --------------------------------------------------------------------------------------

NON_FINITE = [
    pytest.param("torch.MSELoss", {}, {"input": torch.tensor([[1e20, -1e20], [3.0, 4.0]]),
                                       "target": torch.tensor([[-1e20, 1e20], [0.0, 0.0]])},
                 "non-finite loss", id="overflow-inf-loss"),
    pytest.param("torch.KLDivLoss", {"log_target": True, "reduction": "sum"},
                 {"input": torch.tensor([[100.0, -1.0]]), "target": torch.tensor([[100.0, -2.0]])},
                 "non-finite loss", id="inf-times-zero-nan-loss"),
    pytest.param("torch.GaussianNLLLoss", {}, {"input": torch.tensor([1e15, 0.0, 1.0]), "target": torch.zeros(3),
                                               "var": torch.tensor([1e-5, 1.0, 1.0])},
                 "non-finite gradient of var", id="finite-loss-inf-gradient"),
]


@pytest.mark.parametrize(("name", "params", "raw", "what"), NON_FINITE)
def test_non_finite_result_is_invalid_argument(name: str, params: dict[str, Any], raw: dict[str, Tensor],
                                               what: str) -> None:
    """Finite float32 inputs on which a foreign loss overflows (inf, or NaN from inf * 0) are refused with
    INVALID_ARGUMENT naming inputs.embeddings and saying whether the loss or a gradient is non-finite."""
    with pytest.raises(InvalidArgument) as err:
        run(name, params, raw)
    assert err.value.field == "inputs.embeddings"
    assert err.value.message.startswith("inputs.embeddings:")
    assert what in err.value.message and name in err.value.message


def test_overflow_in_float32_is_finite_in_float64() -> None:
    """The refused float32 batch above computes in float64: the refusal was the dtype's overflow, not the data;
    the float32 gradient holds the float64 one, 2 (x - t) / n."""
    x = torch.tensor([[1e20, -1e20], [3.0, 4.0]])
    t = torch.tensor([[-1e20, 1e20], [0.0, 0.0]])
    res = run("torch.MSELoss", {}, {"input": x, "target": t}, compute_dtype="float64")
    diff = x.to(F64) - t.to(F64)
    assert res.loss == pytest.approx(float((diff ** 2).mean()), rel=1e-12)
    torch.testing.assert_close(res.gradients["input"], (2 * diff / 4).to(F32), rtol=2.0**-23, atol=0.0)
    torch.testing.assert_close(res.gradients["target"], (-2 * diff / 4).to(F32), rtol=2.0**-23, atol=0.0)


# ---- (e) triplet ids ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [3, 10**6])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64, None], ids=["int32", "int64", "no-ids"])
def test_triplet_ids_are_the_ids_of_the_triplet_rows(ids_dtype: torch.dtype | None, cap: int) -> None:
    """With an "ids" input, triplet_ids[k] = (ids[a], ids[p], ids[n]) for triplets[k] = (a, p, n), as int64, for
    the (capped) returned triplets; without ids there are none."""
    x, y = labelled(seed=31)
    raw = {"embeddings": x, "labels": y}
    ids = 1000 + 7 * torch.randperm(len(y), generator=_gen(32))
    if ids_dtype is not None:
        raw["ids"] = ids.to(ids_dtype)
    res = run("batch_all_triplet", {"margin": 0.5}, raw, max_triplets=cap)
    ref = batch_all_reference(x, y, 0.5)
    assert [tuple(t) for t in res.triplets.tolist()] == ref.active[:cap]
    if ids_dtype is None:
        assert res.triplet_ids is None
        return
    expected = [[int(ids[a]), int(ids[p]), int(ids[q])] for a, p, q in ref.active[:cap]]
    assert res.triplet_ids is not None and res.triplet_ids.dtype == torch.int64
    assert res.triplet_ids.tolist() == expected


# ---- (f) per-item losses -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_item", [True, False])
def test_per_item_option(per_item: bool, device: str) -> None:
    """per_item=True returns batch_hard_triplet's one loss per valid anchor, in anchor order, equal to the brute
    force; per_item=False returns none."""
    x, y = labelled(seed=41)
    y[0] = 99  # a singleton anchor: no positive, so no term of its own
    res = run("batch_hard_triplet", {"margin": 0.3}, {"embeddings": x, "labels": y}, device=device, per_item=per_item)
    ref = batch_hard_reference(x, y, 0.3)
    if not per_item:
        assert res.per_item is None
        return
    assert res.per_item is not None and res.per_item.device.type == "cpu"
    assert res.per_item.shape == (len(y) - 1,)
    torch.testing.assert_close(res.per_item, torch.stack(ref.per_item).detach(), **TOL64)


def test_per_item_of_the_unreduced_loss_sums_to_the_loss() -> None:
    """triplet_margin with reduction "none" and given triplets: per_item is torch's per-triplet loss in request
    order and the loss is its sum."""
    x = torch.randn(8, 3, generator=_gen(51), dtype=F64)
    t = torch.randint(0, 8, (12, 3), generator=_gen(52))
    res = run("triplet_margin", {"miner": "given", "margin": 1.0, "reduction": "none"},
              {"embeddings": x, "triplets": t}, per_item=True)
    ref = torch.stack(given_reference(x, t, 1.0).per_item)
    torch.testing.assert_close(res.per_item, ref, **TOL64)
    assert res.loss == pytest.approx(float(ref.sum()), rel=TOL64["rtol"], abs=TOL64["atol"])
