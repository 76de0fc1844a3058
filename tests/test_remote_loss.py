"""RemoteLoss: the server's gradient, applied by autograd, equals the same loss computed in-process by the compute
layer (so what is checked here is the wire and the autograd plumbing; the numbers themselves are checked against
independent references in tests/losses and test_compute.py), and a tiny encoder trained through it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import embtrain
from embtrain.torch import RemoteLoss
from embtrain_server import compute
from embtrain_server.losses import get, load_all
from embtrain_server.validation import validate_inputs

load_all()


def _data(seed: int = 0, p: int = 4, k: int = 4, d_in: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(p).repeat_interleave(k)
    x = torch.randn(p * k, d_in, generator=g) + 0.7 * torch.nn.functional.one_hot(y, d_in).float()
    return x, y


def _local_loss(name: str, params: dict, emb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss in-process, without the wire: validation and ``compute.run`` on the CPU, its value and
    gradient made into a differentiable scalar (value ``loss``, gradient ``g`` w.r.t. ``emb``) for autograd."""
    loss = get(name)(params)
    inputs = validate_inputs(type(loss), {"embeddings": emb.detach(), "labels": y}, max_batch_elements=1 << 30)
    loss.check_inputs(inputs)
    res = compute.run(loss, inputs, device=torch.device("cpu"), options=compute.ComputeOptions(max_triplets=1000))
    g = res.gradients["embeddings"]
    return torch.tensor(res.loss, dtype=emb.dtype) + (emb * g).sum() - (emb * g).sum().detach()


@pytest.mark.parametrize("name,params", [("batch_hard_triplet", {"margin": 0.5}), ("contrastive", {}),
                                         ("multi_similarity", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_local_autograd(client: embtrain.Client, name: str, params: dict, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    enc = torch.nn.Linear(10, 6).to(dtype)
    x, y = _data()
    x = x.to(dtype)
    remote = RemoteLoss(client, loss=name, **params)
    out = remote(enc(x), y)
    out.backward()
    remote_grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    local = _local_loss(name, params, enc(x), y)
    local.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert out.item() == pytest.approx(local.item(), rel=tol["rtol"])
    assert out.dtype == dtype
    for a, b in zip(remote_grads, (p.grad for p in enc.parameters())):
        torch.testing.assert_close(a, b, **tol)


def test_grad_output_scaling_and_composition(client: embtrain.Client) -> None:
    x, y = _data(1)
    emb = x.clone().requires_grad_()
    total = 3.0 * RemoteLoss(client, loss="batch_hard_triplet", margin=0.5)(emb, y) + emb.sum()
    total.backward()
    ref = x.clone().requires_grad_()
    (3.0 * _local_loss("batch_hard_triplet", {"margin": 0.5}, ref, y) + ref.sum()).backward()
    torch.testing.assert_close(emb.grad, ref.grad)


def test_no_grad_forward_skips_the_gradient(client: embtrain.Client) -> None:
    x, y = _data(2)
    remote = RemoteLoss(client, loss="batch_hard_triplet")
    with torch.no_grad():
        value = remote(x.requires_grad_(), y)
    assert not value.requires_grad and remote.last_result.gradient is None


def test_tiny_encoder_learns_through_remote_loss(client: embtrain.Client) -> None:
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(enc.parameters(), lr=0.01)
    remote = RemoteLoss(client, loss="batch_hard_triplet", margin=0.5)
    x, y = _data(3, p=4, k=6)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = remote(enc(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_remote_loss_on_a_session_trains_its_step(client: embtrain.Client) -> None:
    session = client.create_session("batch_hard_triplet", {"margin": 0.3})
    remote = RemoteLoss(session)
    x, y = _data(4)
    for _ in range(3):
        remote(x.clone().requires_grad_(), y).backward()
    assert remote.last_result.step == 3 == session.info().step
    session.close()


def test_numpy_inputs_give_numpy_results(client: embtrain.Client) -> None:
    x, y = _data(5)
    r = client.compute(x.numpy(), y.numpy(), loss="batch_hard_triplet")
    assert isinstance(r.gradient, np.ndarray) and not r.gradient.flags.writeable
