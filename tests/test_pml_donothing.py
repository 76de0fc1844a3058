"""``embtrain.pml`` with ``reducer=DoNothingReducer()``: PML's unreduced loss dictionary, differentiable.

The forward returns PML's dictionary (the same keys, indices and reduction types, the same element values); the
caller reduces or weights the elements itself and calls backward, which sends the upstream gradient of every element
to the server (``element_weights``) and applies the vector-Jacobian product it returns. Everything is compared with
PML 2.9 computing the same batch in this process: the dictionary, then the gradients of a non-trivial reduction
(random weights, some sub-losses only, a mask of the positive elements), for the embeddings, ``ref_emb`` and the
learnable weights (trained for a few optimiser steps). Skipped as a whole without the pml extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                 reason="needs the pml extra: pip install 'embtrain[pml]'")
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402

import embtrain  # noqa: E402
from embtrain.pml import _lossdict  # noqa: E402
from embtrain.pml import losses as remote  # noqa: E402
from pml_support import CLASSIFIER, IN_DIM, N_CLASSES, PER_CLASS  # noqa: E402
from pml_support import batch as _batch  # noqa: E402
from pml_support import twins  # noqa: E402

SEED = 4321


@pytest.fixture(scope="module")
def client(module_server: Any) -> Iterator[embtrain.Client]:
    """A server of this module's own (the stateful losses open sessions)."""
    with module_server.client(timeout=60.0) as c:
        yield c


def _pair(name: str, client: embtrain.Client, **kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(PML's loss, embtrain.pml's), both with DoNothingReducer, from the same arguments and generator state."""
    kwargs = {**kwargs, "reducer": pml_reducers.DoNothingReducer()}
    torch.manual_seed(SEED)
    local = getattr(pml_losses, name)(**kwargs)
    torch.manual_seed(SEED)
    served = getattr(remote, name)(**kwargs, client=client)
    return local, served


def _same_value(a: Any, b: Any, where: str) -> None:
    """PML's dictionary entries: indices exactly, element values within float round-off, types and dtypes equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        if a.is_floating_point():
            torch.testing.assert_close(b.detach(), a.detach(), msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_value(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _same_value(a[k], b[k], f"{where}.{k}")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def _same_dict(expected: dict[str, Any], got: dict[str, Any]) -> None:
    _same_value(expected, got, "loss_dict")
    for name, info in got.items():  # PML's element tensors carry autograd here too
        if torch.is_tensor(info["losses"]) and torch.is_tensor(expected[name]["losses"]):
            assert info["losses"].requires_grad == expected[name]["losses"].requires_grad, name


# User reductions of the dictionary: each gives a scalar from (dictionary, generator).
def _weighted(d: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """A random weight per element of every sub-loss."""
    total = torch.zeros(())
    for info in d.values():
        if torch.is_tensor(info["losses"]):
            total = total + (info["losses"] * torch.randn(info["losses"].shape, generator=g)).sum()
    return total


def _first_only(d: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """The mean of the first sub-loss only (the others get zero upstream gradients)."""
    return next(iter(d.values()))["losses"].mean()


def _positive_mean(d: dict[str, Any], g: torch.Generator) -> torch.Tensor:
    """The mean of the positive elements of each tensor sub-loss (AvgNonZero-like), summed."""
    total = torch.zeros(())
    for info in d.values():
        losses = info["losses"]
        if torch.is_tensor(losses) and losses.numel():
            keep = losses > 0
            if keep.any():
                total = total + losses[keep].mean()
    return total


REDUCTIONS = {"weighted": _weighted, "first_only": _first_only, "positive_mean": _positive_mean}


def _mined(kind: str) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if kind == "triplets":
        return lambda emb, labels: pml_miners.TripletMarginMiner(margin=0.5)(emb, labels)
    return lambda emb, labels: pml_miners.PairMarginMiner(0.3, 0.9)(emb, labels)


# (id, loss name, constructor arguments, miner or None, with a reference set)
CASES = [
    ("contrastive", "ContrastiveLoss", {}, None, False),
    ("triplet", "TripletMarginLoss", {"margin": 0.2}, None, False),
    ("triplet-mined", "TripletMarginLoss", {"margin": 0.2}, "triplets", False),
    ("triplet-pairs", "TripletMarginLoss", {"margin": 0.2}, "pairs", False),
    ("multi-similarity", "MultiSimilarityLoss", {}, None, False),
    ("ntxent", "NTXentLoss", {"temperature": 0.5}, None, False),
    ("circle", "CircleLoss", {}, None, False),
    ("contrastive-regularizer", "ContrastiveLoss",
     {"embedding_regularizer": pml_regularizers.LpRegularizer(), "embedding_reg_weight": 0.3}, None, False),
    ("contrastive-mined", "ContrastiveLoss", {}, "pairs", False),
    ("contrastive-ref", "ContrastiveLoss", {}, None, True),
    ("triplet-ref", "TripletMarginLoss", {"margin": 0.2}, None, True),
    ("multi-similarity-ref", "MultiSimilarityLoss", {}, None, True),
    ("margin-zero-number", "MarginLoss", {}, None, False),        # beta_reg_loss is the number 0 in PML
    ("proxy-anchor", "ProxyAnchorLoss", CLASSIFIER, None, False),  # two element sub-losses and proxies
    ("smooth-ap", "SmoothAPLoss", {"temperature": 0.1}, None, False),
]


@pytest.mark.parametrize("reduction", sorted(REDUCTIONS))
@pytest.mark.parametrize(("name", "kwargs", "miner", "with_ref"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loss_dict_and_its_gradients_equal_pml(client: embtrain.Client, name: str, kwargs: dict[str, Any],
                                               miner: str | None, with_ref: bool, reduction: str) -> None:
    local, served = _pair(name, client, **kwargs)
    emb, labels = _batch(seed=3)
    args: list[Any] = [labels]
    extra: dict[str, Any] = {}
    if miner is not None:
        args.append(_mined(miner)(emb, labels))
        assert len(args[-1][0]) > 0
    ref = None
    if with_ref:
        ref, ref_labels = _batch(seed=7, per_class=3)
        extra["ref_labels"] = ref_labels
    results = []
    for loss in (local, served):
        x = emb.clone().requires_grad_(True)
        r = ref.clone().requires_grad_(True) if ref is not None else None
        d = loss(x, *args, **extra, **({"ref_emb": r} if r is not None else {}))
        value = REDUCTIONS[reduction](d, torch.Generator().manual_seed(5))
        value.backward()
        weights = [p.grad for p in loss.parameters()]
        results.append((d, value.detach(), x.grad, r.grad if r is not None else None, weights))
    (d_pml, v_pml, g_pml, rg_pml, w_pml), (d_ours, v_ours, g_ours, rg_ours, w_ours) = results
    _same_dict(d_pml, d_ours)
    torch.testing.assert_close(v_ours, v_pml)
    torch.testing.assert_close(g_ours, g_pml)
    assert g_pml.abs().sum() > 0
    if with_ref:
        torch.testing.assert_close(rg_ours, rg_pml)
    assert len(w_ours) == len(w_pml)
    for a, b in zip(w_ours, w_pml):
        torch.testing.assert_close(a, b)


def test_float64_and_labels_none(client: embtrain.Client) -> None:
    """float64 elements come back in float64; an indices_tuple without labels (PML allows it) works too."""
    local, served = _pair("ContrastiveLoss", client)
    emb, labels = _batch(seed=4, dtype=torch.float64)
    indices = pml_miners.PairMarginMiner(0.3, 0.9)(emb, labels)
    grads = []
    for loss in (local, served):
        x = emb.clone().requires_grad_(True)
        d = loss(x, None, indices)
        assert d["pos_loss"]["losses"].dtype == torch.float64
        grads.append((d, _weighted(d, torch.Generator().manual_seed(1)), x))
        grads[-1][1].backward()
    _same_dict(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][2].grad, grads[0][2].grad)


@pytest.mark.parametrize("weight_regularizer", [False, True])
def test_arcface_w_trains_like_pml(client: embtrain.Client, weight_regularizer: bool) -> None:
    """An encoder and ArcFace's W trained by one client optimiser for four steps on both sides, from a weighted
    reduction of the dictionary (the weight regularizer's term is a sub-loss of its own there)."""
    kwargs: dict[str, Any] = dict(CLASSIFIER)
    if weight_regularizer:
        kwargs["weight_regularizer"] = pml_regularizers.RegularFaceRegularizer()
    local, served = _pair("ArcFaceLoss", client, **kwargs)
    torch.testing.assert_close(served.W.detach(), local.W.detach(), rtol=0, atol=0)
    sides, g, labels = twins(local, served, torch.optim.Adam, lr=0.05, seed=1)
    (enc_local, _, _), (enc_served, _, _) = sides
    start = served.W.detach().clone()
    for step in range(4):
        x = torch.randn(labels.shape[0], IN_DIM, generator=g)
        w = torch.rand(labels.shape[0], generator=g)
        dicts = []
        for enc, loss, opt in sides:
            opt.zero_grad()
            d = loss(enc(x), labels)
            value = (d["loss"]["losses"] * w).sum() / w.sum()
            if weight_regularizer:
                value = value + 0.5 * d["weight_reg_loss"]["losses"]
            value.backward()
            dicts.append(d)
            torch.testing.assert_close(loss.W.grad, local.W.grad)
            opt.step()
        _same_dict(dicts[0], dicts[1])
        assert list(dicts[1]) == (["loss", "weight_reg_loss"] if weight_regularizer else ["loss"])
        torch.testing.assert_close(served.W.detach(), local.W.detach())
        for a, b in zip(enc_served.parameters(), enc_local.parameters()):
            torch.testing.assert_close(a.detach(), b.detach())
    assert not torch.allclose(served.W.detach(), start)


def test_no_elements_and_no_grad(client: embtrain.Client) -> None:
    """No triplet at all (every label differs): PML's zero losses (the number 0, indices None); without autograd the
    elements are plain tensors."""
    local, served = _pair("TripletMarginLoss", client, margin=0.2)
    emb = _batch(seed=1)[0]
    labels = torch.arange(emb.shape[0])
    x = emb.clone().requires_grad_(True)
    expected, got = local(x, labels), served(x, labels)
    assert got == expected == {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    with torch.no_grad():
        expected, got = local(emb, labels), served(emb, labels)
    _same_dict(expected, got)
    assert not got["loss"]["losses"].requires_grad


def test_sampled_triplets_are_sent_back_for_the_backward(client: embtrain.Client,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """triplets_per_anchor as an integer: the server samples the triplets; the backward call sends those of the
    forward's dictionary, so its gradient is PML's for exactly them. If the server computed other elements for the
    backward, the backward refuses instead of applying another loss's gradient."""
    _, served = _pair("TripletMarginLoss", client, margin=0.2, triplets_per_anchor=2)
    emb, labels = _batch(seed=6)
    x = emb.clone().requires_grad_(True)
    d = served(x, labels)
    a, p, n = d["loss"]["indices"]
    assert len(a) == 2 * emb.shape[0] and d["loss"]["reduction_type"] == "triplet"
    _weighted(d, torch.Generator().manual_seed(3)).backward()
    local = pml_losses.TripletMarginLoss(margin=0.2, triplets_per_anchor=2, reducer=pml_reducers.DoNothingReducer())
    y = emb.clone().requires_grad_(True)
    expected = local(y, labels, (a, p, n))  # PML with the same triplets
    _same_dict(expected, d)
    _weighted(expected, torch.Generator().manual_seed(3)).backward()
    torch.testing.assert_close(x.grad, y.grad)

    real = client.compute

    def forgetful(*args: Any, **kwargs: Any) -> Any:  # a backward call that lets the server sample again
        kwargs.pop("triplets", None)
        return real(*args, **kwargs)

    d = served(emb.clone().requires_grad_(True), labels)
    monkeypatch.setattr(client, "compute", forgetful)
    with pytest.raises(embtrain.FailedPrecondition, match="other elements"):
        _weighted(d, torch.Generator().manual_seed(3)).backward()


def test_in_place_change_of_the_batch_before_backward_is_refused(client: embtrain.Client) -> None:
    """The backward sends the batch again: changed in place since the forward, autograd refuses, as with PML."""
    _, served = _pair("ContrastiveLoss", client)
    emb, labels = _batch(seed=2)
    x = emb.clone().requires_grad_(True)
    y = x * 1.0
    d = served(y, labels)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        d["pos_loss"]["losses"].sum().backward()


# ---- refusals -------------------------------------------------------------------------------------------------

def test_stateful_loss_with_do_nothing_is_refused(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as err:
        remote.DynamicSoftMarginLoss(reducer=pml_reducers.DoNothingReducer(), client=client)
    assert err.value.fields == ["reducer"] and "twice" in str(err.value)
    with pytest.raises(embtrain.InvalidArgument) as err:  # inside another reducer, as before
        remote.ContrastiveLoss(reducer=pml_reducers.PerAnchorReducer(pml_reducers.DoNothingReducer()), client=client)
    assert err.value.fields == ["reducer.reducer"]


@pytest.mark.parametrize(("weights", "params", "match"), [
    (torch.ones(5), {"reducer": "DoNothingReducer"}, "length 5, expected 577"),
    (torch.ones(577, dtype=torch.int64), {"reducer": "DoNothingReducer"}, "float dtype"),
    (torch.ones(577, 1), {"reducer": "DoNothingReducer"}, "expected \\[e\\]"),
    (torch.ones(577), {}, "only with params.reducer 'DoNothingReducer'"),
    (torch.ones(577), {"reducer": "MeanReducer"}, "only with params.reducer 'DoNothingReducer'"),
    (torch.tensor([float("nan")] * 577), {"reducer": "DoNothingReducer"}, "non-finite"),
])
def test_element_weights_are_checked(client: embtrain.Client, weights: torch.Tensor, params: dict[str, Any],
                                     match: str) -> None:
    emb, labels = _batch()
    wire = {"margin": 0.2, "embedding_regularizer": "LpRegularizer", **params}
    with pytest.raises(embtrain.InvalidArgument, match=match) as err:
        client.compute(emb, labels, loss="pml.TripletMarginLoss", params=wire, element_weights=weights)
    assert err.value.fields == ["inputs.element_weights"]
    if "length" in match:  # the message names the sub-losses and their element counts
        assert "loss: 576, embedding_reg_loss: 1" in str(err.value)


def test_bad_per_item_is_refused(client: embtrain.Client) -> None:
    emb, labels = _batch()
    with pytest.raises(embtrain.InvalidArgument) as err:
        client.compute(emb, labels, loss="pml.ContrastiveLoss",
                       params={"reducer": "DoNothingReducer", "reducer_params": {"per_item": "some"}})
    assert err.value.fields == ["params.reducer_params.per_item"]


# ---- the wire, for other clients -----------------------------------------------------------------------------

def test_element_weights_and_per_item_on_the_wire(client: embtrain.Client) -> None:
    """per_item 'all' is every element in element_weights' order; with element_weights the loss is sum(w * element)
    and its gradient that sum's; per_item 'dict' is the whole dictionary; ListLosses shows the input."""
    emb, labels = _batch(seed=12)
    params = {"reducer": "DoNothingReducer", "embedding_regularizer": "LpRegularizer"}
    x = emb.clone().requires_grad_(True)
    parts = pml_losses.ContrastiveLoss(reducer=pml_reducers.DoNothingReducer(),
                                       embedding_regularizer=pml_regularizers.LpRegularizer())(x, labels)
    elements = torch.cat([info["losses"].reshape(-1) for info in parts.values()])
    w = torch.randn(elements.shape[0], generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((elements * w).sum(), x)

    r = client.compute(emb, labels, loss="pml.ContrastiveLoss",
                       params={**params, "reducer_params": {"per_item": "all"}}, element_weights=w)
    torch.testing.assert_close(r.per_item_losses, elements.detach(), rtol=0, atol=0)
    assert r.loss == pytest.approx(float((elements * w).sum().detach()), rel=1e-6)
    torch.testing.assert_close(r.gradient, grad)

    r = client.compute(emb, labels, loss="pml.ContrastiveLoss",
                       params={**params, "reducer_params": {"per_item": "dict"}}, return_gradient=False)
    assert r.per_item_losses.dtype == torch.float64
    unpacked = _lossdict.unpack(r.per_item_losses)
    _same_value(parts, unpacked.value, "loss_dict")

    r = client.compute(emb, labels, loss="pml.ContrastiveLoss", params=params)  # default: the first sub-loss
    torch.testing.assert_close(r.per_item_losses, parts["pos_loss"]["losses"].detach(), rtol=0, atol=0)

    info = next(i for i in client.losses() if i.name == "pml.ContrastiveLoss")
    spec = next(s for s in info.inputs if s["name"] == "element_weights")
    assert spec["dtype"] == "float" and "DoNothingReducer" in spec["description"]


def test_packed_dictionary_round_trip() -> None:
    """The server's packing and the client's unpacking: every kind of value PML's dictionaries hold (and a few more)
    comes back with its type, dtype, shape and exact value; elements are the sub-losses' floating-point losses."""
    from embtrain_server.losses.pml import pack_loss_dict

    d = {
        "a": {"losses": torch.tensor([[1.5], [2.25]], dtype=torch.float16), "indices": torch.tensor([3, 2 ** 40]),
              "reduction_type": "element"},
        "b": {"losses": torch.tensor(0.1, dtype=torch.bfloat16), "indices": None, "reduction_type": "already_reduced"},
        "c": {"losses": 0, "indices": (torch.tensor([True, False]), [1, 2.5]), "reduction_type": "pos_pair"},
        "d": {"losses": torch.tensor([1.0 / 3.0], dtype=torch.float64), "indices": torch.zeros(0, 2, dtype=torch.int32),
              "reduction_type": "triplet", "extra": "ü"},
        "e": {"losses": torch.tensor([7, 8]), "indices": None, "reduction_type": "element"},  # integer: no element
    }
    packed = pack_loss_dict(d)
    assert packed.dtype == torch.float64
    unpacked = _lossdict.unpack(packed)
    _same_value(d, unpacked.value, "loss_dict")
    assert [key for _, key in unpacked.elements] == ["losses"] * 3
    assert [t.dtype for t in unpacked.element_tensors()] == [torch.float16, torch.bfloat16, torch.float64]
    for bad in (packed[:2], torch.cat([packed, torch.zeros(1, dtype=torch.float64)]), packed * 2):
        with pytest.raises(embtrain.EmbtrainError, match="malformed per_item_losses"):
            _lossdict.unpack(bad)
