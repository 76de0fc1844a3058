"""The same behaviour on a CUDA device: spec vectors through a server computing on the GPU, CUDA tensors through
RemoteLoss, and GPU/CPU agreement at service batch sizes. Skipped only where no CUDA device exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embtrain
from embtrain.torch import RemoteLoss
from tests.conftest import ServerHandle, load_vector, vector_names

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INT_INPUTS = {"labels", "triplets"}


@pytest.fixture(scope="module")
def gpu_server():  # type: ignore[no-untyped-def]
    from tests.conftest import base_config
    handle = ServerHandle(base_config(device="cuda"))
    yield handle
    handle.stop()


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", [n for n in vector_names() if not n.startswith(("e03", "x"))])
def test_vectors_on_cuda(gpu_server: ServerHandle, name: str, dtype: type) -> None:
    vec = load_vector(name)
    tol = vec["tolerance"]["float64" if dtype is np.float64 else "float32"]
    inputs = {k: np.asarray(v, dtype=np.int64 if k in INT_INPUTS else dtype) for k, v in vec["inputs"].items()}
    with gpu_server.client() as c:
        r = c.compute(loss=vec["loss"], params=vec["hyperparameters"], per_item_losses=True, **inputs)
    exp = vec["expected"]
    if isinstance(exp["loss"], list):
        np.testing.assert_allclose(r.per_item_losses, exp["loss"], **tol)
    else:
        np.testing.assert_allclose(r.loss, exp["loss"], **tol)
    np.testing.assert_allclose(r.gradient, np.asarray(exp["grad_embeddings"]).reshape(r.gradient.shape), **tol)
    mined = np.asarray(exp["mined_triplets"], dtype=np.int64).reshape(-1, 3)
    if r.triplets is not None:
        np.testing.assert_array_equal(r.triplets, mined)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_remote_loss_with_cuda_tensors(gpu_server: ServerHandle, dtype: torch.dtype) -> None:
    y = torch.arange(8).repeat_interleave(4).cuda()
    x = (torch.randn(32, 16, device="cuda") + y[:, None]).to(dtype).requires_grad_()
    with gpu_server.client() as c:
        loss = RemoteLoss(c, loss="batch_hard_triplet", margin=0.3)(x, y)
        loss.backward()
    assert loss.device.type == "cuda" and loss.dtype == dtype
    assert x.grad is not None and x.grad.device.type == "cuda" and x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("loss,params", [
    ("batch_hard_triplet", {}), ("batch_all_triplet", {}), ("triplet_margin", {"miner": "semihard"}),
    ("contrastive", {}), ("multi_similarity", {}),
])
def test_gpu_matches_cpu_at_service_sizes(gpu_server: ServerHandle, server: ServerHandle, loss: str,
                                          params: dict) -> None:
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(128), 8)
    x = g.standard_normal((1024, 64))
    with gpu_server.client(timeout=120) as gc, server.client(timeout=120) as cc:
        rg = gc.compute(x, y, loss=loss, params=params, max_triplets=10**6)
        rc = cc.compute(x, y, loss=loss, params=params, max_triplets=10**6)
    np.testing.assert_allclose(rg.loss, rc.loss, rtol=1e-9)
    np.testing.assert_allclose(rg.gradient, rc.gradient, rtol=1e-7, atol=1e-12)
    if rc.triplets is not None:
        np.testing.assert_array_equal(rg.triplets, rc.triplets)


def test_session_with_head_on_cuda(gpu_server: ServerHandle) -> None:
    with gpu_server.client() as c:
        s = c.create_session("batch_hard_triplet", head=[{"type": "linear", "out_dim": 8}], memory={"size": 64},
                             seed=0)
        y = np.repeat(np.arange(4), 4)
        for i in range(3):
            r = s.compute(np.random.default_rng(i).standard_normal((16, 12)).astype(np.float32), y)
        assert r.step == 3 and s.info().device.startswith("cuda")
        assert isinstance(s.embed(np.zeros((5, 12), np.float32)), np.ndarray)
        with pytest.raises(embtrain.InvalidArgument):
            s.compute(np.zeros((16, 11), np.float32), y)
