"""The served ``torch.*`` losses against direct calls of the torch classes, the spec's vectors (c01-c04, e03),
and the validation that turns bad requests into INVALID_ARGUMENT. Batches go through validation and the compute
layer (``compute.run``), as the service computes them."""

from __future__ import annotations

import inspect
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from served import serve

from embtrain_server.compute import ComputeResult
from embtrain_server.errors import InvalidArgument
from embtrain_server.losses import get, load_all, names
from embtrain_server.losses.base import ComputeContext

load_all()

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
T = torch.float64
CTX = ComputeContext(device=torch.device("cpu"), max_triplets=1000)

TORCH_LOSSES = [
    "L1Loss", "MSELoss", "CrossEntropyLoss", "CTCLoss", "NLLLoss", "PoissonNLLLoss", "GaussianNLLLoss", "KLDivLoss",
    "BCELoss", "BCEWithLogitsLoss", "MarginRankingLoss", "HingeEmbeddingLoss", "MultiLabelMarginLoss", "HuberLoss",
    "SmoothL1Loss", "SoftMarginLoss", "MultiLabelSoftMarginLoss", "CosineEmbeddingLoss", "MultiMarginLoss",
    "TripletMarginLoss", "TripletMarginWithDistanceLoss",
]

# The inputs we expect a gradient for (written out here, not read from the code under test).
DIFFERENTIABLE = {
    "L1Loss": {"input", "target"}, "MSELoss": {"input", "target"}, "CrossEntropyLoss": {"input"},
    "CTCLoss": {"log_probs"}, "NLLLoss": {"input"}, "PoissonNLLLoss": {"log_input", "target"},
    "GaussianNLLLoss": {"input", "target", "var"}, "KLDivLoss": {"input", "target"},
    "BCELoss": {"input", "target"}, "BCEWithLogitsLoss": {"input", "target"},
    "MarginRankingLoss": {"input1", "input2"}, "HingeEmbeddingLoss": {"input"}, "MultiLabelMarginLoss": {"input"},
    "HuberLoss": {"input", "target"}, "SmoothL1Loss": {"input", "target"}, "SoftMarginLoss": {"input"},
    "MultiLabelSoftMarginLoss": {"input", "target"}, "CosineEmbeddingLoss": {"input1", "input2"},
    "MultiMarginLoss": {"input"}, "TripletMarginLoss": {"anchor", "positive", "negative"},
    "TripletMarginWithDistanceLoss": {"anchor", "positive", "negative"},
}

# Forward arguments in torch's order (constructor tensors such as ``weight`` are not among them).
FORWARD = {n: list(inspect.signature(getattr(torch.nn, n).forward).parameters)[1:] for n in TORCH_LOSSES}


# ---- realistic random inputs, valid for each loss ---------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=T)


def _rand(g: torch.Generator, *shape: int, lo: float = 0.05, hi: float = 0.95) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=T)


def _classes(g: torch.Generator, n_classes: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, n_classes, shape, generator=g)


def _signs(g: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(T)


def _elementwise(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input": _randn(g, 6, 4), "target": _randn(g, 6, 4)}


def _ctc(g: torch.Generator, concatenated: bool = False) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([4, 2, 3])
    targets = torch.randint(1, 5, (3, 4), generator=g)
    if concatenated:
        targets = torch.cat([targets[i, :n] for i, n in enumerate(lengths.tolist())])
    return {"log_probs": _randn(g, 12, 3, 5).log_softmax(-1), "targets": targets,
            "input_lengths": torch.tensor([12, 10, 11]), "target_lengths": lengths}


# name -> list of (case id, inputs builder, params)
Builder = Callable[[torch.Generator], dict[str, torch.Tensor]]
CASES: dict[str, list[tuple[str, Builder, dict[str, Any]]]] = {
    "L1Loss": [("mean", _elementwise, {}), ("sum", _elementwise, {"reduction": "sum"}),
               ("none", _elementwise, {"reduction": "none"})],
    "MSELoss": [("mean", _elementwise, {}), ("none", _elementwise, {"reduction": "none"})],
    "CrossEntropyLoss": [
        ("mean", lambda g: {"input": _randn(g, 8, 5), "target": _classes(g, 5, 8)}, {}),
        ("weight_smoothing_sum", lambda g: {"input": _randn(g, 8, 5), "target": _classes(g, 5, 8),
                                            "weight": _rand(g, 5, lo=0.2, hi=2.0)},
         {"label_smoothing": 0.1, "reduction": "sum"}),
        ("ignore_index_weight", lambda g: {"input": _randn(g, 8, 5), "target": torch.tensor([0, 2, 1, 2, 4, 3, 2, 1]),
                                           "weight": _rand(g, 5, lo=0.2, hi=2.0)}, {"ignore_index": 2}),
        ("spatial_none", lambda g: {"input": _randn(g, 4, 5, 3), "target": _classes(g, 5, 4, 3)},
         {"reduction": "none"}),
        ("unbatched", lambda g: {"input": _randn(g, 5), "target": torch.tensor(3)}, {}),
    ],
    "CTCLoss": [("mean", _ctc, {}), ("sum_zero_infinity", _ctc, {"reduction": "sum", "zero_infinity": True}),
                ("concatenated_none", lambda g: _ctc(g, concatenated=True), {"reduction": "none"}),
                ("infeasible_zero_infinity", lambda g: _ctc(g) | {"input_lengths": torch.tensor([12, 1, 11])},
                 {"zero_infinity": True})],
    "NLLLoss": [
        ("mean", lambda g: {"input": _randn(g, 8, 5).log_softmax(1), "target": _classes(g, 5, 8)}, {}),
        ("weight_ignore_sum", lambda g: {"input": _randn(g, 8, 5).log_softmax(1),
                                         "target": torch.tensor([0, 1, 1, 3, 4, 3, 2, 1]),
                                         "weight": _rand(g, 5, lo=0.2, hi=2.0)},
         {"ignore_index": 1, "reduction": "sum"}),
    ],
    "PoissonNLLLoss": [
        ("log_input", lambda g: {"log_input": _randn(g, 6, 3), "target": torch.poisson(_rand(g, 6, 3, hi=4.0),
                                                                                        generator=g)}, {}),
        ("rate_full_none", lambda g: {"log_input": _rand(g, 6, 3, lo=0.2, hi=3.0),
                                      "target": torch.poisson(_rand(g, 6, 3, hi=4.0), generator=g) + 2.0},
         {"log_input": False, "full": True, "reduction": "none"}),
    ],
    "GaussianNLLLoss": [
        ("heteroscedastic", lambda g: {"input": _randn(g, 6, 3), "target": _randn(g, 6, 3),
                                       "var": _rand(g, 6, 3, lo=0.1, hi=2.0)}, {}),
        ("per_row_full_sum", lambda g: {"input": _randn(g, 6, 3), "target": _randn(g, 6, 3),
                                        "var": _rand(g, 6, lo=0.1, hi=2.0)}, {"full": True, "reduction": "sum"}),
        ("one_dim_shared_none", lambda g: {"input": _randn(g, 6, 3), "target": _randn(g, 6, 3),
                                           "var": _rand(g, 6, 1, lo=0.1, hi=2.0)}, {"reduction": "none", "eps": 1e-3}),
    ],
    "KLDivLoss": [
        ("batchmean", lambda g: {"input": _randn(g, 5, 4).log_softmax(1), "target": _randn(g, 5, 4).softmax(1)},
         {"reduction": "batchmean"}),
        ("log_target_sum", lambda g: {"input": _randn(g, 5, 4).log_softmax(1),
                                      "target": _randn(g, 5, 4).log_softmax(1)},
         {"log_target": True, "reduction": "sum"}),
    ],
    "BCELoss": [
        ("mean", lambda g: {"input": _rand(g, 6, 4), "target": _rand(g, 6, 4, lo=0.0, hi=1.0)}, {}),
        ("weight_none", lambda g: {"input": _rand(g, 6, 4), "target": _rand(g, 6, 4, lo=0.0, hi=1.0),
                                   "weight": _rand(g, 4, lo=0.2, hi=2.0)}, {"reduction": "none"}),
    ],
    "BCEWithLogitsLoss": [
        ("mean", lambda g: {"input": _randn(g, 6, 4), "target": _rand(g, 6, 4, lo=0.0, hi=1.0)}, {}),
        ("weight_pos_weight_sum", lambda g: {"input": _randn(g, 6, 4), "target": _rand(g, 6, 4, lo=0.0, hi=1.0),
                                             "weight": _rand(g, 6, 4, lo=0.2, hi=2.0),
                                             "pos_weight": _rand(g, 4, lo=0.5, hi=3.0)}, {"reduction": "sum"}),
    ],
    "MarginRankingLoss": [
        ("margin", lambda g: {"input1": _randn(g, 9), "input2": _randn(g, 9), "target": _signs(g, 9)},
         {"margin": 0.3}),
        ("default_none", lambda g: {"input1": _randn(g, 9), "input2": _randn(g, 9), "target": _signs(g, 9)},
         {"reduction": "none"}),
    ],
    "HingeEmbeddingLoss": [
        ("margin", lambda g: {"input": _rand(g, 9, hi=2.0), "target": _signs(g, 9)}, {"margin": 0.7}),
        ("sum", lambda g: {"input": _rand(g, 3, 3, hi=2.0), "target": _signs(g, 3, 3)}, {"reduction": "sum"}),
    ],
    "MultiLabelMarginLoss": [
        ("mean", lambda g: {"input": _randn(g, 3, 5),
                            "target": torch.tensor([[3, 0, -1, 1, 1], [1, 2, 4, -1, 0], [0, 1, 2, 3, 4]])}, {}),
        ("unbatched_none", lambda g: {"input": _randn(g, 5), "target": torch.tensor([2, -1, 0, 0, 0])},
         {"reduction": "none"}),
    ],
    "HuberLoss": [("delta", _elementwise, {"delta": 0.5}), ("default_sum", _elementwise, {"reduction": "sum"})],
    "SmoothL1Loss": [("beta", _elementwise, {"beta": 0.5}), ("l1_none", _elementwise, {"beta": 0.0,
                                                                                        "reduction": "none"})],
    "SoftMarginLoss": [("mean", lambda g: {"input": _randn(g, 9), "target": _signs(g, 9)}, {}),
                       ("2d_sum", lambda g: {"input": _randn(g, 3, 4), "target": _signs(g, 3, 4)},
                        {"reduction": "sum"})],
    "MultiLabelSoftMarginLoss": [
        ("mean", lambda g: {"input": _randn(g, 5, 4), "target": torch.randint(0, 2, (5, 4), generator=g).to(T)}, {}),
        ("weight_soft_none", lambda g: {"input": _randn(g, 5, 4), "target": _rand(g, 5, 4, lo=0.0, hi=1.0),
                                        "weight": _rand(g, 4, lo=0.2, hi=2.0)}, {"reduction": "none"}),
    ],
    "CosineEmbeddingLoss": [
        ("margin", lambda g: {"input1": _randn(g, 6, 3), "input2": _randn(g, 6, 3), "target": _signs(g, 6)},
         {"margin": 0.2}),
        ("unbatched", lambda g: {"input1": _randn(g, 3), "input2": _randn(g, 3), "target": torch.tensor(-1.0, dtype=T)},
         {"margin": -0.5}),
    ],
    "MultiMarginLoss": [
        ("mean", lambda g: {"input": _randn(g, 6, 5), "target": _classes(g, 5, 6)}, {}),
        ("p2_weight_sum", lambda g: {"input": _randn(g, 6, 5), "target": _classes(g, 5, 6),
                                     "weight": _rand(g, 5, lo=0.2, hi=2.0)},
         {"p": 2, "margin": 0.5, "reduction": "sum"}),
    ],
    "TripletMarginLoss": [
        ("default", lambda g: {"anchor": _randn(g, 7, 4), "positive": _randn(g, 7, 4), "negative": _randn(g, 7, 4)},
         {}),
        ("p1_swap_none", lambda g: {"anchor": _randn(g, 7, 4), "positive": _randn(g, 7, 4),
                                    "negative": _randn(g, 7, 4)},
         {"margin": 2.0, "p": 1.0, "swap": True, "reduction": "none"}),
    ],
    "TripletMarginWithDistanceLoss": [
        (kind, lambda g: {"anchor": _randn(g, 7, 4), "positive": _randn(g, 7, 4), "negative": _randn(g, 7, 4)},
         {"distance_function": kind, "margin": margin, "swap": swap, "reduction": red})
        for kind, margin, swap, red in [("pairwise_distance", 1.0, False, "mean"),
                                        ("squared_euclidean", 3.0, True, "sum"),
                                        ("cosine", 0.5, False, "none")]
    ],
}

# Independent of the code under test: the torch callables for the §C distance names.
REFERENCE_DISTANCES: dict[str, Any] = {
    "pairwise_distance": None,  # torch's own default
    "squared_euclidean": lambda a, b: torch.sum((a - b) ** 2, dim=-1),
    "cosine": lambda a, b: 1.0 - F.cosine_similarity(a, b),
}


def _reference(name: str, params: dict[str, Any], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = dict(params)
    if "distance_function" in kwargs:
        kwargs["distance_function"] = REFERENCE_DISTANCES[kwargs["distance_function"]]
    for tensor_arg in ("weight", "pos_weight"):
        if tensor_arg in inputs:
            kwargs[tensor_arg] = inputs[tensor_arg]
    module = getattr(torch.nn, name)(**kwargs)
    return module(*[inputs[a] for a in FORWARD[name]])


def _served(name: str, params: dict[str, Any], inputs: dict[str, torch.Tensor]
            ) -> tuple[ComputeResult, dict[str, torch.Tensor]]:
    """Call the served loss the way the server does (validation, then ``compute.run``); return the result and
    the gradients by input name."""
    res = serve(get(name)(params), {k: v.detach() for k, v in inputs.items()}, max_triplets=1000, per_item=True)
    return res, res.gradients


def _case_ids() -> list[Any]:
    return [pytest.param(n, builder, params, id=f"{n}-{cid}") for n in TORCH_LOSSES
            for cid, builder, params in CASES[n]]


# ---- correctness against torch ----------------------------------------------------------------------------

def test_every_torch_loss_is_served_and_has_cases() -> None:
    served = {n for n in names() if n.startswith("torch.")}
    assert served == {f"torch.{n}" for n in TORCH_LOSSES}
    assert set(CASES) == set(TORCH_LOSSES)


@pytest.mark.parametrize("name", TORCH_LOSSES)
def test_inputs_follow_torch_forward_and_differentiability(name: str) -> None:
    cls = get(f"torch.{name}")
    declared = [s.name for s in cls.inputs]
    assert declared[:len(FORWARD[name])] == FORWARD[name]
    assert set(declared[len(FORWARD[name]):]) <= {"weight", "pos_weight"}
    assert {s.name for s in cls.inputs if s.differentiable} == DIFFERENTIABLE[name]
    assert cls.family == "torch"


@pytest.mark.parametrize("name", TORCH_LOSSES)
def test_schema_mirrors_torch_constructor(name: str) -> None:
    cls = get(f"torch.{name}")
    sig = inspect.signature(getattr(torch.nn, name).__init__).parameters
    tensor_args = {s.name for s in cls.inputs} - set(FORWARD[name])
    assert set(cls.schema.names()) | tensor_args | {"size_average", "reduce"} >= set(sig) - {"self"}
    assert set(cls.schema.names()) <= set(sig)
    for p in cls.schema.params:
        if p.name == "distance_function":
            assert p.default == "pairwise_distance" and sig[p.name].default is None
        else:
            assert p.default == sig[p.name].default, p.name


@pytest.mark.parametrize(("name", "builder", "params"), _case_ids())
def test_matches_direct_torch_call(name: str, builder: Builder, params: dict[str, Any]) -> None:
    inputs = builder(_gen(zlib.crc32(name.encode())))
    out, grads = _served(f"torch.{name}", params, inputs)

    ref_inputs = {k: v.detach().clone().requires_grad_(k in DIFFERENTIABLE[name]) for k, v in inputs.items()}
    ref = _reference(name, params, ref_inputs)
    ref_loss = ref.sum() if params.get("reduction") == "none" else ref
    ref_grads = torch.autograd.grad(ref_loss, [ref_inputs[n] for n in grads])

    assert isinstance(out.loss, float)  # one scalar per batch
    torch.testing.assert_close(torch.tensor(out.loss, dtype=T), ref_loss, rtol=1e-12, atol=1e-12)
    assert set(grads) == DIFFERENTIABLE[name]
    for (n, g), rg in zip(grads.items(), ref_grads):
        assert g.abs().sum() > 0, f"gradient of {n} is identically zero: the case does not exercise it"
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12, msg=lambda m: f"grad {n}: {m}")
    if params.get("reduction") == "none":
        torch.testing.assert_close(out.per_item, ref.detach().flatten(), rtol=1e-12, atol=1e-12)


def test_loss_is_independent_of_weight_presence() -> None:
    """A weight that is all ones changes nothing (the optional input really reaches torch, and only there)."""
    g = _gen(5)
    inputs = {"input": _randn(g, 8, 5), "target": _classes(g, 5, 8)}
    plain, _ = _served("torch.CrossEntropyLoss", {}, inputs)
    ones, _ = _served("torch.CrossEntropyLoss", {}, inputs | {"weight": torch.ones(5, dtype=T)})
    skewed, _ = _served("torch.CrossEntropyLoss", {}, inputs | {"weight": torch.arange(1.0, 6.0, dtype=T)})
    torch.testing.assert_close(torch.tensor(plain.loss, dtype=T), torch.tensor(ones.loss, dtype=T))
    assert not torch.allclose(torch.tensor(plain.loss, dtype=T), torch.tensor(skewed.loss, dtype=T))


# ---- the spec's vectors -----------------------------------------------------------------------------------

def _vector(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{name}.json").read_text())


def test_e03_pair_primitives() -> None:
    v = _vector("e03_torch_pair_primitives")
    i, h, expected = v["inputs"], v["hyperparameters"], v["expected"]["loss"]
    t = lambda a: torch.tensor(a, dtype=T)  # noqa: E731
    cases = {
        "margin_ranking": ("torch.MarginRankingLoss", {"margin": h["margin_ranking_margin"]},
                           {"input1": t(i["margin_ranking"]["x1"]), "input2": t(i["margin_ranking"]["x2"]),
                            "target": t(i["margin_ranking"]["y"])}),
        "hinge_embedding": ("torch.HingeEmbeddingLoss", {"margin": h["hinge_margin"]},
                            {"input": t(i["hinge_embedding"]["x"]), "target": t(i["hinge_embedding"]["y"])}),
        "cosine_embedding": ("torch.CosineEmbeddingLoss", {"margin": h["cosine_margin"]},
                             {"input1": t(i["cosine_embedding"]["x1"]), "input2": t(i["cosine_embedding"]["x2"]),
                              "target": t(i["cosine_embedding"]["y"])}),
        "soft_margin": ("torch.SoftMarginLoss", {},
                        {"input": t(i["soft_margin"]["x"]), "target": t(i["soft_margin"]["y"])}),
    }
    assert set(cases) == set(expected)
    for key, (name, params, inputs) in cases.items():
        out, _ = _served(name, params, inputs)
        assert math.isclose(out.loss, expected[key], rel_tol=0, abs_tol=1e-12), key


@pytest.mark.parametrize("vector", ["c01_triplet_margin_given", "c02_triplet_margin_swap_sum",
                                    "c03_triplet_margin_p1_none", "c04_triplet_with_distance_cosine"])
def test_triplet_vectors_through_served_torch_losses(vector: str) -> None:
    """LOSSES.md §C: the torch classes agree with the reference on the given-triplet vectors. The client gathers
    the rows; the gradient w.r.t. the embeddings is the rows' gradients added back where they came from."""
    v = _vector(vector)
    h, tol = v["hyperparameters"], v["tolerance"]["float64"]
    emb = torch.tensor(v["inputs"]["embeddings"], dtype=T)
    trip = torch.tensor(v["inputs"]["triplets"])
    if h["distance_kind"] == "pairwise_distance":
        name, params = "torch.TripletMarginLoss", {"margin": h["margin"], "p": h["p"], "eps": h["eps"]}
    else:
        name, params = "torch.TripletMarginWithDistanceLoss", {"margin": h["margin"],
                                                               "distance_function": h["distance_kind"]}
    params |= {"swap": h["swap"], "reduction": h["reduction"]}
    roles = ("anchor", "positive", "negative")
    out, grads = _served(name, params, {role: emb[trip[:, k]] for k, role in enumerate(roles)})
    grad = torch.zeros_like(emb)
    for k, role in enumerate(roles):
        grad.index_add_(0, trip[:, k], grads[role])
    expected = v["expected"]
    if h["reduction"] == "none":
        torch.testing.assert_close(out.per_item, torch.tensor(expected["loss"], dtype=T), **tol)
    else:
        torch.testing.assert_close(torch.tensor(out.loss, dtype=T), torch.tensor(expected["loss"], dtype=T), **tol)
    torch.testing.assert_close(grad, torch.tensor(expected["grad_embeddings"], dtype=T), **tol)


# ---- validation -------------------------------------------------------------------------------------------

WITH_DEPRECATED = [n for n in TORCH_LOSSES
                   if n not in ("CTCLoss", "GaussianNLLLoss", "HuberLoss", "TripletMarginWithDistanceLoss")]


@pytest.mark.parametrize("name", WITH_DEPRECATED)
@pytest.mark.parametrize("arg", ["size_average", "reduce"])
def test_deprecated_arguments_point_to_reduction(name: str, arg: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(f"torch.{name}")({arg: False})
    assert err.value.field == f"params.{arg}"
    assert "deprecated" in err.value.message and "params.reduction" in err.value.message


def test_unknown_parameter_lists_the_valid_names() -> None:
    with pytest.raises(InvalidArgument) as err:
        get("torch.TripletMarginLoss")({"margn": 0.5})
    assert err.value.field == "params.margn"
    for valid in ("margin", "p", "eps", "swap", "reduction"):
        assert valid in err.value.message


@pytest.mark.parametrize(("name", "params", "field"), [
    ("torch.TripletMarginLoss", {"margin": 0.0}, "params.margin"),
    ("torch.TripletMarginWithDistanceLoss", {"margin": -1.0}, "params.margin"),
    ("torch.TripletMarginWithDistanceLoss", {"distance_function": "manhattan"}, "params.distance_function"),
    ("torch.L1Loss", {"reduction": "batchmean"}, "params.reduction"),
    ("torch.HuberLoss", {"delta": 0.0}, "params.delta"),
    ("torch.CrossEntropyLoss", {"label_smoothing": 1.5}, "params.label_smoothing"),
    ("torch.MultiMarginLoss", {"p": 3}, "params.p"),
    ("torch.CTCLoss", {"zero_infinity": 1}, "params.zero_infinity"),
])
def test_bad_parameters(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(name)(params)
    assert err.value.field == field


def _bad_inputs() -> list[Any]:
    g = _gen(7)
    ce = {"input": _randn(g, 4, 3), "target": torch.tensor([0, 1, 2, 1])}
    ctc = _ctc(g)
    cases = [
        ("torch.MSELoss", {}, {"input": _randn(g, 4, 3), "target": _randn(g, 4, 2)}, "inputs.target"),
        ("torch.MSELoss", {}, {"input": _randn(g, 4, 3)}, "inputs.target"),
        ("torch.L1Loss", {}, {"input": _randn(g, 0, 3), "target": _randn(g, 0, 3)}, "inputs.input"),
        ("torch.CrossEntropyLoss", {}, ce | {"target": torch.tensor([0, 1, 3, 1])}, "inputs.target"),
        ("torch.CrossEntropyLoss", {}, ce | {"target": torch.tensor([0, 1])}, "inputs.target"),
        ("torch.CrossEntropyLoss", {}, ce | {"weight": torch.ones(4, dtype=T)}, "inputs.weight"),
        ("torch.CrossEntropyLoss", {"ignore_index": 1}, ce | {"target": torch.tensor([1, 1, 1, 1])}, "inputs.target"),
        ("torch.NLLLoss", {}, ce | {"target": torch.tensor([0, -1, 2, 1])}, "inputs.target"),
        ("torch.MultiMarginLoss", {}, {"input": _randn(g, 2, 3, 3), "target": _classes(g, 3, 2, 3)}, "inputs.input"),
        ("torch.BCELoss", {}, {"input": _randn(g, 4), "target": _rand(g, 4)}, "inputs.input"),
        ("torch.BCEWithLogitsLoss", {}, {"input": _randn(g, 4, 3), "target": _rand(g, 4, 3),
                                         "pos_weight": torch.ones(2, dtype=T)}, "inputs.pos_weight"),
        ("torch.GaussianNLLLoss", {}, {"input": _randn(g, 4, 3), "target": _randn(g, 4, 3),
                                       "var": -_rand(g, 4, 3)}, "inputs.var"),
        ("torch.GaussianNLLLoss", {}, {"input": _randn(g, 4, 3), "target": _randn(g, 4, 3),
                                       "var": _rand(g, 3)}, "inputs.var"),
        ("torch.KLDivLoss", {}, {"input": _randn(g, 4, 3), "target": _randn(g, 4, 3) - 5.0}, "inputs.target"),
        ("torch.PoissonNLLLoss", {"log_input": False}, {"log_input": -_rand(g, 4), "target": _rand(g, 4)},
         "inputs.log_input"),
        ("torch.HingeEmbeddingLoss", {}, {"input": _rand(g, 4), "target": torch.zeros(4, dtype=T)}, "inputs.target"),
        ("torch.CosineEmbeddingLoss", {}, {"input1": _randn(g, 4, 3), "input2": _randn(g, 4, 3),
                                           "target": _signs(g, 3)}, "inputs.target"),
        ("torch.MultiLabelMarginLoss", {}, {"input": _randn(g, 2, 3), "target": torch.tensor([[0, 3, -1], [1, -1, 0]])},
         "inputs.target"),
        ("torch.TripletMarginLoss", {}, {"anchor": _randn(g, 4, 3), "positive": _randn(g, 4, 3),
                                         "negative": _randn(g, 5, 3)}, "inputs.negative"),
        ("torch.TripletMarginLoss", {}, {"anchor": _randn(g, 2, 4, 3), "positive": _randn(g, 2, 4, 3),
                                         "negative": _randn(g, 2, 4, 3)}, "inputs.anchor"),
        ("torch.CTCLoss", {"blank": 5}, ctc, "params.blank"),
        ("torch.CTCLoss", {}, ctc | {"input_lengths": torch.tensor([13, 10, 11])}, "inputs.input_lengths"),
        ("torch.CTCLoss", {}, ctc | {"target_lengths": torch.tensor([5, 2, 3])}, "inputs.target_lengths"),
        ("torch.CTCLoss", {}, ctc | {"targets": torch.tensor([[1, 2, 0, 3]] * 3)}, "inputs.targets"),
        ("torch.CTCLoss", {}, ctc | {"input_lengths": torch.tensor([12, 10])}, "inputs.input_lengths"),
        ("torch.CTCLoss", {}, ctc | {"input_lengths": torch.tensor([12, 1, 11])}, "inputs.input_lengths"),
        ("torch.CTCLoss", {}, ctc | {"targets": torch.tensor([[1, 1, 1, 1]] * 3),
                                     "input_lengths": torch.tensor([6, 10, 11])}, "inputs.input_lengths"),
        ("torch.CrossEntropyLoss", {}, ce | {"weight": torch.tensor([1.0, 1.0, 0.0], dtype=T),
                                             "target": torch.tensor([2, 2, 2, 2])}, "inputs.weight"),
        ("torch.PoissonNLLLoss", {"log_input": False, "eps": 0.0}, {"log_input": torch.tensor([1.0, 0.0], dtype=T),
                                                                    "target": _rand(g, 2)}, "inputs.log_input"),
        ("torch.GaussianNLLLoss", {"eps": 0.0}, {"input": _randn(g, 2), "target": _randn(g, 2),
                                                 "var": torch.tensor([1.0, 0.0], dtype=T)}, "inputs.var"),
    ]
    return [pytest.param(*c, id=f"{c[0]}-{c[3]}-{k}") for k, c in enumerate(cases)]


@pytest.mark.parametrize(("name", "params", "inputs", "field"), _bad_inputs())
def test_bad_inputs_name_the_field(name: str, params: dict[str, Any], inputs: dict[str, torch.Tensor],
                                   field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(name)(params).check_inputs(inputs)
    assert err.value.field == field
    assert err.value.message.startswith(field + ":")


def test_torch_errors_that_slip_through_become_invalid_argument() -> None:
    """forward is not guarded by check_inputs here: torch's own error must come back as INVALID_ARGUMENT."""
    loss = get("torch.MultiMarginLoss")({})
    with pytest.raises(InvalidArgument) as err:
        loss.forward({"input": _randn(_gen(1), 4, 3), "target": torch.tensor([0, 1, 7, 1])}, CTX)
    assert err.value.message.startswith("torch.MultiMarginLoss:")
