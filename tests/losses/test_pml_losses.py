"""The served ``pml.*`` losses against direct pytorch-metric-learning calls, the allow-list, and session state of
the learnable losses. Batches go through validation and the compute layer (``compute.run``) as the service computes
them; session training, ``update`` and memories use the loss's own methods. Skipped as a whole without the pml extra
(the missing-extra path is tested in ``test_pml_missing_extra.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from served import serve

from embtrain_server.compute import ComputeResult
from embtrain_server.errors import FailedPrecondition, InvalidArgument
from embtrain_server.losses import Loss, get, load_all, names
from embtrain_server.losses.base import ComputeContext, Memory

pml_losses = pytest.importorskip("pytorch_metric_learning.losses",
                                 reason="needs the pml extra: pip install 'embtrain[pml]'")
from pytorch_metric_learning import distances as pml_distances  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

load_all()

T = torch.float64
CTX = ComputeContext(device=torch.device("cpu"), max_triplets=1000)
N_CLASSES, PER_CLASS, DIM = 4, 3, 6
SEED = 1234

# The allow-list as this test expects it (written out, not read from the code under test), with the wire
# parameters each is tested with. Every PML argument not named here keeps its default on both sides.
CLASSIFIER = {"num_classes": N_CLASSES}
ALLOWED: dict[str, dict[str, Any]] = {
    "AngularLoss": {}, "ArcFaceLoss": CLASSIFIER, "CircleLoss": {}, "ContrastiveLoss": {},
    "CosFaceLoss": CLASSIFIER, "DynamicSoftMarginLoss": {}, "FastAPLoss": {}, "GeneralizedLiftedStructureLoss": {},
    "HistogramLoss": {"n_bins": 20}, "InstanceLoss": {}, "IntraPairVarianceLoss": {},
    "LargeMarginSoftmaxLoss": CLASSIFIER, "LiftedStructureLoss": {}, "MarginLoss": {}, "MultiSimilarityLoss": {},
    "NCALoss": {}, "NPairsLoss": {}, "NTXentLoss": {"temperature": 0.5}, "NormalizedSoftmaxLoss": CLASSIFIER,
    "P2SGradLoss": CLASSIFIER, "PNPLoss": {"variant": "Ds"}, "ProxyAnchorLoss": CLASSIFIER,
    "ProxyNCALoss": CLASSIFIER, "RankedListLoss": {"margin": 0.4, "Tn": 1.0},
    "SignalToNoiseRatioContrastiveLoss": {}, "SmoothAPLoss": {"temperature": 0.1},
    "SoftTripleLoss": CLASSIFIER | {"centers_per_class": 2}, "SphereFaceLoss": CLASSIFIER,
    "SubCenterArcFaceLoss": CLASSIFIER, "SupConLoss": {}, "ThresholdConsistentMarginLoss": {},
    "TripletMarginLoss": {"margin": 0.2}, "TupletMarginLoss": {},
}
LEARNABLE = {"ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss", "P2SGradLoss",
             "ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss", "SphereFaceLoss", "SubCenterArcFaceLoss"}
# PML's name for the embedding width where the served loss fills it in.
WIDTH_ARG = {n: "embedding_size" for n in LEARNABLE} | {"P2SGradLoss": "descriptors_dim"}


def _batch(seed: int = 0, n_classes: int = N_CLASSES, per_class: int = PER_CLASS, dim: int = DIM
           ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g, dtype=T)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return emb, labels


def _served(name: str, params: dict[str, Any], emb: torch.Tensor, labels: torch.Tensor, seed: int | None = None,
            max_triplets: int = 1000) -> tuple[Loss, ComputeResult, torch.Tensor]:
    """``pml.<name>`` on one batch through validation and ``compute.run``; with ``seed``, the learnable state is
    first drawn as a session would draw it. Returns (loss, result, gradient of the embeddings)."""
    loss = get(f"pml.{name}")(params)
    if seed is not None:
        loss.init_state(emb.shape[1], torch.device("cpu"), torch.Generator().manual_seed(seed), {})
    res = serve(loss, {"embeddings": emb, "labels": labels}, max_triplets=max_triplets, per_item=False)
    return loss, res, res.gradients["embeddings"]


def _reference(name: str, kwargs: dict[str, Any], emb: torch.Tensor, labels: torch.Tensor, seed: int,
               miner: Any = None) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    kwargs = dict(kwargs)
    if name in WIDTH_ARG:
        kwargs[WIDTH_ARG[name]] = emb.shape[1]
    torch.manual_seed(seed)
    module = getattr(pml_losses, name)(**kwargs)
    x = emb.detach().clone().requires_grad_(True)
    indices = miner(x, labels) if miner is not None else None
    value = module(x, labels, indices)
    (grad,) = torch.autograd.grad(value, x)
    return module, value, grad


def _close(a: torch.Tensor | float, b: torch.Tensor) -> None:
    a = torch.as_tensor(a, dtype=T)  # a result's loss is a float
    torch.testing.assert_close(a, b.to(a.device, T), rtol=1e-10, atol=1e-12)


# ---- the allow-list ---------------------------------------------------------------------------------------

def test_allow_list_is_exactly_served() -> None:
    assert {n for n in names() if n.startswith("pml.")} == {f"pml.{n}" for n in ALLOWED}


# What PML 2.9 accepts, written out (checked against PML itself in test_declared_inputs_follow_pml): losses
# that take labels=None with an indices_tuple, labels=None outright, no indices_tuple, and a reference set.
LABELS_OR_INDICES = {"CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss", "HistogramLoss",
                     "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NTXentLoss",
                     "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "ThresholdConsistentMarginLoss",
                     "TripletMarginLoss", "TupletMarginLoss"}
NO_LABELS = {"DynamicSoftMarginLoss"}
NO_INDICES = {"InstanceLoss", "P2SGradLoss", "PNPLoss", "RankedListLoss"}
WITH_REF = LABELS_OR_INDICES - {"HistogramLoss"} | {"AngularLoss", "DynamicSoftMarginLoss", "NCALoss"}
WEIGHTS = {n: "W" for n in LEARNABLE} | {"P2SGradLoss": "weight", "ProxyAnchorLoss": "proxies",
                                         "ProxyNCALoss": "proxies", "SoftTripleLoss": "fc", "MarginLoss": "beta"}
INDEX_INPUTS = ["triplets", "indices_a1", "indices_p", "indices_a2", "indices_n"]


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_declared_inputs_and_state(name: str) -> None:
    cls = get(f"pml.{name}")
    expected = ["embeddings", "labels"] + ([] if name in NO_INDICES else INDEX_INPUTS) + \
        (["ref_emb", "ref_labels"] if name in WITH_REF else []) + ([WEIGHTS[name]] if name in WEIGHTS else []) + \
        ["element_weights"]
    assert [s.name for s in cls.inputs] == expected
    specs = {s.name: s for s in cls.inputs}
    assert specs["labels"].required == (name not in LABELS_OR_INDICES | NO_LABELS)
    assert specs["embeddings"].required and all(not s.required for n, s in specs.items() if n not in
                                                ("embeddings", "labels"))
    assert {n for n, s in specs.items() if s.differentiable} == \
        {"embeddings"} | ({"ref_emb"} if name in WITH_REF else set()) | ({WEIGHTS[name]} if name in WEIGHTS else set())
    assert cls.family == "pml"
    assert cls.stateful == (name in LEARNABLE | {"MarginLoss", "DynamicSoftMarginLoss"})


def _pml_accepts(name: str, *args: Any, **kwargs: Any) -> bool:
    emb, labels = _batch(seed=1)
    kw = dict(ALLOWED[name])
    if name in WIDTH_ARG:
        kw[WIDTH_ARG[name]] = emb.shape[1]
    try:
        getattr(pml_losses, name)(**kw)(emb, *[labels if a == "labels" else a for a in args], **kwargs)
    except (ValueError, AttributeError) as exc:
        assert "not supported" in str(exc) or "required" in str(exc) or "cannot both be None" in str(exc) \
            or "NoneType" in str(exc), exc
        return False
    return True


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_declared_inputs_follow_pml(name: str) -> None:
    """The written-out sets above are what PML 2.9 itself accepts."""
    emb, labels = _batch(seed=1)
    triplets = pml_miners.TripletMarginMiner(margin=10.0)(emb, labels)
    assert _pml_accepts(name, None) == (name in NO_LABELS)
    assert _pml_accepts(name, None, triplets) == (name in LABELS_OR_INDICES | NO_LABELS)
    assert _pml_accepts(name, "labels", triplets) == (name not in NO_INDICES)
    assert _pml_accepts(name, "labels", ref_emb=emb[:6] * 1.0, ref_labels=labels[:6]) == (name in WITH_REF)


@pytest.mark.parametrize("wire", ["pml.BaseMetricLossFunction", "pml.CrossBatchMemory", "pml.MultipleLosses",
                                  "pml.SelfSupervisedLoss", "pml.GenericPairLoss", "pml.VICRegLoss",
                                  "pml.ManifoldLoss", "pml.__class__", "pml.losses", "pml.", "pml.BatchHardMiner"])
def test_names_outside_the_allow_list_are_unknown(wire: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(wire)
    assert "unknown loss" in err.value.message


# ---- correctness against direct PML calls -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_matches_direct_pml_call(name: str) -> None:
    emb, labels = _batch(seed=3)
    params = ALLOWED[name]
    seed = SEED if name in LEARNABLE else None
    _, out, grad = _served(name, params, emb, labels, seed=seed)
    _, ref, ref_grad = _reference(name, params, emb, labels, seed=SEED)
    assert isinstance(out.loss, float) and grad.dtype == T
    assert grad.abs().sum() > 0
    _close(out.loss, ref)
    _close(grad, ref_grad)


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_stateless_learnable_without_its_weights_is_refused(name: str) -> None:
    """Without a session the weights must travel with the request: never made-up (seeded) weights."""
    emb, labels = _batch(seed=4)
    with pytest.raises(InvalidArgument) as err:
        _served(name, ALLOWED[name], emb, labels)
    assert err.value.field == f"inputs.{WEIGHTS[name]}"
    assert "required" in err.value.message and "session" in err.value.message


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_stateless_learnable_with_its_weights_matches_pml(name: str) -> None:
    """The request's weights are used as they are, and their gradient comes back (P2SGrad renormalises them as
    PML does in its forward)."""
    emb, labels = _batch(seed=4)
    module, ref, ref_grad = _reference(name, ALLOWED[name], emb, labels, seed=11)
    key = WEIGHTS[name]
    sent = getattr(module, key).detach().clone()
    if name == "P2SGradLoss":
        torch.manual_seed(11)
        sent = getattr(getattr(pml_losses, name)(**ALLOWED[name], descriptors_dim=DIM), key).detach().clone()
    loss = get(f"pml.{name}")(ALLOWED[name])
    out = serve(loss, {"embeddings": emb, "labels": labels, key: sent}, per_item=False)
    _close(out.loss, ref)
    _close(out.gradients["embeddings"], ref_grad)
    # the weight gradient against PML's, from the same weights
    ref_module = _module_with(name, key, sent)
    value = ref_module(emb, labels)
    (wgrad,) = torch.autograd.grad(value, getattr(ref_module, key))
    # gradients come back in the input's dtype (P2SGrad turns its weight into the embeddings' dtype in PML)
    _close(out.gradients[key], wgrad.to(sent.dtype))
    assert out.gradients[key].shape == sent.shape and out.gradients[key].abs().sum() > 0


def _with_width(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, WIDTH_ARG[name]: DIM} if name in WIDTH_ARG else dict(kwargs)


def _module_with(name: str, key: str, weights: torch.Tensor) -> torch.nn.Module:
    module = getattr(pml_losses, name)(**_with_width(name, ALLOWED[name]))
    with torch.no_grad():
        getattr(module, key).data = weights.detach().clone()
    return module


def test_stateless_weights_are_checked() -> None:
    emb, labels = _batch(seed=4)
    loss = get("pml.ProxyAnchorLoss")(CLASSIFIER)
    with pytest.raises(InvalidArgument) as err:
        loss.check_inputs({"embeddings": emb, "labels": labels, "proxies": torch.zeros(N_CLASSES + 1, DIM)})
    assert err.value.field == "inputs.proxies" and "expected [4, 6]" in err.value.message
    held = get("pml.ProxyAnchorLoss")(CLASSIFIER)
    held.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(1), {})
    with pytest.raises(InvalidArgument) as err:
        held.check_inputs({"embeddings": emb, "labels": labels, "proxies": torch.zeros(N_CLASSES, DIM)})
    assert err.value.field == "inputs.proxies" and "session holds" in err.value.message
    with pytest.raises(InvalidArgument) as err:  # beta is a parameter only with learn_beta
        get("pml.MarginLoss")({}).check_inputs({"embeddings": emb, "labels": labels, "beta": torch.ones(1)})
    assert err.value.field == "inputs.beta" and "learn_beta" in err.value.message


CONFIGURED = [
    # (loss, wire params, PML kwargs built here, miner wire name, miner params, PML miner)
    ("TripletMarginLoss", {"margin": 0.3, "distance": "CosineSimilarity", "reducer": "AvgNonZeroReducer"},
     lambda: {"margin": 0.3, "distance": pml_distances.CosineSimilarity(),
              "reducer": pml_reducers.AvgNonZeroReducer()},
     "pml.TripletMarginMiner", {"margin": 0.3, "type_of_triplets": "semihard"},
     lambda: pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard")),
    ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 2.0, "distance": "LpDistance",
                         "distance_params": {"normalize_embeddings": False, "p": 1.0},
                         "reducer": "ThresholdReducer", "reducer_params": {"low": 0.05}},
     lambda: {"pos_margin": 0.1, "neg_margin": 2.0,
              "distance": pml_distances.LpDistance(normalize_embeddings=False, p=1.0),
              "reducer": pml_reducers.ThresholdReducer(low=0.05)},
     "pml.PairMarginMiner", {"pos_margin": 0.5, "neg_margin": 1.5, "distance": "LpDistance",
                             "distance_params": {"normalize_embeddings": False}},
     lambda: pml_miners.PairMarginMiner(pos_margin=0.5, neg_margin=1.5,
                                        distance=pml_distances.LpDistance(normalize_embeddings=False))),
    ("MultiSimilarityLoss", {}, lambda: {}, "pml.MultiSimilarityMiner", {"epsilon": 0.2},
     lambda: pml_miners.MultiSimilarityMiner(epsilon=0.2)),
    ("ArcFaceLoss", CLASSIFIER | {"margin": 20.0, "scale": 16.0}, lambda: CLASSIFIER | {"margin": 20.0, "scale": 16.0},
     "pml.BatchHardMiner", {}, lambda: pml_miners.BatchHardMiner()),
    ("CircleLoss", {"reducer": "SumReducer"}, lambda: {"reducer": pml_reducers.SumReducer()},
     "pml.BatchEasyHardMiner", {"pos_strategy": "hard", "neg_strategy": "hard"},
     lambda: pml_miners.BatchEasyHardMiner(pos_strategy="hard", neg_strategy="hard")),
    ("MarginLoss", {"learn_beta": True, "num_classes": N_CLASSES, "nu": 0.1},
     lambda: {"learn_beta": True, "num_classes": N_CLASSES, "nu": 0.1},
     "pml.AngularMiner", {"angle": 30.0}, lambda: pml_miners.AngularMiner(angle=30.0)),
    ("TripletMarginLoss", {"swap": True, "smooth_loss": True, "triplets_per_anchor": None}, lambda: {
        "swap": True, "smooth_loss": True}, "pml.DistanceWeightedMiner", {"cutoff": 0.5},
     lambda: pml_miners.DistanceWeightedMiner(cutoff=0.5)),
    ("NTXentLoss", {"temperature": 0.2}, lambda: {"temperature": 0.2}, "pml.UniformHistogramMiner",
     {"num_bins": 10, "pos_per_bin": 2, "neg_per_bin": 4},
     lambda: pml_miners.UniformHistogramMiner(num_bins=10, pos_per_bin=2, neg_per_bin=4)),
    ("LiftedStructureLoss", {}, lambda: {}, "pml.HDCMiner", {"filter_percentage": 0.6},
     lambda: pml_miners.HDCMiner(filter_percentage=0.6)),
]


@pytest.mark.parametrize(("name", "params", "kwargs", "miner", "miner_params", "ref_miner"), CONFIGURED,
                         ids=[f"{c[0]}+{c[3]}" for c in CONFIGURED])
def test_distance_reducer_and_miner_match_pml(name: str, params: dict[str, Any], kwargs: Any, miner: str,
                                              miner_params: dict[str, Any], ref_miner: Any) -> None:
    emb, labels = _batch(seed=8, per_class=4)
    wire = params | {"miner": miner, "miner_params": miner_params}
    learnable = name in LEARNABLE | {"MarginLoss"}
    # Random miners (DistanceWeighted, UniformHistogram) draw from the global generator: same state both sides.
    torch.manual_seed(77)
    _, out, grad = _served(name, wire, emb, labels, seed=SEED if learnable else None)

    ref_kwargs = dict(kwargs())
    if name in WIDTH_ARG:
        ref_kwargs[WIDTH_ARG[name]] = emb.shape[1]
    torch.manual_seed(SEED)  # the weights, as init_state draws them
    module = getattr(pml_losses, name)(**ref_kwargs)
    torch.manual_seed(77)
    x = emb.detach().clone().requires_grad_(True)
    mined = ref_miner()(x, labels)
    ref = module(x, labels, mined)
    (ref_grad,) = torch.autograd.grad(ref, x)

    _close(out.loss, ref)
    _close(grad, ref_grad)
    if len(mined) == 3:
        expected = torch.unique(torch.stack(mined, dim=1), dim=0)
        assert expected.shape[0] > 0
        assert torch.equal(out.triplets, expected)
        assert out.triplets_total == expected.shape[0]
    else:
        assert out.triplets is None
        assert out.stats["mined_pos_pairs"] == len(mined[0]) and out.stats["mined_neg_pairs"] == len(mined[2])


def test_triplets_are_capped_but_counted() -> None:
    emb, labels = _batch(seed=9, per_class=4)
    _, out, _ = _served("TripletMarginLoss", {"miner": "pml.TripletMarginMiner"}, emb, labels, max_triplets=5)
    mined = pml_miners.TripletMarginMiner()(emb, labels)
    expected = torch.unique(torch.stack(mined, dim=1), dim=0)
    assert expected.shape[0] > 5
    assert out.triplets_total == expected.shape[0]
    assert torch.equal(out.triplets, expected[:5])


def test_no_valid_pair_gives_zero_loss_and_gradient() -> None:
    emb, _ = _batch(seed=2)
    labels = torch.arange(emb.shape[0])  # every sample its own class: no triplet at all
    _, out, grad = _served("TripletMarginLoss", {"miner": "pml.BatchHardMiner"}, emb, labels)
    assert out.loss == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


# ---- learnable losses in a session ------------------------------------------------------------------------

def test_session_state_is_trained_and_round_trips() -> None:
    emb, labels = _batch(seed=5)
    loss = get("pml.ProxyAnchorLoss")(CLASSIFIER)
    loss.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(SEED), {})
    state = loss.state_tensors()
    assert list(state) == ["proxies"] and isinstance(state["proxies"], torch.nn.Parameter)

    torch.manual_seed(SEED)
    ref = pml_losses.ProxyAnchorLoss(num_classes=N_CLASSES, embedding_size=DIM)
    _close(state["proxies"], ref.proxies)
    ours_opt = torch.optim.SGD([state["proxies"]], lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):  # the session's loop: forward, gradient for the parameters, optimiser step
        e = emb + 0.1 * step
        out = loss.forward({"embeddings": e, "labels": labels}, CTX)
        ours_opt.zero_grad()
        out.loss.backward()
        ours_opt.step()
        ref_opt.zero_grad()
        ref(e, labels).backward()
        ref_opt.step()
    _close(state["proxies"], ref.proxies)

    restored = get("pml.ProxyAnchorLoss")(CLASSIFIER)
    restored.load_state_tensors({k: v.detach().clone() for k, v in loss.state_tensors().items()})
    a = loss.forward({"embeddings": emb, "labels": labels}, CTX).loss
    b = restored.forward({"embeddings": emb, "labels": labels}, CTX).loss
    _close(a, b)


def test_loaded_state_keeps_parameter_identity_and_takes_the_given_tensors() -> None:
    """The session moves state to its device by loading it back: the Parameter object must survive."""
    loss = get("pml.SoftTripleLoss")(CLASSIFIER | {"centers_per_class": 2})
    loss.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(3), {})
    param = loss.state_tensors()["fc"]
    new = torch.randn(DIM, N_CLASSES * 2, dtype=torch.float32)
    loss.load_state_tensors({"fc": new})
    assert loss.state_tensors()["fc"] is param
    assert torch.equal(param.detach(), new) and param.dtype == torch.float32
    with pytest.raises(InvalidArgument):
        loss.load_state_tensors({"fc": torch.zeros(DIM + 1, N_CLASSES * 2)})
    with pytest.raises(InvalidArgument):
        loss.load_state_tensors({"W": new})


def test_initial_state_is_used() -> None:
    w = torch.randn(DIM, N_CLASSES, dtype=T)
    loss = get("pml.NormalizedSoftmaxLoss")(CLASSIFIER)
    loss.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(3), {"W": w})
    assert torch.equal(loss.state_tensors()["W"].detach(), w)


def test_non_finite_pml_loss_is_invalid_argument() -> None:
    """NCALoss is NaN when no sample has a positive; the service answers INVALID_ARGUMENT, never NaN."""
    emb, _ = _batch()
    with pytest.raises(InvalidArgument) as err:
        _served("NCALoss", {}, emb, torch.arange(emb.shape[0]))
    assert err.value.message.startswith("pml.NCALoss:")


def test_embedding_size_defaults_to_the_batch_width_and_then_is_enforced() -> None:
    emb, labels = _batch(seed=6)
    loss = get("pml.ArcFaceLoss")(CLASSIFIER)
    loss.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(1), {})
    assert loss.state_tensors()["W"].shape == (DIM, N_CLASSES)
    with pytest.raises(InvalidArgument) as err:
        loss.check_inputs({"embeddings": emb[:, :4], "labels": labels})
    assert err.value.field == "inputs.embeddings"
    fixed = get("pml.ArcFaceLoss")(CLASSIFIER | {"embedding_size": 8})
    with pytest.raises(InvalidArgument):
        fixed.check_inputs({"embeddings": emb, "labels": labels})


def test_dynamic_soft_margin_histogram_is_committed_only_by_update() -> None:
    emb, labels = _batch(seed=7)
    loss = get("pml.DynamicSoftMarginLoss")({})
    loss.init_state(DIM, torch.device("cpu"), torch.Generator().manual_seed(1), {})
    before = loss.state_tensors()["hist_"].clone()
    out = loss.forward({"embeddings": emb, "labels": labels}, CTX)
    assert torch.equal(loss.state_tensors()["hist_"], before)  # forward leaves the state alone
    loss.update({"embeddings": emb, "labels": labels}, out,
                ComputeContext(device=torch.device("cpu"), max_triplets=10, training=False))
    assert torch.equal(loss.state_tensors()["hist_"], before)  # not while evaluating
    out = loss.forward({"embeddings": emb, "labels": labels}, CTX)
    loss.update({"embeddings": emb, "labels": labels}, out, CTX)

    ref = pml_losses.DynamicSoftMarginLoss()
    ref(emb, labels)
    _close(loss.state_tensors()["hist_"], ref.hist_.detach())
    assert not torch.equal(ref.hist_.detach(), before)


# ---- validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "params", "field"), [
    ("TripletMarginLoss", {"distance": "BatchedDistance"}, "params.distance"),
    ("TripletMarginLoss", {"distance": "__class__"}, "params.distance"),
    ("TripletMarginLoss", {"reducer": "ThresholdReducer"}, "params.reducer_params"),
    ("TripletMarginLoss", {"miner": "BatchHardMiner"}, "params.miner"),
    ("TripletMarginLoss", {"miner": "pml.EmbeddingsAlreadyPackagedAsTriplets"}, "params.miner"),
    ("TripletMarginLoss", {"distance": "LpDistance", "distance_params": {"is_inverted": True}},
     "params.distance_params.is_inverted"),
    ("TripletMarginLoss", {"distance_params": {"p": 1.0}}, "params.distance_params"),
    ("TripletMarginLoss", {"miner": "pml.TripletMarginMiner", "miner_params": {"type_of_triplets": "medium"}},
     "params.miner_params.type_of_triplets"),
    ("TripletMarginLoss", {"miner": "pml.BatchEasyHardMiner",
                           "miner_params": {"pos_strategy": "semihard", "neg_strategy": "semihard"}},
     "params.miner_params"),
    ("TripletMarginLoss", {"margn": 0.1}, "params.margn"),
    ("TripletMarginLoss", {"triplets_per_anchor": "some"}, "params.triplets_per_anchor"),
    ("TripletMarginLoss", {"triplets_per_anchor": 0}, "params.triplets_per_anchor"),
    ("TripletMarginLoss", {"reducer": "MultipleReducers", "reducer_params": {"reducers": {"loss": "x"}}},
     "params.reducer_params.reducers.loss"),
    ("TripletMarginLoss", {"reducer": "PerAnchorReducer", "reducer_params": {"reducer": "DoNothingReducer"}},
     "params.reducer_params.reducer"),
    ("TripletMarginLoss", {"reducer": "ClassWeightedReducer"}, "params.reducer_params.weights"),
    ("TripletMarginLoss", {"embedding_regularizer": "Nope"}, "params.embedding_regularizer"),
    ("TripletMarginLoss", {"embedding_regularizer_params": {"p": 1.0}}, "params.embedding_regularizer_params"),
    ("TripletMarginLoss", {"embedding_regularizer": "LpRegularizer",
                           "embedding_regularizer_params": {"q": 1.0}},
     "params.embedding_regularizer_params.q"),
    ("TripletMarginLoss", {"weight_regularizer": "LpRegularizer"}, "params.weight_regularizer"),
    ("ArcFaceLoss", CLASSIFIER | {"weight_regularizer": "SparseCentersRegularizer"},
     "params.weight_regularizer_params.num_classes"),
    ("ArcFaceLoss", {}, "params.num_classes"),
    ("ArcFaceLoss", CLASSIFIER | {"distance": "LpDistance"}, "params.distance"),
    ("PNPLoss", {"miner": "pml.BatchHardMiner"}, "params.miner"),
    ("PNPLoss", {"variant": "X"}, "params.variant"),
    ("RankedListLoss", {"margin": 0.4}, "params.Tn"),
    ("HistogramLoss", {"n_bins": 10, "delta": 0.5}, "params"),
])
def test_bad_parameters(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(f"pml.{name}")(params)
    assert err.value.field == field, err.value.message


def test_unknown_parameter_lists_valid_names() -> None:
    with pytest.raises(InvalidArgument) as err:
        get("pml.ContrastiveLoss")({"neg_margn": 1.0})
    for valid in ("pos_margin", "neg_margin", "distance", "reducer", "miner"):
        assert valid in err.value.message


@pytest.mark.parametrize(("name", "params", "labels", "field"), [
    ("ArcFaceLoss", CLASSIFIER, torch.tensor([0, 1, 2, 4] * 3), "inputs.labels"),
    ("ProxyAnchorLoss", CLASSIFIER, torch.tensor([0, 1, 2, -1] * 3), "inputs.labels"),
    ("SmoothAPLoss", {}, torch.tensor([0, 1, 2, 3] * 3), "inputs.labels"),
    ("SmoothAPLoss", {}, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]), "inputs.labels"),
    ("TripletMarginLoss", {}, torch.tensor([0, 1] * 5), "inputs.labels"),
])
def test_bad_inputs(name: str, params: dict[str, Any], labels: torch.Tensor, field: str) -> None:
    emb, _ = _batch()
    with pytest.raises(InvalidArgument) as err:
        get(f"pml.{name}")(params).check_inputs({"embeddings": emb, "labels": labels})
    assert err.value.field == field


def test_cross_batch_memory_is_refused() -> None:
    emb, labels = _batch()
    mem = Memory(embeddings=emb[:2], labels=labels[:2], ids=torch.full((2,), -1))
    ctx = ComputeContext(device=torch.device("cpu"), max_triplets=10, memory=mem)
    with pytest.raises(FailedPrecondition):
        get("pml.ContrastiveLoss")({}).forward({"embeddings": emb, "labels": labels}, ctx)
