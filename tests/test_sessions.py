"""The server-held model (issue 4): session heads, optimisers and schedules, cross-batch memory, Embed,
ExportModel + ``load_head``, checkpoints (bitwise resume, corruption handling, atomic safetensors files) and the
session RPCs, all through a real server.

References are independent of the code under test: the loss is re-written here from LOSSES.md §E.1 (and checked
against the spec vector), heads are evaluated with ``torch.nn.functional``, optimisers and schedules are torch's
own, island updates come from the spec vectors, mined triplets from a brute-force search.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load as st_load

import embtrain
import embtrain.torch as et
from tests.conftest import ServerHandle, load_vector

# ---- independent references ---------------------------------------------------------------------------------


def contrastive_ref(z: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """LOSSES.md §E.1: mean over unordered pairs of ½||zi-zj||² (same label) or ½[margin - D]_+² (different)."""
    i, j = torch.triu_indices(len(z), len(z), 1)
    sq = (z[i] - z[j]).square().sum(1)
    dist = sq.clamp_min(1e-12).sqrt()
    per = torch.where(y[i] == y[j], 0.5 * sq, 0.5 * (margin - dist).clamp_min(0).square())
    return per.mean()


_ACT = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def head_ref(spec: Sequence[Mapping[str, Any]], w: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The head composition with functional ops; ``w`` maps the exported names (``nn.Sequential`` indices)."""
    idx = 0

    def linear(h: torch.Tensor) -> torch.Tensor:
        nonlocal idx
        out = F.linear(h, w[f"{idx}.weight"], w.get(f"{idx}.bias"))
        idx += 1
        return out

    h = x
    for item in spec:
        if item["type"] == "linear":
            h = linear(h)
        elif item["type"] == "mlp":
            for _ in item.get("hidden", []):
                h = linear(h)
                h = _ACT[item.get("activation", "relu")](h)
                idx += 1
            h = linear(h)
        elif item["type"] == "l2_normalize":
            h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
            idx += 1
    return h


def schedule_factor(cfg: Mapping[str, Any], t: int) -> float:
    """The issue's schedules: linear warmup over warmup_steps, then step decay or cosine (to min_lr_ratio)."""
    w = cfg.get("warmup_steps", 0)
    if t < w:
        return (t + 1) / w
    s = t - w
    if cfg.get("schedule") == "step":
        return cfg["gamma"] ** (s // cfg["step_size"])
    if cfg.get("schedule") == "cosine":
        total, floor = cfg["total_steps"], cfg.get("min_lr_ratio", 0.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    return 1.0


def batches(seed: int, count: int, n: int = 8, d: int = 5, classes: int = 4,
            dtype: type = np.float32) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(count):
        x = rng.standard_normal((n, d)).astype(dtype)
        y = np.repeat(np.arange(classes), n // classes)[:n].astype(np.int64)
        rng.shuffle(y)
        out.append((x, y, np.arange(b * n, (b + 1) * n, dtype=np.int64)))
    return out


def weights(session: embtrain.Session) -> dict[str, torch.Tensor]:
    return st_load(session.export_model().weights)


def assert_bitwise(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def crash(handle: ServerHandle) -> None:
    """Stop a server the hard way: no drain and no final checkpoints (what a killed process leaves behind)."""
    async def stop_now() -> None:
        if handle.running._periodic is not None:
            handle.running._periodic.cancel()
        await handle.running.server.stop(None)

    handle.run(stop_now())
    handle.running.scheduler.shutdown()
    handle.running.metrics.stop()
    handle.loop.call_soon_threadsafe(handle.loop.stop)
    handle.thread.join(timeout=10)


def checkpoint_file(state_dir: pathlib.Path, session_id: str) -> pathlib.Path:
    return state_dir / f"{session_id}.safetensors"


def read_checkpoint(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["record"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return record, tensors


def test_contrastive_reference_matches_spec_vector() -> None:
    vec = load_vector("e01_contrastive")
    x = torch.tensor(vec["inputs"]["embeddings"], dtype=torch.float64, requires_grad=True)
    loss = contrastive_ref(x, torch.tensor(vec["inputs"]["labels"]), vec["hyperparameters"].get("margin", 1.0))
    loss.backward()
    tol = vec["tolerance"]["float64"]
    np.testing.assert_allclose(loss.item(), vec["expected"]["loss"], **tol)
    np.testing.assert_allclose(x.grad.numpy(), vec["expected"]["grad_embeddings"], **tol)


# ---- heads: gradient through the head, parameter updates -----------------------------------------------------

HEADS = {
    "linear": [{"type": "linear", "out_dim": 4}],
    "mlp": [{"type": "mlp", "hidden": [7, 5], "activation": "gelu", "out_dim": 4}],
    "composed": [{"type": "linear", "out_dim": 6, "bias": False},
                 {"type": "mlp", "hidden": [5], "activation": "silu", "out_dim": 4}, "l2_normalize"],
}


@pytest.mark.parametrize("head", list(HEADS))
def test_gradient_through_head_matches_local_autograd(client: embtrain.Client, head: str) -> None:
    spec = HEADS[head]
    norm_spec = [{"type": s} if isinstance(s, str) else s for s in spec]
    lr = 0.1
    s = client.create_session("contrastive", {"margin": 2.0}, head=spec, optimizer={"type": "sgd", "lr": lr}, seed=11)
    (x, y, _), = batches(1, 1, n=8, d=5)
    s.embed(x[:1])  # fixes the width and builds the initial head without training
    w0 = {k: v.clone().requires_grad_(True) for k, v in weights(s).items()}

    r = s.compute(x, y)

    xt = torch.from_numpy(x).requires_grad_(True)
    ref = contrastive_ref(head_ref(norm_spec, w0, xt), torch.from_numpy(y), margin=2.0)
    grads = torch.autograd.grad(ref, [xt, *w0.values()])
    np.testing.assert_allclose(r.loss, ref.item(), rtol=1e-5)
    assert r.gradient.dtype == np.float32
    np.testing.assert_allclose(r.gradient, grads[0].numpy(), rtol=1e-4, atol=1e-6)
    # One plain SGD step on the head: w1 = w0 - lr * dloss/dw.
    w1 = weights(s)
    for (k, v), g in zip(w0.items(), grads[1:]):
        np.testing.assert_allclose(w1[k].numpy(), (v - lr * g).detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert r.step == 1


# Ends in l2_normalize: contrastive is translation-invariant, so without it the last bias would get a gradient of
# pure rounding noise, which Adam's normalisation blows up to full steps in arbitrary directions.
LOCAL_HEAD = [{"type": "linear", "out_dim": 6}, {"type": "mlp", "hidden": [5], "activation": "tanh", "out_dim": 4},
              {"type": "l2_normalize"}]
OPTIMIZERS: dict[str, tuple[dict[str, Any] | None, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]] = {
    "default_adam": (None, lambda p: torch.optim.Adam(p, lr=1e-3)),
    "sgd_nesterov_step": (
        {"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "schedule": "step",
         "step_size": 2, "gamma": 0.5},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam_warmup_cosine": (
        {"type": "adam", "lr": 0.02, "betas": [0.8, 0.99], "warmup_steps": 2, "schedule": "cosine",
         "total_steps": 3, "min_lr_ratio": 0.1},
        lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99))),
    "adamw_clip": (
        {"type": "adamw", "lr": 0.01, "weight_decay": 0.05, "clip_grad_norm": 0.05},
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_server_training_matches_local_torch_training(client: embtrain.Client, name: str) -> None:
    """k steps on the server equal k steps of the same head trained locally with torch's optimiser, a LambdaLR
    with the issue's schedule formula, and clip_grad_norm_."""
    cfg, make_opt = OPTIMIZERS[name]
    s = client.create_session("contrastive", {}, head=LOCAL_HEAD, optimizer=cfg, seed=5)
    data = batches(2, 6, n=8, d=5)
    s.embed(data[0][0][:1])
    local = {k: v.clone().requires_grad_(True) for k, v in weights(s).items()}
    opt = make_opt(list(local.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule_factor(cfg or {}, t))
    clip = (cfg or {}).get("clip_grad_norm", 0.0)
    clipped = False
    for t, (x, y, _) in enumerate(data):
        info = s.info()
        assert info.optimizer_state["type"] == (cfg or {"type": "adam"})["type"]
        np.testing.assert_allclose(info.optimizer_state["lr"], opt.param_groups[0]["lr"], rtol=1e-12)
        r = s.compute(x, y)
        loss = contrastive_ref(head_ref(LOCAL_HEAD, local, torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        if clip:
            clipped |= float(torch.nn.utils.clip_grad_norm_(list(local.values()), clip)) > clip
        opt.step()
        sched.step()
        np.testing.assert_allclose(r.loss, loss.item(), rtol=1e-4, err_msg=f"step {t}")
        server_w = weights(s)
        for k, v in local.items():
            np.testing.assert_allclose(server_w[k].numpy(), v.detach().numpy(), rtol=1e-4, atol=2e-6,
                                       err_msg=f"{k} after step {t}")
    if clip:
        assert clipped, "the clipping threshold was never reached; the test would not see clipping"
    assert s.info().step == len(data)


@pytest.mark.parametrize("schedule,reference", [
    ({"schedule": "step", "step_size": 3, "gamma": 0.5},
     lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)),
    ({"schedule": "cosine", "total_steps": 8, "min_lr_ratio": 0.25},
     lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.25)),
    ({"schedule": "constant", "warmup_steps": 4},
     lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=3)),
])
def test_lr_factor_matches_torch_schedulers(schedule: dict[str, Any], reference: Callable[..., Any]) -> None:
    from embtrain_server import optim

    spec = optim.parse_spec({"type": "sgd", "lr": 1.0, **schedule})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = reference(opt)
    for t in range(9):  # up to the end of the cosine (torch's CosineAnnealingLR turns back up after T_max)
        np.testing.assert_allclose(optim.lr_factor(spec, t), sched.get_last_lr()[0], rtol=1e-9, err_msg=f"t={t}")
        opt.step()
        sched.step()


# ---- island: centre updates --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d01_island_unordered_mean", "d02_island_paper_ordered_missing_class"])
def test_island_paper_rule_moves_centres_by_alpha_times_paper_delta(client: embtrain.Client, name: str) -> None:
    vec = load_vector(name)
    alpha = 0.3
    centers = np.asarray(vec["inputs"]["centers"], dtype=np.float64)
    s = client.create_session("island", {**vec["hyperparameters"], "center_update": "paper", "center_alpha": alpha},
                              initial_state={"initial_centers": centers}, seed=0)
    x = np.asarray(vec["inputs"]["embeddings"], dtype=np.float64)
    r = s.compute(x, np.asarray(vec["inputs"]["labels"], dtype=np.int64))
    tol = vec["tolerance"]["float64"]
    np.testing.assert_allclose(r.loss, vec["expected"]["loss"], **tol)  # the centres before the update
    np.testing.assert_allclose(r.gradient, vec["expected"]["grad_embeddings"], **tol)
    moved = s.export_model().state["centers"]
    np.testing.assert_allclose(moved, centers - alpha * np.asarray(vec["expected"]["paper_center_delta"]), **tol)


@pytest.mark.parametrize("optimizer", [None, {"type": "sgd", "lr": 0.2}], ids=["center_lr", "session_sgd"])
@pytest.mark.parametrize("name", ["d01_island_unordered_mean", "d02_island_paper_ordered_missing_class"])
def test_island_sgd_moves_centres_by_lr_times_grad(client: embtrain.Client, name: str,
                                                    optimizer: dict[str, Any] | None) -> None:
    """``center_update: sgd`` steps the centres once by 0.2 · ∂loss/∂C, whether island's own rule (center_lr) or
    the session optimiser does it (never both)."""
    vec = load_vector(name)
    centers = np.asarray(vec["inputs"]["centers"], dtype=np.float64)
    s = client.create_session("island", {**vec["hyperparameters"], "center_update": "sgd", "center_lr": 0.2},
                              optimizer=optimizer, initial_state={"initial_centers": centers}, seed=0)
    s.compute(np.asarray(vec["inputs"]["embeddings"]), np.asarray(vec["inputs"]["labels"], dtype=np.int64))
    moved = s.export_model().state["centers"]
    np.testing.assert_allclose(moved, centers - 0.2 * np.asarray(vec["expected"]["grad_centers"]),
                               **vec["tolerance"]["float64"])
    assert ("type" in s.info().optimizer_state) == (optimizer is not None)


# ---- cross-batch memory ------------------------------------------------------------------------------------


def batch_hard_ref(x: torch.Tensor, y: torch.Tensor, cand: torch.Tensor, cand_y: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """Brute-force batch-hard (LOSSES.md §B.2) with anchors from the batch and candidates batch + memory."""
    rows = []
    for a in range(len(x)):
        d = (cand - x[a]).square().sum(1).clamp_min(1e-12).sqrt()
        idx = torch.arange(len(cand))
        pos = (cand_y == y[a]) & (idx != a)
        neg = cand_y != y[a]
        if not pos.any() or not neg.any():
            continue
        p = int(torch.where(pos, d, -math.inf).argmax())
        n = int(torch.where(neg, d, math.inf).argmin())
        if d[p] - d[n] + margin > 0:
            rows.append((a, p, n))
    return torch.tensor(sorted(rows), dtype=torch.int64).reshape(-1, 3)


def test_memory_planted_hardest_negative_is_mined_and_named_by_id(client: embtrain.Client) -> None:
    e = np.eye(4)
    # Batch 1 goes to the memory. Row 104 (class 9) sits right next to where batch 2's class-0 rows will be.
    x1 = np.stack([20 * e[0], 20 * e[0] + 0.1, 20 * e[1], 20 * e[1] + 0.1, 0.6 * e[0] + 0.3 * e[1], 20 * e[2]])
    y1 = np.array([7, 7, 8, 8, 9, 9])
    ids1 = np.arange(100, 106)
    # Batch 2: class 0 near the origin, class 1 far away; inside the batch the hardest negative is ~10 away.
    x2 = np.stack([0 * e[0], e[0], e[1], 10 * e[3], 10 * e[3] + e[0], 10 * e[3] + e[1]])
    y2 = np.array([0, 0, 0, 1, 1, 1])
    ids2 = np.arange(200, 206)
    margin = 0.3

    s = client.create_session("batch_hard_triplet", {"margin": margin}, memory={"size": 64}, seed=0)
    s.compute(x1, y1, ids=ids1)
    r = s.compute(x2, y2, ids=ids2)

    cand = torch.from_numpy(np.concatenate([x2, x1]))
    expected = batch_hard_ref(torch.from_numpy(x2), torch.from_numpy(y2), cand,
                              torch.from_numpy(np.concatenate([y2, y1])), margin)
    np.testing.assert_array_equal(r.triplets, expected.numpy())
    np.testing.assert_array_equal(r.triplet_ids, np.concatenate([ids2, ids1])[expected.numpy()])
    class0 = r.triplet_ids[np.isin(r.triplet_ids[:, 0], ids2[:3])]
    assert len(class0) == 3 and (class0[:, 2] == 104).all()  # the planted memory row, by its id
    assert (r.triplets[np.isin(r.triplet_ids[:, 0], ids2[:3]), 2] >= len(x2)).all()  # a memory index
    assert s.info().memory_fill == 12

    # Without the memory the planted row is not there to be mined.
    plain = client.create_session("batch_hard_triplet", {"margin": margin}, seed=0)
    plain.compute(x1, y1, ids=ids1)
    r_plain = plain.compute(x2, y2, ids=ids2)
    assert 104 not in r_plain.triplet_ids


def test_memory_holds_exactly_the_last_size_rows(make_server: Callable[..., ServerHandle],
                                                tmp_path: pathlib.Path) -> None:
    h = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with h.client() as c:
        s = c.create_session("contrastive", {}, memory={"size": 5}, seed=0)
        data = batches(3, 3, n=3, d=4, classes=3, dtype=np.float64)
        fills = []
        for x, y, ids in data:
            s.compute(x, y, ids=ids)
            fills.append(s.info().memory_fill)
        assert fills == [3, 5, 5]
        s.save_checkpoint()
    record, tensors = read_checkpoint(checkpoint_file(tmp_path, s.id))
    ptr, fill = record["memory"]["ptr"], record["memory"]["fill"]
    assert fill == 5
    order = [(ptr + i) % 5 for i in range(5)]  # oldest first
    all_x = np.concatenate([b[0] for b in data])
    all_y = np.concatenate([b[1] for b in data])
    np.testing.assert_array_equal(tensors["memory.ids"][order].numpy(), np.arange(4, 9))
    np.testing.assert_array_equal(tensors["memory.labels"][order].numpy(), all_y[4:9])
    assert tensors["memory.embeddings"].dtype == torch.float64
    np.testing.assert_array_equal(tensors["memory.embeddings"][order].numpy(), all_x[4:9])


def test_memory_stores_head_outputs(make_server: Callable[..., ServerHandle], tmp_path: pathlib.Path) -> None:
    h = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with h.client() as c:
        s = c.create_session("multi_similarity", {}, head=[{"type": "linear", "out_dim": 3}],
                             optimizer={"type": "sgd", "lr": 0.5}, memory={"size": 16}, seed=0)
        (x, y, ids), = batches(4, 1, n=8, d=5)
        before = s.embed(x)  # the head the batch will see (eval mode; no dropout in this head)
        s.compute(x, y, ids=ids)
        assert not np.allclose(s.embed(x), before)  # the step moved the head
        s.save_checkpoint()
    _, tensors = read_checkpoint(checkpoint_file(tmp_path, s.id))
    np.testing.assert_allclose(tensors["memory.embeddings"][:8].numpy(), before, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(tensors["memory.ids"][:8].numpy(), ids)


def test_memory_bank_ring_buffer_order() -> None:
    from embtrain_server.memory import MemoryBank

    bank = MemoryBank(4, 2, torch.device("cpu"))
    rows = torch.arange(22, dtype=torch.float32).reshape(11, 2)
    labels, ids = torch.arange(11) % 3, torch.arange(11) + 1000
    for lo, hi in [(0, 3), (3, 5), (5, 11)]:  # the last batch is longer than the buffer
        bank.enqueue(rows[lo:hi], labels[lo:hi], ids[lo:hi])
        keep = slice(max(0, hi - 4), hi)
        view = bank.view()
        assert torch.equal(view.embeddings, rows[keep]) and torch.equal(view.ids, ids[keep])
        assert torch.equal(view.labels, labels[keep]) and bank.fill == min(4, hi)


def test_contrastive_with_memory_pairs_the_batch_with_the_last_rows(client: embtrain.Client) -> None:
    """Each batch's loss is §E.1 over its own pairs plus every (batch row, memory row) pair, the memory being the
    last ``size`` rows of the earlier batches; memory rows get no gradient."""
    s = client.create_session("contrastive", {"margin": 2.0}, memory={"size": 6}, seed=0)
    seen_x, seen_y = np.zeros((0, 3)), np.zeros((0,), np.int64)
    for x, y, ids in batches(15, 4, n=4, d=3, classes=2, dtype=np.float64):
        r = s.compute(x, y, ids=ids)
        mx, my = torch.from_numpy(seen_x[-6:]), torch.from_numpy(seen_y[-6:])
        xt, yt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(y)
        i, j = torch.triu_indices(4, 4, 1)
        a = torch.cat([xt[i], xt.repeat_interleave(len(mx), 0)])
        b = torch.cat([xt[j], mx.repeat(4, 1)])
        same = torch.cat([yt[i] == yt[j], yt.repeat_interleave(len(my)) == my.repeat(4)])
        sq = (a - b).square().sum(1)
        per = torch.where(same, 0.5 * sq, 0.5 * (2.0 - sq.clamp_min(1e-12).sqrt()).clamp_min(0).square())
        ref = per.mean()
        ref.backward()
        np.testing.assert_allclose(r.loss, ref.item(), rtol=1e-12)
        np.testing.assert_allclose(r.gradient, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
        seen_x, seen_y = np.concatenate([seen_x, x]), np.concatenate([seen_y, y])
    assert s.info().memory_fill == 6


@pytest.mark.parametrize("loss,params", [
    ("island", {"num_classes": 3}), ("weighted_margin_ranking", {}),
    pytest.param("pml.ContrastiveLoss", {}, marks=pytest.mark.skipif(
        importlib.util.find_spec("pytorch_metric_learning") is None,
        reason="needs the pml extra: pip install 'embtrain[pml]'"))])
def test_memory_refused_for_losses_that_do_not_use_it(client: embtrain.Client, loss: str,
                                                      params: dict[str, Any]) -> None:
    with pytest.raises(embtrain.InvalidArgument, match="config.memory.size: loss .* does not use"):
        client.create_session(loss, params, memory={"size": 8})


def test_initial_state_refused_for_stateless_losses(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument, match="config.initial_state.initial_centers"):
        client.create_session("contrastive", {}, initial_state={"initial_centers": np.zeros((2, 3))})


# ---- Embed and ExportModel -----------------------------------------------------------------------------------


def test_export_then_load_head_matches_embed(client: embtrain.Client) -> None:
    spec = [{"type": "linear", "out_dim": 6},
            {"type": "mlp", "hidden": [5, 4], "activation": "gelu", "dropout": 0.3, "out_dim": 3}, "l2_normalize"]
    s = client.create_session("contrastive", {}, head=spec, optimizer={"type": "adam", "lr": 0.05}, seed=2)
    for x, y, _ in batches(5, 3, n=8, d=5):
        s.compute(x, y)
    (x, _, _), = batches(6, 1, n=10, d=5)
    served = s.embed(x)
    model = s.export_model()
    assert model.config["in_dim"] == 5 and model.config["out_dim"] == 3 and model.step == 3
    head = et.load_head(model)
    assert not head.training
    with torch.no_grad():
        local = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served, local, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s.embed(x, batch_size=3), served, rtol=1e-6, atol=1e-6)  # in batches
    as_torch = s.embed(torch.from_numpy(x.astype(np.float64)))
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float64
    np.testing.assert_allclose(as_torch.numpy(), served, rtol=1e-6, atol=1e-7)
    assert s.info().step == 3  # Embed never trains


def test_identity_head_embed_and_export(client: embtrain.Client) -> None:
    vec = load_vector("d01_island_unordered_mean")
    centers = np.asarray(vec["inputs"]["centers"])
    s = client.create_session("island", {"center_update": "none"}, initial_state={"initial_centers": centers})
    x = np.asarray(vec["inputs"]["embeddings"], dtype=np.float32)
    np.testing.assert_array_equal(s.embed(x), x)
    model = s.export_model()
    assert st_load(model.weights) == {} and model.config["out_dim"] == 3
    np.testing.assert_array_equal(model.state["centers"], centers)
    assert len(et.load_head(model)) == 0


def test_embed_and_export_refusals(client: embtrain.Client) -> None:
    s = client.create_session("contrastive", {}, head=[{"type": "linear", "out_dim": 2}], seed=0)
    with pytest.raises(embtrain.EmbtrainError) as err:
        s.export_model()
    assert err.value.code.name == "FAILED_PRECONDITION"
    x = np.ones((3, 4), np.float32)
    s.embed(x)
    with pytest.raises(embtrain.InvalidArgument, match="embeddings: width 5, expected 4"):
        s.embed(np.ones((3, 5), np.float32))
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(embtrain.InvalidArgument, match="non-finite"):
        s.embed(bad)
    with pytest.raises(embtrain.InvalidArgument, match="float dtype"):
        s.embed(np.ones((3, 4), np.int64))
    with pytest.raises(embtrain.InvalidArgument, match="2 dimensions"):
        s.embed(np.ones((3, 4, 1), np.float32))
    assert s.info().step == 0


# ---- rejected requests change nothing ------------------------------------------------------------------------

MEM_SESSION = dict(head=[{"type": "mlp", "hidden": [6], "dropout": 0.25, "out_dim": 3}],
                   optimizer={"type": "adam", "lr": 0.01}, memory={"size": 20}, seed=9)


def _bad_requests(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> list[tuple[str, dict[str, Any]]]:
    nan = x.copy()
    nan[0, 0] = np.nan
    return [
        ("inputs.labels: length", dict(embeddings=x, labels=y[:-1], ids=ids)),
        ("non-finite", dict(embeddings=nan, labels=y, ids=ids)),
        ("width 6, expected 5", dict(embeddings=np.ones((8, 6), np.float32), labels=y)),
        ("inputs.ids: length", dict(embeddings=x, labels=y, ids=ids[:3])),
        ("inputs.labels", dict(embeddings=x, labels=y.astype(np.float32))),
        ("inputs.labels: required", dict(embeddings=x)),
        ("inputs.bogus", dict(embeddings=x, labels=y, bogus=y)),
    ]


def test_rejected_requests_leave_the_session_unchanged(client: embtrain.Client) -> None:
    data = batches(7, 3, n=8, d=5)
    s = client.create_session("contrastive", {}, **MEM_SESSION)
    ref = client.create_session("contrastive", {}, **MEM_SESSION)
    x, y, ids = data[0]
    s.compute(x, y, ids=ids)
    ref.compute(x, y, ids=ids)
    before, w_before = s.info(), weights(s)
    for match, kwargs in _bad_requests(*data[1]):
        emb = kwargs.pop("embeddings")
        with pytest.raises(embtrain.InvalidArgument, match=match):
            s.compute(emb, **kwargs)
        after = s.info()
        assert (after.step, after.memory_fill, after.optimizer_state) == \
            (before.step, before.memory_fill, before.optimizer_state), match
        assert_bitwise(weights(s), w_before)
    # The next good batches give bitwise what a session that never saw the bad ones gives.
    for x, y, ids in data[1:]:
        r, r_ref = s.compute(x, y, ids=ids), ref.compute(x, y, ids=ids)
        assert r.loss == r_ref.loss and np.array_equal(r.gradient, r_ref.gradient)
    assert_bitwise(weights(s), weights(ref))
    assert s.info().memory_fill == ref.info().memory_fill == 20


def test_rejected_first_batch_does_not_fix_the_width(client: embtrain.Client) -> None:
    s = client.create_session("island", {"num_classes": 3, "center_update": "sgd"},
                              head=[{"type": "linear", "out_dim": 2}], optimizer={"type": "sgd", "lr": 0.1}, seed=4)
    with pytest.raises(embtrain.InvalidArgument, match="label 5 outside"):
        s.compute(np.ones((4, 7), np.float32), np.array([0, 1, 2, 5]))  # rejected by island once it has centres
    info = s.info()
    assert info.step == 0 and info.parameter_count == 0
    r = s.compute(np.ones((4, 6), np.float32), np.array([0, 1, 2, 2]))
    assert r.step == 1 and s.info().parameter_count == 6 * 2 + 2 + 3 * 2
    with pytest.raises(embtrain.InvalidArgument, match="label 3 outside"):
        s.compute(np.ones((4, 6), np.float32), np.array([0, 1, 2, 3]))
    assert s.info().step == 1


# ---- checkpoints ---------------------------------------------------------------------------------------------

RESUME_CASES = {
    "mlp_dropout_adam_cosine_memory": ("contrastive", {"margin": 1.5}, dict(
        head=[{"type": "linear", "out_dim": 8}, {"type": "mlp", "hidden": [6], "dropout": 0.3, "out_dim": 4}],
        optimizer={"type": "adam", "lr": 0.01, "warmup_steps": 2, "schedule": "cosine", "total_steps": 5,
                   "clip_grad_norm": 1.0},
        memory={"size": 10}, seed=7)),
    "island_sgd_centres_momentum": ("island", {"num_classes": 4, "center_update": "sgd"}, dict(
        head=[{"type": "linear", "out_dim": 3}], optimizer={"type": "sgd", "lr": 0.05, "momentum": 0.9}, seed=3)),
}


@pytest.mark.parametrize("restart", ["crash_after_periodic_checkpoint", "graceful_stop"])
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_restart_is_bitwise_identical(client: embtrain.Client,
                                                   make_server: Callable[..., ServerHandle],
                                                   tmp_path: pathlib.Path, case: str, restart: str) -> None:
    loss, params, kwargs = RESUME_CASES[case]
    k = 3
    data = batches(8, 2 * k, n=8, d=5)

    uninterrupted = client.create_session(loss, params, **kwargs)
    ref = [uninterrupted.compute(x, y, ids=ids) for x, y, ids in data]

    crashing = restart.startswith("crash")
    first = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=k if crashing else 0)
    with first.client() as c:
        s = c.create_session(loss, params, **kwargs)
        for x, y, ids in data[:k]:
            s.compute(x, y, ids=ids)
        if crashing:  # one more step that no checkpoint records: the restart resumes at step k
            s.compute(*data[k][:2], ids=data[k][2])
    if crashing:
        crash(first)
    else:
        first.stop()

    second = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with second.client() as c:
        listed = {i.session_id: i for i in c.list_sessions()}
        assert listed[s.id].status == "ready" and listed[s.id].step == k and listed[s.id].last_checkpoint_step == k
        resumed = c.get_session(s.id)
        for t, (x, y, ids) in enumerate(data[k:], start=k):
            r = resumed.compute(x, y, ids=ids)
            assert r.step == ref[t].step == t + 1
            assert r.loss == ref[t].loss, f"step {t}"
            assert np.array_equal(r.gradient, ref[t].gradient), f"step {t}"
        assert_bitwise(weights(resumed), weights(uninterrupted))
        state, ref_state = resumed.export_model().state, uninterrupted.export_model().state
        assert state.keys() == ref_state.keys()
        for name in state:
            assert np.array_equal(state[name], ref_state[name]), name
        info, ref_info = resumed.info(), uninterrupted.info()
        assert (info.memory_fill, info.optimizer_state) == (ref_info.memory_fill, ref_info.optimizer_state)


@pytest.mark.parametrize("damage", ["truncated_tail", "truncated_header", "bit_flip", "not_safetensors"])
def test_corrupt_checkpoint_is_reported_and_others_load(make_server: Callable[..., ServerHandle],
                                                        tmp_path: pathlib.Path, damage: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    first = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=1)
    (x, y, _), = batches(9, 1)
    with first.client() as c:
        good = c.create_session("contrastive", {}, head=[{"type": "linear", "out_dim": 3}], seed=1)
        bad = c.create_session("contrastive", {}, head=[{"type": "linear", "out_dim": 3}], seed=2)
        good.compute(x, y)
        bad.compute(x, y)
        good_weights = weights(good)
    first.stop()

    path = checkpoint_file(tmp_path, bad.id)
    data = bytearray(path.read_bytes())
    if damage == "truncated_tail":
        data = data[:-7]
    elif damage == "truncated_header":
        data = data[:40]
    elif damage == "bit_flip":
        data[-3] ^= 0x10  # inside the last tensor's bytes: only the checksum can tell
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))

    caplog.set_level("ERROR", logger="embtrain.persistence")
    second = make_server(persist=True, state_dir=str(tmp_path))
    with second.client() as c:
        listed = {i.session_id: i for i in c.list_sessions()}
        assert listed[good.id].status == "ready" and listed[good.id].step == 1
        if damage in ("truncated_header", "not_safetensors"):
            # no owner can be read from the file: it is the operator's (log line and metric), listed to no one
            assert bad.id not in listed
            assert second.running.metrics.registry.get_sample_value("embtrain_unloaded_checkpoints") == 1
            with pytest.raises(embtrain.NotFound) as info:
                c.get_session(bad.id)
            assert "corrupt" not in info.value.message
        else:
            assert listed[bad.id].status == "corrupt"
            if damage == "bit_flip":
                assert "checksum mismatch" in listed[bad.id].status_message
            assert "moved aside" in listed[bad.id].status_message and str(tmp_path) not in listed[bad.id].status_message
            with pytest.raises(embtrain.NotFound, match="corrupt"):
                c.get_session(bad.id)
        resumed = c.get_session(good.id)
        assert_bitwise(weights(resumed), good_weights)
        assert resumed.compute(x, y).step == 2
    assert not path.exists() and (tmp_path / "corrupt" / path.name).exists()
    assert any(bad.id in rec.getMessage() and "corrupt" in rec.getMessage() for rec in caplog.records)


def test_checkpoint_is_safetensors_without_pickle(make_server: Callable[..., ServerHandle],
                                                  tmp_path: pathlib.Path) -> None:
    h = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with h.client() as c:
        s = c.create_session("contrastive", {}, **MEM_SESSION)
        for x, y, ids in batches(10, 2, n=8, d=5):
            s.compute(x, y, ids=ids)
        assert s.save_checkpoint() == 2
    raw = checkpoint_file(tmp_path, s.id).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + n + end  # nothing but the safetensors header and raw tensor bytes
    record, tensors = read_checkpoint(checkpoint_file(tmp_path, s.id))
    assert record["step"] == 2 and record["spec"]["seed"] == 9 and len(header["__metadata__"]["sha256"]) == 64
    assert {"rng.generator", "memory.embeddings", "memory.ids", "memory.labels"} <= tensors.keys()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in tensors)
    assert any(k.startswith("head.") for k in tensors)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary behind
    server_pkg = pathlib.Path(__import__("embtrain_server").__file__).parent
    for src in server_pkg.rglob("*.py"):
        text = src.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, src


def test_checkpoints_every_n_steps_and_every_t_seconds(make_server: Callable[..., ServerHandle],
                                                        tmp_path: pathlib.Path) -> None:
    import time

    data = batches(11, 4)
    by_steps = make_server(persist=True, state_dir=str(tmp_path / "a"), checkpoint_every_steps=3,
                           checkpoint_every_seconds=0)
    with by_steps.client() as c:
        s = c.create_session("contrastive", {}, head=[{"type": "linear", "out_dim": 3}], seed=0)
        assert s.info().last_checkpoint_step == 0  # written at creation
        seen = []
        for x, y, _ in data:
            s.compute(x, y)
            seen.append(s.info().last_checkpoint_step)
        assert seen == [0, 0, 3, 3]
    by_time = make_server(persist=True, state_dir=str(tmp_path / "b"), checkpoint_every_steps=0,
                          checkpoint_every_seconds=0.05)
    with by_time.client() as c:
        s = c.create_session("contrastive", {}, seed=0)
        created = s.info().last_checkpoint_time
        time.sleep(0.1)
        before = time.time()
        s.compute(*data[0][:2])
        after = time.time()
        info = s.info()
        # the step's own checkpoint: written after the batch arrived, not the one from creation
        assert info.last_checkpoint_step == 1 and before <= info.last_checkpoint_time <= after
        assert info.last_checkpoint_time > created
        assert read_checkpoint(checkpoint_file(tmp_path / "b", s.id))[0]["step"] == 1


def test_close_session_keep_checkpoint(make_server: Callable[..., ServerHandle], tmp_path: pathlib.Path) -> None:
    (x, y, _), = batches(12, 1)
    first = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with first.client() as c:
        dropped = c.create_session("contrastive", {}, seed=0)
        kept = c.create_session("contrastive", {}, head=[{"type": "linear", "out_dim": 3}], seed=0)
        for _ in range(2):
            dropped.compute(x, y)
            kept.compute(x, y)
        kept_weights = weights(kept)
        assert checkpoint_file(tmp_path, dropped.id).exists()
        info = dropped.close()
        assert info.step == 2 and not checkpoint_file(tmp_path, dropped.id).exists()
        info = kept.close(keep_checkpoint=True)
        assert info.step == 2 and info.last_checkpoint_step == 2 and checkpoint_file(tmp_path, kept.id).exists()
        for gone in (dropped, kept):
            with pytest.raises(embtrain.NotFound):
                gone.info()
        assert c.list_sessions() == []
    first.stop()  # the graceful stop's checkpoints must not bring the closed sessions back
    assert not checkpoint_file(tmp_path, dropped.id).exists()

    second = make_server(persist=True, state_dir=str(tmp_path))
    with second.client() as c:
        assert [i.session_id for i in c.list_sessions()] == [kept.id]
        restored = c.get_session(kept.id)
        assert restored.info().step == 2
        assert_bitwise(weights(restored), kept_weights)
        assert restored.compute(x, y).step == 3


def test_save_checkpoint_needs_a_state_dir(client: embtrain.Client) -> None:
    s = client.create_session("contrastive", {})
    with pytest.raises(embtrain.EmbtrainError) as err:
        s.save_checkpoint()
    assert err.value.code.name == "FAILED_PRECONDITION"


# ---- session info, seeds, configuration ----------------------------------------------------------------------


def test_get_session_reports_the_session(make_server: Callable[..., ServerHandle], tmp_path: pathlib.Path) -> None:
    h = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=2)
    head = [{"type": "linear", "out_dim": 3}, {"type": "mlp", "hidden": [4], "out_dim": 2, "bias": False}]
    with h.client() as c:
        s = c.create_session("island", {"num_classes": 4, "center_update": "sgd"}, head=head,
                             optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.5, "schedule": "step", "step_size": 2,
                                        "gamma": 0.5}, seed=1)
        info = s.info()
        assert (info.step, info.parameter_count, info.memory_fill, info.memory_size) == (0, 0, 0, 0)
        assert info.status == "ready" and info.device == "cpu" and info.loss == "island"
        assert info.config["seed"] == 1 and isinstance(info.config["seed"], int)
        assert info.config["head"][0] == {"type": "linear", "out_dim": 3, "bias": True}
        assert isinstance(info.config["head"][1]["hidden"][0], int)
        assert info.params == {"num_classes": 4, "center_update": "sgd"}
        for x, y, _ in batches(13, 3, n=8, d=5):
            s.compute(x, y)
        info = s.info()
        w = weights(s)
        assert info.parameter_count == sum(t.numel() for t in w.values()) + 4 * 2  # head + centres
        assert info.parameter_count == (5 * 3 + 3) + 3 * 4 + 4 * 2 + 4 * 2  # linear; mlp without biases; centres
        assert info.step == 3 and info.last_checkpoint_step == 2 and info.last_checkpoint_time > 0
        opt = info.optimizer_state
        assert opt["type"] == "sgd" and opt["schedule"] == "step"
        assert opt["lr"] == pytest.approx(0.1 * 0.5)  # the lr of the next update (t = 3)
        assert opt["parameters"] == info.parameter_count  # the session optimiser steps head and centres
        assert opt["state_tensors"] == len(w) + 1  # one momentum buffer per parameter
        assert s.save_checkpoint() == 3
        assert s.info().last_checkpoint_step == 3


def test_same_seed_same_session_other_seed_other_init(client: embtrain.Client) -> None:
    spec = dict(head=[{"type": "mlp", "hidden": [6], "dropout": 0.5, "out_dim": 3}], optimizer={"type": "adam",
                                                                                               "lr": 0.01})
    data = batches(14, 3, n=8, d=5)
    runs = []
    for seed in (21, 21, 22):
        s = client.create_session("contrastive", {}, seed=seed, **spec)
        runs.append(([s.compute(x, y).loss for x, y, _ in data], weights(s)))
    assert runs[0][0] == runs[1][0]
    assert_bitwise(runs[0][1], runs[1][1])
    assert runs[0][0][0] != runs[2][0][0]


@pytest.mark.parametrize("kwargs,field", [
    (dict(head=[{"type": "linear"}]), "config.head[0].out_dim"),
    (dict(head={"type": "conv"}), "config.head.type"),
    (dict(head=[{"type": "mlp", "out_dim": 3, "dropout": 1.5}]), "config.head[0].dropout"),
    (dict(optimizer={"type": "rmsprop"}), "config.optimizer.type"),
    (dict(optimizer={"type": "sgd", "betas": [0.9, 0.9]}), "config.optimizer.betas"),
    (dict(optimizer={"type": "adam", "schedule": "cosine", "total_steps": 0}), "config.optimizer.total_steps"),
    (dict(memory={"size": -1}), "config.memory.size"),
])
def test_create_session_rejects_bad_configuration(client: embtrain.Client, kwargs: dict[str, Any],
                                                  field: str) -> None:
    n_before = len(client.list_sessions())
    with pytest.raises(embtrain.InvalidArgument, match=field.replace("[", r"\[").replace("]", r"\]")):
        client.create_session("contrastive", {}, **kwargs)
    assert len(client.list_sessions()) == n_before


# ---- the same on a CUDA device --------------------------------------------------------------------------------

CUDA_CASES = {
    "batch_hard_mlp_dropout_sgd_memory": ("batch_hard_triplet", {"margin": 0.5}, dict(
        head=[{"type": "linear", "out_dim": 8}, {"type": "mlp", "hidden": [6], "dropout": 0.3, "out_dim": 4}],
        optimizer={"type": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "warmup_steps": 2,
                   "schedule": "cosine", "total_steps": 5},
        memory={"size": 12}, seed=7)),
    "contrastive_adam_memory": RESUME_CASES["mlp_dropout_adam_cosine_memory"],
    "island_sgd_centres": RESUME_CASES["island_sgd_centres_momentum"],
}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_session_on_cuda_resumes_and_matches_cpu(client: embtrain.Client, make_server: Callable[..., ServerHandle],
                                                 tmp_path: pathlib.Path, case: str) -> None:
    """A session computing on the GPU (head, optimiser state and memory on the device, dropout masks from the
    CPU generator) survives a restart as if uninterrupted, trains like the CPU one, and exports a head that
    matches its Embed. (Against the CPU only with SGD: Adam turns rounding-level gradients, such as a last bias
    that a distance-based loss cannot see, into full-size steps, so CPU and GPU Adam runs drift apart.)"""
    loss, params, kwargs = CUDA_CASES[case]
    k = 3
    data = batches(16, 2 * k, n=8, d=5)
    on_cpu = client.create_session(loss, params, **kwargs)
    cpu_results = [on_cpu.compute(x, y, ids=ids) for x, y, ids in data]

    first = make_server(device="cuda", persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    with first.client() as c:
        uninterrupted = c.create_session(loss, params, **kwargs)
        ref = [uninterrupted.compute(x, y, ids=ids) for x, y, ids in data]
        ref_weights, ref_info = weights(uninterrupted), uninterrupted.info()
        s = c.create_session(loss, params, **kwargs)
        for x, y, ids in data[:k]:
            s.compute(x, y, ids=ids)
    first.stop()
    second = make_server(device="cuda", persist=True, state_dir=str(tmp_path), checkpoint_every_steps=0)
    against_cpu = kwargs["optimizer"]["type"] == "sgd"
    with second.client() as c:
        resumed = c.get_session(s.id)
        info = resumed.info()
        assert info.step == k and info.device.startswith("cuda")
        for t, (x, y, ids) in enumerate(data[k:], start=k):
            r = resumed.compute(x, y, ids=ids)
            np.testing.assert_allclose(r.loss, ref[t].loss, rtol=1e-6, err_msg=f"step {t}")
            np.testing.assert_allclose(r.gradient, ref[t].gradient, rtol=1e-5, atol=1e-7)
            if against_cpu:
                np.testing.assert_allclose(r.loss, cpu_results[t].loss, rtol=1e-5, err_msg=f"step {t}")
                np.testing.assert_allclose(r.gradient, cpu_results[t].gradient, rtol=1e-4, atol=1e-6)
                if cpu_results[t].triplet_ids is not None:
                    np.testing.assert_array_equal(r.triplet_ids, cpu_results[t].triplet_ids)
        w = weights(resumed)
        for name in ref_weights:
            np.testing.assert_allclose(w[name].numpy(), ref_weights[name].numpy(), rtol=1e-5, atol=1e-7)
            if against_cpu:
                np.testing.assert_allclose(w[name].numpy(), weights(on_cpu)[name].numpy(), rtol=1e-4, atol=1e-6)
        assert resumed.info().memory_fill == ref_info.memory_fill == on_cpu.info().memory_fill
        x = data[0][0]
        with torch.no_grad():
            local = et.load_head(resumed.export_model())(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(resumed.embed(x), local, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [
    {"head": [{"type": "linear", "out_dim": 200_000}]},  # 64 x 200k parameters, with optimiser state
    {"memory": {"size": 2_000_000}},  # 2M rows of width 64
], ids=["head", "memory"])
def test_session_state_over_the_memory_budget_is_refused_before_allocation(
        make_server: Callable[..., ServerHandle], config: dict) -> None:
    h = make_server(memory_budget_bytes=64 * 2**20)
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    y = np.repeat(np.arange(4), 4)
    with h.client() as c:
        s = c.create_session("batch_hard_triplet", seed=0, **config)
        with pytest.raises(embtrain.ResourceExhausted) as info:
            s.compute(x, y)
        assert info.value.fields == ["config"] and "memory budget" in info.value.message
        after = s.info()
        assert after.step == 0 and after.parameter_count == 0 and after.memory_fill == 0
        small = c.create_session("batch_hard_triplet", seed=0, head=[{"type": "linear", "out_dim": 8}],
                                 memory={"size": 64})
        assert small.compute(x, y).step == 1


def test_a_fresh_server_process_restores_its_sessions(tmp_path: pathlib.Path) -> None:
    """Restoring on start must not depend on anything else having loaded the loss catalog first."""
    from embtrain_server import process

    args = ["--metrics-port", "0", "--device", "cpu", "--state-dir", str(tmp_path), "--log-level", "WARNING"]
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 4)
    with process.running(args) as (target, _), embtrain.Client(target) as c:
        s = c.create_session("batch_hard_triplet", head={"type": "linear", "out_dim": 4}, seed=1)
        s.compute(x, y)
        s.compute(x, y)
    with process.running(args) as (target, _), embtrain.Client(target) as c:
        listed = {i.session_id: i for i in c.list_sessions()}
        assert listed[s.id].status == "ready" and listed[s.id].step == 2
        assert c.get_session(s.id).compute(x, y).step == 3


# ---- defects found at the seams ------------------------------------------------------------------------------

def test_a_failed_periodic_checkpoint_does_not_fail_the_applied_step(
        make_server: Callable[..., ServerHandle], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk after a step: the step was applied, so the batch is answered with its result (a retry would
    train it twice); the failed write is counted, and the next due checkpoint is written once the disk recovers."""
    from embtrain_server import checkpoint

    h = make_server(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=1, checkpoint_every_seconds=0)
    errors = lambda: h.running.metrics.registry.get_sample_value(  # noqa: E731
        "embtrain_checkpoints_total", {"result": "error"})
    data = batches(21, 2)
    with h.client() as c:
        s = c.create_session("contrastive", {}, seed=0)
        write = checkpoint.write_atomic

        def disk_full(path: pathlib.Path, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint, "write_atomic", disk_full)
        before = errors()
        r = s.compute(*data[0][:2])
        assert r.step == 1 and math.isfinite(r.loss)
        assert errors() == before + 1
        info = s.info()
        assert info.step == 1 and info.last_checkpoint_step == 0  # applied, not yet saved
        monkeypatch.setattr(checkpoint, "write_atomic", write)
        assert s.compute(*data[1][:2]).step == 2
        assert s.info().last_checkpoint_step == 2
        assert read_checkpoint(checkpoint_file(tmp_path, s.id))[0]["step"] == 2


@pytest.mark.parametrize("params, centers, expected", [
    ({"num_classes": 3}, np.zeros((2, 4), np.float32), "[3, d]"),
    ({}, np.zeros((4,), np.float32), "[K, d]"),
    ({}, np.zeros((0, 4), np.float32), "[K, d]"),
])
def test_create_session_checks_the_initial_state(client: embtrain.Client, params: dict[str, Any],
                                                 centers: np.ndarray, expected: str) -> None:
    """An initial state that no batch could ever use is refused when the session is created (it used to be
    accepted, and every Compute then failed naming a field no request has)."""
    before = {i.session_id for i in client.list_sessions()}
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("island", params, initial_state={"initial_centers": centers})
    assert info.value.fields == ["config.initial_state.initial_centers"]
    assert expected in info.value.message and str(list(centers.shape)) in info.value.message
    assert {i.session_id for i in client.list_sessions()} == before  # nothing was created


def test_initial_centres_fix_the_width_and_a_wrong_batch_leaves_the_session_usable(client: embtrain.Client) -> None:
    centers = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    s = client.create_session("island", {"num_classes": 4}, initial_state={"initial_centers": centers}, seed=0)
    x, y, _ = batches(22, 1, d=5)[0]
    with pytest.raises(embtrain.InvalidArgument) as info:
        s.compute(np.zeros((8, 3), np.float32), y)
    assert info.value.fields == ["inputs.embeddings"] and "initial_centers" in info.value.message
    assert s.info().step == 0
    r = s.compute(x, y)
    assert r.step == 1
    # the session's first loss is computed from the given centres: compare with a stateless call that sends them
    ref = client.compute(x, y, loss="island", params={"num_classes": 4, "center_update": "none"}, centers=centers)
    assert r.loss == ref.loss


def test_pml_initial_state_of_the_wrong_shape_is_refused_at_creation(client: embtrain.Client) -> None:
    pytest.importorskip("pytorch_metric_learning", reason="needs the pml extra: pip install 'embtrain[pml]'")
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("pml.ArcFaceLoss", {"num_classes": 10},
                              initial_state={"W": np.zeros((8, 5), np.float32)})
    assert info.value.fields == ["config.initial_state.W"] and "[8, 10]" in info.value.message
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("pml.ArcFaceLoss", {"num_classes": 10},
                              initial_state={"W": np.zeros((8, 10), np.float32), "V": np.zeros((8, 10), np.float32)})
    assert info.value.fields == ["config.initial_state.V"] and "expected W" in info.value.message


def test_an_embed_without_rows_cannot_fix_a_new_sessions_width(client: embtrain.Client) -> None:
    """33 bytes used to build a session's state for a width of 2x10^8 and pin it."""
    s = client.create_session("contrastive", {}, head={"type": "linear", "out_dim": 3})
    with pytest.raises(embtrain.InvalidArgument) as info:
        s.embed(np.zeros((0, 5), np.float32))
    assert info.value.fields == ["embeddings"]
    with pytest.raises(embtrain.ResourceExhausted) as info:
        s.embed(np.zeros((0, 200_000_000), np.float32))
    assert info.value.fields == ["embeddings"]
    assert s.compute(np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32),
                     np.arange(6) % 2).step == 1  # the width is still free
    assert s.embed(np.zeros((0, 4), np.float32)).shape == (0, 3)  # once it is fixed, no rows is a fine question


def test_loss_state_is_within_the_memory_budget_before_it_is_built(make_server: Callable[..., ServerHandle]) -> None:
    """Loss state counts against the budget before it exists: island's centres for 2x10^7 classes in a session,
    and a stateless pml.ArcFaceLoss of 10^8 classes (whose weights used to be built while its parameters were
    parsed) are refused, and the server goes on."""
    h = make_server(memory_budget_bytes=256 * 2**20)
    x, y = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), np.arange(8) % 2
    with h.client() as c:
        s = c.create_session("island", {"num_classes": 20_000_000})
        with pytest.raises(embtrain.ResourceExhausted) as info:
            s.compute(x, y)
        assert info.value.fields == ["config"] and s.info().step == 0
        if importlib.util.find_spec("pytorch_metric_learning") is not None:
            with pytest.raises(embtrain.ResourceExhausted) as info:
                c.compute(x, y, loss="pml.ArcFaceLoss", params={"num_classes": 100_000_000})
            assert info.value.fields == ["params"]
            w = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)  # a stateless call sends W
            ok = c.compute(x, y, loss="pml.ArcFaceLoss", params={"num_classes": 4}, W=w)
            assert math.isfinite(ok.loss)
        assert c.health() == "SERVING"
