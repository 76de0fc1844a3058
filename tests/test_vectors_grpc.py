"""Every spec vector through the full gRPC path (client -> server -> client), in float64 within the vectors'
float64 tolerance and in float32 within their float32 tolerance; mined triplets exactly equal."""

from __future__ import annotations

import numpy as np
import pytest

import embtrain
from tests.conftest import load_vector, vector_names

INT_INPUTS = {"labels", "triplets"}
LOSS_VECTORS = [n for n in vector_names() if not n.startswith(("e03", "x"))]


def _inputs(vec: dict, dtype: type) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.int64 if k in INT_INPUTS else dtype) for k, v in vec["inputs"].items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", LOSS_VECTORS)
def test_vector_through_grpc(client: embtrain.Client, name: str, dtype: type) -> None:
    vec = load_vector(name)
    tol = vec["tolerance"]["float64" if dtype is np.float64 else "float32"]
    exp = vec["expected"]
    inputs = _inputs(vec, dtype)
    r = client.compute(loss=vec["loss"], params=vec["hyperparameters"], per_item_losses=True, **inputs)
    if isinstance(exp["loss"], list):  # reduction "none": per-triplet losses; the gradient is of their sum
        np.testing.assert_allclose(r.per_item_losses, exp["loss"], **tol)
    else:
        np.testing.assert_allclose(r.loss, exp["loss"], **tol)
    assert r.gradient.dtype == dtype
    np.testing.assert_allclose(r.gradient, np.asarray(exp["grad_embeddings"]).reshape(r.gradient.shape), **tol)
    if "grad_centers" in exp:
        np.testing.assert_allclose(r.gradients["centers"], exp["grad_centers"], **tol)
    mined = np.asarray(exp["mined_triplets"], dtype=np.int64).reshape(-1, 3)
    if r.triplets is None:
        assert mined.size == 0
    else:
        np.testing.assert_array_equal(r.triplets, mined)
        assert r.triplets_total == len(mined) and not r.triplets_truncated


@pytest.mark.parametrize("name", vector_names("x"))
def test_rejection_vectors(client: embtrain.Client, name: str) -> None:
    vec = load_vector(name)
    assert vec["expected"]["error"] == "INVALID_ARGUMENT"
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(loss=vec["loss"], params=vec["hyperparameters"], **_inputs(vec, np.float64))
    assert "inputs.embeddings" in info.value.message
    assert info.value.fields == ["inputs.embeddings"]
    assert client.health() == "SERVING"


def test_torch_pair_primitives_vector(client: embtrain.Client) -> None:
    """e03: the four torch pair primitives served as torch.* losses reproduce the vector to 1e-12."""
    vec = load_vector("e03_torch_pair_primitives")
    inp, hp, exp = vec["inputs"], vec["hyperparameters"], vec["expected"]["loss"]
    f = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
    mr = inp["margin_ranking"]
    r = client.compute(loss="torch.MarginRankingLoss", params={"margin": hp["margin_ranking_margin"]},
                       input1=f(mr["x1"]), input2=f(mr["x2"]), target=f(mr["y"]))
    np.testing.assert_allclose(r.loss, exp["margin_ranking"], rtol=1e-12, atol=1e-12)
    he = inp["hinge_embedding"]
    r = client.compute(loss="torch.HingeEmbeddingLoss", params={"margin": hp["hinge_margin"]},
                       input=f(he["x"]), target=f(he["y"]))
    np.testing.assert_allclose(r.loss, exp["hinge_embedding"], rtol=1e-12, atol=1e-12)
    ce = inp["cosine_embedding"]
    r = client.compute(loss="torch.CosineEmbeddingLoss", params={"margin": hp["cosine_margin"]},
                       input1=f(ce["x1"]), input2=f(ce["x2"]), target=f(ce["y"]))
    np.testing.assert_allclose(r.loss, exp["cosine_embedding"], rtol=1e-12, atol=1e-12)
    sm = inp["soft_margin"]
    r = client.compute(loss="torch.SoftMarginLoss", input=f(sm["x"]), target=f(sm["y"]))
    np.testing.assert_allclose(r.loss, exp["soft_margin"], rtol=1e-12, atol=1e-12)
