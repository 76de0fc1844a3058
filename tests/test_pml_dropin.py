"""``embtrain.pml``: pytorch-metric-learning's losses through an in-process server, against PML itself in-process.

One import changed, the same numbers: for every served loss the loss value and the gradients (embeddings,
``ref_emb``, learnable parameters) are compared with PML 2.9 computing the same batch in this process, bit for bit
where the computation is the same (a single loss on the CPU), within float round-off where the client composes
(wrapper weights multiply the returned gradient instead of flowing through PML's graph). Learnable parameters are
trained for several steps by a client optimiser on both sides and compared after every step. Skipped as a whole
without the pml extra (``pip install 'embtrain[pml]'``).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                 reason="needs the pml extra: pip install 'embtrain[pml]'")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402

import embtrain  # noqa: E402
from embtrain.pml import _defaults  # noqa: E402
from embtrain.pml import losses as remote  # noqa: E402
from pml_support import CLASSIFIER, DIM, IN_DIM, N_CLASSES  # noqa: E402
from pml_support import batch as _batch  # noqa: E402
from pml_support import twins  # noqa: E402

SEED = 1234

# Every served loss, written out (the names are fixed), with the constructor arguments it is tested with.
ARGS: dict[str, dict[str, Any]] = {
    "AngularLoss": {}, "ArcFaceLoss": CLASSIFIER, "CircleLoss": {}, "ContrastiveLoss": {},
    "CosFaceLoss": CLASSIFIER, "DynamicSoftMarginLoss": {}, "FastAPLoss": {}, "GeneralizedLiftedStructureLoss": {},
    "HistogramLoss": {"n_bins": 20}, "InstanceLoss": {}, "IntraPairVarianceLoss": {},
    "LargeMarginSoftmaxLoss": CLASSIFIER, "LiftedStructureLoss": {}, "MarginLoss": {}, "MultiSimilarityLoss": {},
    "NCALoss": {}, "NPairsLoss": {}, "NTXentLoss": {"temperature": 0.5}, "NormalizedSoftmaxLoss": CLASSIFIER,
    "P2SGradLoss": {"descriptors_dim": DIM, "num_classes": N_CLASSES}, "PNPLoss": {"variant": "Ds"},
    "ProxyAnchorLoss": CLASSIFIER, "ProxyNCALoss": CLASSIFIER, "RankedListLoss": {"margin": 0.4, "Tn": 1.0},
    "SignalToNoiseRatioContrastiveLoss": {}, "SmoothAPLoss": {"temperature": 0.1},
    "SoftTripleLoss": CLASSIFIER | {"centers_per_class": 2}, "SphereFaceLoss": CLASSIFIER,
    "SubCenterArcFaceLoss": CLASSIFIER, "SupConLoss": {}, "ThresholdConsistentMarginLoss": {},
    "TripletMarginLoss": {"margin": 0.2}, "TupletMarginLoss": {},
}
WEIGHTS = {"ArcFaceLoss": "W", "CosFaceLoss": "W", "LargeMarginSoftmaxLoss": "W", "NormalizedSoftmaxLoss": "W",
           "SphereFaceLoss": "W", "SubCenterArcFaceLoss": "W", "P2SGradLoss": "weight", "ProxyAnchorLoss": "proxies",
           "ProxyNCALoss": "proxies", "SoftTripleLoss": "fc"}
NO_INDICES = {"InstanceLoss", "P2SGradLoss", "PNPLoss", "RankedListLoss"}
WITH_REF = {"AngularLoss", "CircleLoss", "ContrastiveLoss", "DynamicSoftMarginLoss", "GeneralizedLiftedStructureLoss",
            "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
            "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "ThresholdConsistentMarginLoss",
            "TripletMarginLoss", "TupletMarginLoss"}


@pytest.fixture(scope="module")
def client(module_server: Any) -> Iterator[embtrain.Client]:
    """A server of this module's own (the stateful losses open sessions)."""
    with module_server.client(timeout=60.0) as c:
        yield c


def _pair(name: str, client: embtrain.Client, **override: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(PML's loss, embtrain.pml's), built from the same arguments and the same generator state."""
    kwargs = ARGS[name] | override
    torch.manual_seed(SEED)
    local = getattr(pml_losses, name)(**kwargs)
    torch.manual_seed(SEED)
    served = getattr(remote, name)(**kwargs, client=client)
    return local, served


def _run(loss: Callable[..., torch.Tensor], emb: torch.Tensor, *args: Any, ref: torch.Tensor | None = None,
         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, d loss / d embeddings, d loss / d ref_emb) of one call on fresh leaves."""
    x = emb.detach().clone().requires_grad_(True)
    r = ref.detach().clone().requires_grad_(True) if ref is not None else None
    if r is not None:
        kwargs["ref_emb"] = r
    value = loss(x, *args, **kwargs)
    value.backward()
    return value.detach(), x.grad, (r.grad if r is not None else None)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    """Bit for bit (dtype included)."""
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a.double() - b.double()).abs().max().item()}"


# ---- what is served ---------------------------------------------------------------------------------------

def test_every_served_loss_has_a_dropin(client: embtrain.Client) -> None:
    on_server = {info.name for info in client.losses() if info.name.startswith("pml.")}
    assert on_server == {f"pml.{n}" for n in ARGS}
    assert set(remote.SERVED) == set(ARGS)
    for name in ARGS:
        cls = getattr(remote, name)
        assert cls.__name__ == name and issubclass(cls, torch.nn.Module)


def _pml_arguments(cls: type) -> dict[str, Any]:
    """Every constructor argument a PML loss takes (its own and its bases', reached through **kwargs)."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (torch.nn.Module, object):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name not in ("self", "mat_based_loss") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p.default)
    return found


@pytest.mark.parametrize("name", sorted(ARGS))
def test_constructor_signature_is_pml_plus_client(name: str) -> None:
    ours = inspect.signature(getattr(remote, name)).parameters
    assert list(ours)[-1] == "client" and ours["client"].default is None
    expected = _pml_arguments(getattr(pml_losses, name))
    assert {k: p.default for k, p in ours.items() if k != "client"} == expected
    assert [k for k, p in ours.items() if p.kind == p.POSITIONAL_OR_KEYWORD] == _pml_positional(name)


def _pml_positional(name: str) -> list[str]:
    """The arguments a PML loss takes by position: its own, or through ``*args`` its base's (less the names it
    takes by keyword). SubCenterArcFaceLoss reads num_classes and embedding_size from ``**kwargs`` (a KeyError
    when given by position): none."""
    if name == "SubCenterArcFaceLoss":
        return []
    cls = getattr(pml_losses, name)
    keyword_only: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = [p for p in inspect.signature(klass.__init__).parameters.values() if p.name != "self"]
        keyword_only |= {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        if not any(p.kind == p.VAR_POSITIONAL for p in params):
            return [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in keyword_only]
    return []


# ---- the same numbers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ARGS))
def test_loss_and_gradient_equal_pml(client: embtrain.Client, name: str) -> None:
    local, served = _pair(name, client)
    emb, labels = _batch(seed=3)
    ref_value, ref_grad, _ = _run(local, emb, labels)
    value, grad, _ = _run(served, emb, labels)
    _same(value, ref_value)
    _same(grad, ref_grad)
    assert grad.abs().sum() > 0
    if name in WEIGHTS:  # the learnable parameter's gradient came back too
        _same(getattr(served, WEIGHTS[name]).grad, getattr(local, WEIGHTS[name]).grad)
    served.close()


@pytest.mark.parametrize("name", sorted(set(ARGS) - NO_INDICES))
@pytest.mark.parametrize("kind", ["triplets", "pairs"])
def test_indices_tuple_equals_pml(client: embtrain.Client, name: str, kind: str) -> None:
    local, served = _pair(name, client)
    emb, labels = _batch(seed=5)
    miner = pml_miners.TripletMarginMiner(margin=0.5) if kind == "triplets" else pml_miners.PairMarginMiner(0.3, 0.9)
    indices = miner(emb, labels)
    assert len(indices[0]) > 0
    ref_value, ref_grad, _ = _run(local, emb, labels, indices)
    value, grad, _ = _run(served, emb, labels, indices)
    _same(value, ref_value)
    _same(grad, ref_grad)
    served.close()


@pytest.mark.parametrize("name", sorted(WITH_REF))
def test_ref_emb_equals_pml(client: embtrain.Client, name: str) -> None:
    local, served = _pair(name, client)
    emb, labels = _batch(seed=6)
    ref_emb, ref_labels = _batch(seed=7, per_class=3)
    expected = _run(local, emb, labels, ref=ref_emb, ref_labels=ref_labels)
    got = _run(served, emb, labels, ref=ref_emb, ref_labels=ref_labels)
    _same(got[0], expected[0])
    _same(got[1], expected[1])
    if expected[2] is None:  # PML's loss does not use ref_emb (ThresholdConsistentMarginLoss): the server says 0
        assert name == "ThresholdConsistentMarginLoss" and not got[2].any()
    else:
        _same(got[2], expected[2])
        assert got[2].abs().sum() > 0  # the reference set's gradient came back
    served.close()


def test_ref_emb_with_mined_indices_against_the_reference_set(client: embtrain.Client) -> None:
    local, served = _pair("TripletMarginLoss", client)
    emb, labels = _batch(seed=8)
    ref_emb, ref_labels = _batch(seed=9, per_class=5)
    indices = pml_miners.TripletMarginMiner(margin=0.5)(emb, labels, ref_emb, ref_labels)
    expected = _run(local, emb, labels, indices, ref=ref_emb, ref_labels=ref_labels)
    got = _run(served, emb, labels, indices, ref=ref_emb, ref_labels=ref_labels)
    for a, b in zip(got, expected):
        _same(a, b)


@pytest.mark.parametrize("name", ["NTXentLoss", "ContrastiveLoss", "TripletMarginLoss"])
def test_labels_none_where_pml_allows_it(client: embtrain.Client, name: str) -> None:
    local, served = _pair(name, client)
    emb, labels = _batch(seed=10)
    indices = pml_miners.PairMarginMiner(0.3, 0.9)(emb, labels)
    ref_value, ref_grad, _ = _run(local, emb, None, indices)
    value, grad, _ = _run(served, emb, None, indices)
    _same(value, ref_value)
    _same(grad, ref_grad)


def test_dynamic_soft_margin_without_labels(client: embtrain.Client) -> None:
    """PML 2.9 computes the value but cannot differentiate it (an in-place fill of the distance matrix: backward
    raises). The value is served; asking for a gradient is refused up front, naming the labels."""
    local, served = _pair("DynamicSoftMarginLoss", client)
    emb, _ = _batch(seed=10)
    with torch.no_grad():
        _same(served(emb), local(emb))
    with pytest.raises(RuntimeError):
        local(emb.clone().requires_grad_(True)).backward()
    with pytest.raises(embtrain.InvalidArgument) as err:
        served(emb.clone().requires_grad_(True))
    assert err.value.fields == ["inputs.labels"]
    served.close()


def test_labels_none_where_pml_refuses_it(client: embtrain.Client) -> None:
    emb, _ = _batch()
    with pytest.raises(embtrain.InvalidArgument) as err:
        remote.ContrastiveLoss(client=client)(emb)
    assert err.value.fields == ["inputs.labels"]
    with pytest.raises(embtrain.InvalidArgument) as err:
        remote.ProxyAnchorLoss(**CLASSIFIER, client=client)(emb)
    assert err.value.fields == ["inputs.labels"]


# ---- learnable parameters ---------------------------------------------------------------------------------

LEARNABLE = sorted(WEIGHTS) + ["MarginLoss"]


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_parameters_train_like_pml(client: embtrain.Client, name: str) -> None:
    """An encoder and the loss's parameters trained by one client optimiser, five steps, on both sides."""
    override = {"learn_beta": True, "num_classes": N_CLASSES, "nu": 0.1} if name == "MarginLoss" else {}
    local, served = _pair(name, client, **override)
    key = WEIGHTS.get(name, "beta")
    assert isinstance(getattr(served, key), torch.nn.Parameter)
    assert [n for n, _ in served.named_parameters()] == [n for n, _ in local.named_parameters()] == [key]
    _same(getattr(served, key).detach(), getattr(local, key).detach())  # PML's initial values, same draws
    sides, g, labels = twins(local, served, torch.optim.Adam, lr=0.05, seed=1)
    (enc_local, _, _), (enc_served, _, _) = sides
    for step in range(5):
        x = torch.randn(labels.shape[0], IN_DIM, generator=g)
        values = []
        for enc, loss, opt in sides:
            opt.zero_grad()
            value = loss(enc(x), labels)
            value.backward()
            opt.step()
            values.append(value.detach())
        _same(values[1], values[0])
        _same(getattr(served, key).detach(), getattr(local, key).detach())
        for a, b in zip(enc_served.parameters(), enc_local.parameters()):
            _same(a.detach(), b.detach())
    assert not torch.equal(getattr(served, key).detach(), getattr(_pair(name, client, **override)[1], key).detach())


def test_state_dict_is_pml_s(client: embtrain.Client) -> None:
    local, _ = _pair("ProxyAnchorLoss", client)
    served = remote.ProxyAnchorLoss(**CLASSIFIER, client=client)
    served.load_state_dict(local.state_dict())
    _same(served.proxies.detach(), local.proxies.detach())
    assert set(served.state_dict()) == set(local.state_dict()) == {"proxies"}


def test_stateless_call_without_the_weights_is_refused(client: embtrain.Client) -> None:
    """Through the plain SDK: no silent seed-0 weights."""
    emb, labels = _batch()
    with pytest.raises(embtrain.InvalidArgument) as err:
        client.compute(emb, labels, loss="pml.ArcFaceLoss", params={"num_classes": N_CLASSES})
    assert err.value.fields == ["inputs.W"]
    w = torch.randn(DIM, N_CLASSES)
    r = client.compute(emb, labels, loss="pml.ArcFaceLoss", params={"num_classes": N_CLASSES}, W=w)
    assert set(r.gradients) == {"embeddings", "W"} and r.gradients["W"].shape == w.shape


@pytest.mark.parametrize("name", sorted(WEIGHTS) + ["MarginLoss"])
def test_initial_weights_without_pml_on_the_client(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A client without pytorch-metric-learning draws the same initial weights with the same init code."""
    override = {"learn_beta": True, "num_classes": N_CLASSES} if name == "MarginLoss" else {}
    torch.manual_seed(SEED)
    local = getattr(pml_losses, name)(**ARGS[name] | override)
    after_local = torch.rand(3)
    monkeypatch.setattr(remote, "_pml", None)
    torch.manual_seed(SEED)
    served = getattr(remote, name)(**ARGS[name] | override)
    after_served = torch.rand(3)
    key = WEIGHTS.get(name, "beta")
    _same(getattr(served, key).detach(), getattr(local, key).detach())
    _same(after_served, after_local)  # the global generator advanced alike


def test_weight_init_func_is_applied(client: embtrain.Client) -> None:
    from pytorch_metric_learning.utils import common_functions as c_f

    init = c_f.TorchInitWrapper(torch.nn.init.uniform_, a=-0.1, b=0.1)
    local, served = _pair("CosFaceLoss", client, weight_init_func=init)
    _same(served.W.detach(), local.W.detach())
    assert float(served.W.abs().max()) <= 0.1


# ---- state across calls -----------------------------------------------------------------------------------

def test_dynamic_soft_margin_keeps_its_histogram_in_a_session(client: embtrain.Client) -> None:
    """PML's histogram moves with every call; the drop-in runs in a session, so it moves on the server the same way.
    (In-process PML keeps the autograd graph in the histogram and cannot backward twice; the server detaches it
    between steps, which the reference does by hand.)"""
    local, served = _pair("DynamicSoftMarginLoss", client, momentum=0.3)
    for step in range(4):
        emb, labels = _batch(seed=20 + step)
        expected = _run(local, emb, labels)
        local.hist_ = local.hist_.detach()
        got = _run(served, emb, labels)
        _same(got[0], expected[0])
        _same(got[1], expected[1])
    assert served.last_result is not None and served.last_result.step == 4
    session_id = served._session.id
    assert client.get_session(session_id).info().loss == "pml.DynamicSoftMarginLoss"
    served.close()
    with pytest.raises(embtrain.NotFound):
        client.get_session(session_id)


# ---- distances, reducers, regularizers ---------------------------------------------------------------------

CONFIGURED: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("TripletMarginLoss", lambda: {"distance": pml_distances.CosineSimilarity(),
                                   "reducer": pml_reducers.AvgNonZeroReducer()}),
    ("ContrastiveLoss", lambda: {"distance": pml_distances.LpDistance(normalize_embeddings=False, p=1, power=2),
                                 "reducer": pml_reducers.ThresholdReducer(low=0.05)}),
    ("ContrastiveLoss", lambda: {"reducer": pml_reducers.PerAnchorReducer(pml_reducers.SumReducer())}),
    ("MultiSimilarityLoss", lambda: {"reducer": pml_reducers.PerAnchorReducer()}),
    ("TripletMarginLoss", lambda: {"reducer": pml_reducers.ClassWeightedReducer(torch.tensor([1.0, 2.0, 0.5, 3.0]))}),
    ("MarginLoss", lambda: {"reducer": pml_reducers.MultipleReducers(
        {"margin_loss": pml_reducers.MeanReducer()}, default_reducer=pml_reducers.SumReducer()),
        "learn_beta": True, "nu": 0.2}),
    ("CircleLoss", lambda: {"reducer": pml_reducers.SumReducer()}),
    ("MultiSimilarityLoss", lambda: {"distance": pml_distances.DotProductSimilarity()}),
    ("SupConLoss", lambda: {"distance": pml_distances.CosineSimilarity(power=2)}),
    ("ContrastiveLoss", lambda: {"distance": pml_distances.SNRDistance()}),
    ("MarginLoss", lambda: {"reducer": pml_reducers.DivisorReducer(), "triplets_per_anchor": "all"}),
    ("ContrastiveLoss", lambda: {"embedding_regularizer": pml_regularizers.LpRegularizer(power=2),
                                 "embedding_reg_weight": 0.3}),
    ("TripletMarginLoss", lambda: {"embedding_regularizer": pml_regularizers.ZeroMeanRegularizer(),
                                   "triplets_per_anchor": "all", "swap": True}),
    ("ArcFaceLoss", lambda: {"weight_regularizer": pml_regularizers.RegularFaceRegularizer(),
                             "weight_reg_weight": 0.5}),
    ("CosFaceLoss", lambda: {"weight_regularizer": pml_regularizers.CenterInvariantRegularizer()}),
    ("SoftTripleLoss", lambda: {"weight_regularizer": pml_regularizers.SparseCentersRegularizer(N_CLASSES, 2),
                                "embedding_regularizer": pml_regularizers.LpRegularizer(p=1)}),
    ("ProxyAnchorLoss", lambda: {"weight_regularizer": pml_regularizers.LpRegularizer(
        reducer=pml_reducers.SumReducer()), "distance": pml_distances.CosineSimilarity()}),
]


@pytest.mark.parametrize(("name", "objects"), CONFIGURED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGURED)])
def test_distance_reducer_and_regularizer_objects_equal_pml(client: embtrain.Client, name: str,
                                                           objects: Callable[[], dict[str, Any]]) -> None:
    local, served = _pair(name, client, **objects())
    emb, labels = _batch(seed=11)
    ref_value, ref_grad, _ = _run(local, emb, labels)
    value, grad, _ = _run(served, emb, labels)
    _same(value, ref_value)
    _same(grad, ref_grad)
    for n, p in local.named_parameters():
        _same(dict(served.named_parameters())[n].grad, p.grad)


@pytest.mark.parametrize(("build", "field"), [
    (lambda c: remote.TripletMarginLoss(distance=pml_distances.BatchedDistance(pml_distances.LpDistance()), client=c),
     "distance"),
    (lambda c: remote.TripletMarginLoss(distance=type("Mine", (pml_distances.LpDistance,), {})(), client=c),
     "distance"),
    (lambda c: remote.DynamicSoftMarginLoss(reducer=pml_reducers.DoNothingReducer(), client=c), "reducer"),
    (lambda c: remote.ContrastiveLoss(reducer=pml_reducers.PerAnchorReducer(aggregation_func=torch.sum), client=c),
     "reducer.aggregation_func"),
    (lambda c: remote.ContrastiveLoss(reducer=pml_reducers.PerAnchorReducer(pml_reducers.DoNothingReducer()),
                                      client=c), "reducer.reducer"),
    (lambda c: remote.ContrastiveLoss(margin=object(), client=c), None),
    (lambda c: remote.ContrastiveLoss(pos_margin=object(), client=c), "pos_margin"),
])
def test_what_cannot_travel_is_refused_at_construction(client: embtrain.Client, build: Callable[[Any], Any],
                                                       field: str | None) -> None:
    if field is None:  # not an argument of the loss at all: the same TypeError as PML's
        with pytest.raises(TypeError):
            build(client)
        with pytest.raises(TypeError):
            pml_losses.ContrastiveLoss(margin=1.0)
        return
    with pytest.raises(embtrain.InvalidArgument) as err:
        build(client)
    assert err.value.fields == [field]


def test_pml_refusals_are_pml_s_own(client: embtrain.Client) -> None:
    """With PML on the client the loss is built locally once: what PML refuses is refused the same way, at once."""
    with pytest.raises(AssertionError):
        pml_losses.DynamicSoftMarginLoss(distance=pml_distances.CosineSimilarity())
    with pytest.raises(AssertionError):
        remote.DynamicSoftMarginLoss(distance=pml_distances.CosineSimilarity(), client=client)
    with pytest.raises(TypeError):
        remote.ArcFaceLoss(client=client)  # num_classes, embedding_size are required, as in PML


# ---- dtypes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_smooth_ap_loss_dtype_is_pml_s(client: embtrain.Client, dtype: torch.dtype) -> None:
    """PML's SmoothAPLoss returns a float32 loss whatever the input dtype; the server sends that value unrounded
    and the drop-in returns it as float32, like PML."""
    local, served = _pair("SmoothAPLoss", client)
    emb, labels = _batch(seed=12, dtype=dtype)
    ref_value, ref_grad, _ = _run(local, emb, labels)
    value, grad, _ = _run(served, emb, labels)
    assert ref_value.dtype == value.dtype == torch.float32
    _same(value, ref_value)
    _same(grad, ref_grad)
    r = client.compute(emb, labels, loss="pml.SmoothAPLoss", params={"temperature": 0.1})
    assert r.loss == float(ref_value)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "ArcFaceLoss"])
def test_float64_equals_pml(client: embtrain.Client, name: str) -> None:
    local, served = _pair(name, client)
    local, served = local.double(), served.double()
    emb, labels = _batch(seed=13, dtype=torch.float64)
    ref_value, ref_grad, _ = _run(local, emb, labels)
    value, grad, _ = _run(served, emb, labels)
    _same(value, ref_value)
    _same(grad, ref_grad)


# ---- the wrappers ---------------------------------------------------------------------------------------------

def _train_pair(local: torch.nn.Module, served: torch.nn.Module, steps: int, call: Callable[..., Any],
                exact: bool = True) -> None:
    sides, g, labels = twins(local, served, torch.optim.SGD, lr=0.1, seed=3)
    (enc_local, _, _), (enc_served, _, _) = sides
    for _ in range(steps):
        x = torch.randn(labels.shape[0], IN_DIM, generator=g)
        values = []
        for enc, loss, opt in sides:
            opt.zero_grad()
            value = call(loss, enc, x, labels)
            value.backward()
            opt.step()
            values.append(value.detach())
        check = _same if exact else (lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6))
        check(values[1], values[0])
        for a, b in zip([*enc_served.parameters(), *served.parameters()], [*enc_local.parameters(),
                                                                           *local.parameters()]):
            check(a.detach(), b.detach())


@pytest.mark.parametrize("miner", [None, "pairs", "triplets"])
@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "TripletMarginLoss", "NTXentLoss"])
def test_cross_batch_memory_equals_pml(client: embtrain.Client, name: str, miner: str | None) -> None:
    def make_miner() -> Any:
        return {None: None, "pairs": pml_miners.PairMarginMiner(0.2, 0.8),
                "triplets": pml_miners.TripletMarginMiner(margin=0.3)}[miner]

    local_loss, served_loss = _pair(name, client)
    local = pml_losses.CrossBatchMemory(local_loss, DIM, memory_size=40, miner=make_miner())
    served = remote.CrossBatchMemory(served_loss, DIM, memory_size=40, miner=make_miner())
    _train_pair(local, served, 5, lambda loss, enc, x, y: loss(enc(x), y))


def test_self_supervised_loss_equals_pml(client: embtrain.Client) -> None:
    for symmetric in (True, False):
        local = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=0.3), symmetric=symmetric)
        served = remote.SelfSupervisedLoss(remote.NTXentLoss(temperature=0.3, client=client), symmetric=symmetric)
        _train_pair(local, served, 3, lambda loss, enc, x, y: loss(enc(x), enc(x + 0.05 * torch.sin(x))))


def test_multiple_losses_equal_pml(client: embtrain.Client) -> None:
    def build(module: Any, c: dict[str, Any]) -> Any:
        torch.manual_seed(SEED)
        return module.MultipleLosses(
            [module.ContrastiveLoss(**c), module.ProxyAnchorLoss(**CLASSIFIER, **c),
             module.TripletMarginLoss(margin=0.3, **c)],
            miners=[None, None, pml_miners.TripletMarginMiner(margin=0.3)], weights=[1.0, 0.5, 2.0])

    local, served = build(pml_losses, {}), build(remote, {"client": client})
    # the weights multiply the returned gradients here, inside PML's graph there: equal within round-off
    _train_pair(local, served, 4, lambda loss, enc, x, y: loss(enc(x), y), exact=False)
    dict_local = pml_losses.MultipleLosses({"a": pml_losses.CircleLoss(), "b": pml_losses.SupConLoss()})
    dict_served = remote.MultipleLosses({"a": remote.CircleLoss(client=client), "b": remote.SupConLoss(client=client)})
    _train_pair(dict_local, dict_served, 2, lambda loss, enc, x, y: loss(enc(x), y), exact=False)


# ---- the client ----------------------------------------------------------------------------------------------

def test_default_client_comes_from_embtrain_target(monkeypatch: pytest.MonkeyPatch, module_server: Any) -> None:
    monkeypatch.setattr(_defaults, "_client", None)
    monkeypatch.setenv("EMBTRAIN_TARGET", module_server.target)
    loss = remote.ContrastiveLoss()
    emb, labels = _batch()
    expected = pml_losses.ContrastiveLoss()(emb, labels)
    _same(loss(emb, labels), expected)
    assert loss.client is _defaults.default_client()
    monkeypatch.delenv("EMBTRAIN_TARGET")
    monkeypatch.setattr(_defaults, "_client", None)
    assert _defaults.default_client() is not loss.client  # a fresh one, to 127.0.0.1:50051
    monkeypatch.setattr(_defaults, "_client", None)


def test_no_grad_and_eval_calls(client: embtrain.Client) -> None:
    local, served = _pair("ArcFaceLoss", client)
    emb, labels = _batch(seed=14)
    with torch.no_grad():
        value = served(emb, labels)
        expected = local(emb, labels)
    assert not value.requires_grad
    _same(value, expected)
    assert served.last_result is not None and not served.last_result.gradients


# ---- the wire, for other clients -----------------------------------------------------------------------------

def test_do_nothing_reducer_on_the_wire_is_the_sum_with_the_elements(client: embtrain.Client) -> None:
    """DoNothingReducer: PML returns its loss dictionary; the server answers with the sum of every element of every
    sub-loss (and its gradient) and the first sub-loss's elements as per_item_losses, in PML's order."""
    emb, labels = _batch(seed=15)
    for kwargs, wire in (({}, {}), ({"embedding_regularizer": pml_regularizers.LpRegularizer()},
                                    {"embedding_regularizer": "LpRegularizer"})):
        x = emb.clone().requires_grad_(True)
        parts = pml_losses.TripletMarginLoss(margin=0.2, reducer=pml_reducers.DoNothingReducer(), **kwargs)(x, labels)
        total = sum(info["losses"].sum() for info in parts.values())
        (grad,) = torch.autograd.grad(total, x)
        r = client.compute(emb, labels, loss="pml.TripletMarginLoss",
                           params={"margin": 0.2, "reducer": "DoNothingReducer", **wire})
        assert r.loss == float(total)
        _same(r.per_item_losses, parts["loss"]["losses"].detach())
        _same(r.gradient, grad)


@pytest.mark.parametrize(("inputs", "params", "field"), [
    ({"triplets": torch.tensor([[0, 1, 16]])}, {}, "inputs.triplets"),          # negative beyond the batch
    ({"triplets": torch.tensor([[0, 1]])}, {}, "inputs.triplets"),
    ({"indices_a1": torch.tensor([0]), "indices_p": torch.tensor([1])}, {}, "inputs.indices_a2"),
    ({"indices_a1": torch.tensor([0]), "indices_p": torch.tensor([1, 2]), "indices_a2": torch.tensor([0]),
      "indices_n": torch.tensor([5])}, {}, "inputs.indices_p"),
    ({"triplets": torch.tensor([[0, 1, 5]])}, {"miner": "pml.BatchHardMiner"}, "inputs.triplets"),
    ({"ref_labels": torch.arange(4)}, {}, "inputs.ref_labels"),
    ({"ref_emb": torch.zeros(3, DIM + 1)}, {}, "inputs.ref_emb"),
    ({"ref_emb": torch.ones(3, DIM), "ref_labels": torch.arange(4)}, {}, "inputs.ref_labels"),
])
def test_wire_inputs_are_checked(client: embtrain.Client, inputs: dict[str, torch.Tensor], params: dict[str, Any],
                                 field: str) -> None:
    emb, labels = _batch()
    with pytest.raises(embtrain.InvalidArgument) as err:
        client.compute(emb, labels, loss="pml.TripletMarginLoss", params=params, **inputs)
    assert err.value.fields == [field]


def test_inputs_a_loss_does_not_take_are_unknown(client: embtrain.Client) -> None:
    emb, labels = _batch()
    with pytest.raises(embtrain.InvalidArgument) as err:  # PML: "ref_emb is not supported for this loss function"
        client.compute(emb, labels, loss="pml.FastAPLoss", ref_emb=emb)
    assert err.value.fields == ["inputs.ref_emb"]
    with pytest.raises(embtrain.InvalidArgument) as err:  # PML: "indices_tuple is not supported ..."
        client.compute(emb, labels, loss="pml.PNPLoss", triplets=torch.zeros(1, 3, dtype=torch.int64))
    assert err.value.fields == ["inputs.triplets"]
    info = next(i for i in client.losses() if i.name == "pml.TripletMarginLoss")
    assert {"triplets", "indices_a1", "indices_p", "indices_a2", "indices_n", "ref_emb", "ref_labels"} <= \
        {s["name"] for s in info.inputs}


def test_session_weights_and_head_reference_sets(client: embtrain.Client) -> None:
    """A session holds its learnable weights (sending them is refused); a session head maps the embeddings but not a
    reference set, so ref_emb is refused there."""
    emb, labels = _batch()
    s = client.create_session("pml.CosFaceLoss", {"num_classes": N_CLASSES}, seed=3)
    try:
        assert math.isfinite(s.compute(emb, labels).loss)
        with pytest.raises(embtrain.InvalidArgument) as err:
            s.compute(emb, labels, W=torch.randn(DIM, N_CLASSES))
        assert err.value.fields == ["inputs.W"]
    finally:
        s.close()
    s = client.create_session("pml.ContrastiveLoss", head={"type": "linear", "out_dim": 4})
    try:
        with pytest.raises(embtrain.InvalidArgument) as err:
            s.compute(emb, labels, ref_emb=emb)
        assert err.value.fields == ["inputs.ref_emb"]
    finally:
        s.close()


def test_copies_share_the_client_and_keep_the_weights(client: embtrain.Client) -> None:
    import pickle

    _, served = _pair("SoftTripleLoss", client)
    twin = copy.deepcopy(served)
    assert twin.client is client and twin.fc is not served.fc
    _same(twin.fc.detach(), served.fc.detach())
    emb, labels = _batch(seed=16)
    _same(twin(emb, labels), served(emb, labels))
    loaded = pickle.loads(pickle.dumps(served))  # torch.save(module): without its connection
    assert loaded._client is None
    _same(loaded.fc.detach(), served.fc.detach())


def test_the_client_side_works_without_pml_installed() -> None:
    """A client without pytorch-metric-learning: the losses import and build (PML's init code, run here); PML's
    wrappers name what to install."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "pytorch_metric_learning" or name.startswith("pytorch_metric_learning."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, Block())
        from embtrain.pml import losses
        loss = losses.ProxyAnchorLoss(num_classes=3, embedding_size=5)
        assert loss.proxies.shape == (3, 5) and loss.wire_params == {"num_classes": 3, "embedding_size": 5}
        try:
            losses.CrossBatchMemory
        except ImportError as exc:
            assert "embtrain[pml]" in str(exc), exc
        else:
            raise AssertionError("CrossBatchMemory without PML")
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("OK")
