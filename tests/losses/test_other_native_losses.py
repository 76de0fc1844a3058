"""weighted_margin_ranking, island, contrastive and multi_similarity against the spec vectors (LOSSES.md §A, §D,
§E.1, §E.2), finite differences, and brute-force loops written here from the spec's formulas.

Batches go through validation and the compute layer (``compute.run``), as the service computes them; a loss's own
methods (island's session ``update``) and cross-batch memories, which ``compute.run`` does not take, are exercised
through the loss's ``forward``. Multi-similarity's mining is observed through what it returns: the kept-pair counts
and the loss and gradient, which depend on exactly which pairs were kept."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from served import serve

from embtrain_server.errors import InvalidArgument
from embtrain_server.losses import ComputeContext, Loss, LossOutput, Memory, get, load_all
from embtrain_server.losses import weighted_margin_ranking as wmr_module
from embtrain_server.losses.island import paper_center_delta

load_all()

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
VECTOR_NAMES = sorted(p.stem for p in VECTORS.glob("*.json") if p.stem[:1] in "ad" or p.stem[:3] in ("e01", "e02"))


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _vector(name: str) -> dict[str, Any]:
    return _decode(json.loads((VECTORS / f"{name}.json").read_text()))


def _ctx(device: str, max_triplets: int = 10_000, memory: Memory | None = None, training: bool = True,
         external: bool = False) -> ComputeContext:
    return ComputeContext(device=torch.device(device), max_triplets=max_triplets, want_per_item=True,
                          memory=memory, training=training, state_optimized_externally=external)


class Out(NamedTuple):
    """What the tests read of one computed batch (CPU tensors)."""

    loss: torch.Tensor  # 0-dim, in the dtype the batch was computed in
    triplets: torch.Tensor | None
    triplets_total: int
    per_item: torch.Tensor | None
    stats: dict[str, float]


def _forward(loss: Loss, inputs: dict[str, torch.Tensor], ctx: ComputeContext, dtype: torch.dtype = torch.float64
             ) -> tuple[LossOutput, dict[str, torch.Tensor]]:
    """The loss's own forward on the device, for what ``compute.run`` does not cover: a cross-batch memory, and
    the ``LossOutput`` and context that a session's ``update`` takes. Returns (output, {name: grad})."""
    loss.check_inputs(inputs)
    dev_inputs: dict[str, torch.Tensor] = {}
    for k, t in inputs.items():
        t = t.to(ctx.device)
        if t.is_floating_point():
            t = t.to(dtype)
            spec = loss.input_spec(k)
            if spec is not None and spec.differentiable:
                t = t.detach().requires_grad_(True)
        dev_inputs[k] = t
    out = loss.forward(dev_inputs, ctx)
    diff = [k for k, t in dev_inputs.items() if t.requires_grad]
    grads = dict(zip(diff, torch.autograd.grad(out.loss, [dev_inputs[k] for k in diff], allow_unused=True)))
    return out, {k: (torch.zeros_like(dev_inputs[k]) if g is None else g) for k, g in grads.items()}


def _run(loss_name: str, params: dict[str, Any], inputs: dict[str, torch.Tensor], *, device: str = "cpu",
         dtype: torch.dtype = torch.float64, max_triplets: int = 10_000, memory: Memory | None = None,
         loss: Loss | None = None) -> tuple[Out, dict[str, torch.Tensor], Loss]:
    """One batch as the service computes it: float inputs in ``dtype`` (what the client sends), validation, then
    ``compute.run`` on ``device``. With a memory (session state, not a ``compute.run`` argument) the loss's forward
    is called instead. Returns (output, {name: grad} on the CPU, the loss instance)."""
    loss = loss if loss is not None else get(loss_name)(params)
    if memory is not None:
        raw, grads = _forward(loss, inputs, _ctx(device, max_triplets=max_triplets, memory=memory), dtype)
        out = Out(raw.loss.detach(), raw.triplets, raw.triplets_total,
                  None if raw.per_item is None else raw.per_item.detach(), raw.stats)
        return out, grads, loss
    cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in inputs.items()}
    res = serve(loss, cast, device=device, max_triplets=max_triplets, per_item=True)
    out = Out(torch.tensor(res.loss, dtype=dtype), res.triplets, res.triplets_total, res.per_item, res.stats)
    return out, res.gradients, loss


def _close(actual: torch.Tensor, expected: Any, tol: dict[str, float]) -> None:
    exp = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), exp, rtol=tol["rtol"], atol=tol["atol"])


def _inputs_of(v: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, a in v["inputs"].items():
        t = torch.tensor(a, dtype=torch.int64 if k == "labels" else torch.float64)
        out[k] = t
    return out


# ---- spec vectors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_spec_vector(name: str, dtype: str, device: str) -> None:
    v = _vector(name)
    tol = v["tolerance"][dtype]
    exp = v["expected"]
    inputs = _inputs_of(v)
    out, grads, loss = _run(v["loss"], v["hyperparameters"], inputs, device=device, dtype=DTYPES[dtype])
    assert grads["embeddings"].dtype == DTYPES[dtype] and grads["embeddings"].device.type == "cpu"
    _close(out.loss, exp["loss"], tol)
    _close(grads["embeddings"], exp["grad_embeddings"], tol)
    if v["loss"] == "weighted_margin_ranking":
        assert out.triplets.cpu().tolist() == exp["mined_triplets"]
        assert out.triplets_total == len(exp["mined_triplets"])
        _close(out.per_item, exp["per_triplet_loss"], tol)  # one per used pair, in selected_triplets order
        assert out.stats["pairs"] == len(exp["selected_triplets"])
    else:
        assert out.triplets is None or out.triplets.numel() == 0
    if v["loss"] == "island":
        _close(grads["centers"], exp["grad_centers"], tol)
        assert out.stats["center_loss"] == pytest.approx(exp["center_loss"], rel=tol["rtol"], abs=tol["atol"])
        assert out.stats["island_term"] == pytest.approx(exp["island_term"], rel=tol["rtol"], abs=tol["atol"])
        x = inputs["embeddings"].to(device, DTYPES[dtype])
        c = inputs["centers"].to(device, DTYPES[dtype])
        delta = paper_center_delta(x, inputs["labels"].to(device), c, v["hyperparameters"]["lambda1"])
        _close(delta, exp["paper_center_delta"], tol)
    if v["loss"] == "multi_similarity":
        assert out.stats["kept_positive_pairs"] == len(exp["mined_pos_pairs"])
        assert out.stats["kept_negative_pairs"] == len(exp["mined_neg_pairs"])


def test_vectors_are_all_covered() -> None:
    # 7 (A) + 3 (D) + e01 + e02: a missing file would silently shrink the parametrisation above.
    assert len(VECTOR_NAMES) == 12


# ---- finite differences -------------------------------------------------------------------------------------

def _gradcheck(loss_name: str, params: dict[str, Any], inputs: dict[str, torch.Tensor],
               wrt: tuple[str, ...] = ("embeddings",), memory: Memory | None = None) -> None:
    loss = get(loss_name)(params)
    loss.check_inputs(inputs)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        full = dict(inputs) | dict(zip(wrt, tensors))
        return loss.forward(full, _ctx("cpu", memory=memory)).loss

    args = tuple(inputs[k].detach().clone().requires_grad_(True) for k in wrt)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def _random_gt_problem(seed: int, n: int = 9, d: int = 4, matrix: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    gt = torch.rand(n, n, generator=g, dtype=torch.float64) * 5 if matrix else \
        torch.rand(n - 1, generator=g, dtype=torch.float64) * 5
    return {"embeddings": x, "gt_distances": gt}


@pytest.mark.parametrize("matrix", [False, True])
@pytest.mark.parametrize("params", [
    {"margin": 0.3},
    {"margin": 0.3, "weighted": False, "reduction": "sum"},
    {"margin": 0.3, "min_dist": 1.0, "max_dist": 3.5, "pair_order": "index"},
])
def test_wmr_gradcheck(params: dict[str, Any], matrix: bool) -> None:
    _gradcheck("weighted_margin_ranking", params, _random_gt_problem(3, matrix=matrix))


def test_island_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    inputs = {"embeddings": torch.randn(7, 3, generator=g, dtype=torch.float64),
              "labels": torch.tensor([0, 1, 2, 3, 0, 1, 1]),
              "centers": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    for params in ({"lambda1": 0.5}, {"lambda1": 2.0, "pairs": "ordered", "center_reduction": "sum",
                                       "loss_weight": 0.3}):
        _gradcheck("island", params, inputs, wrt=("embeddings", "centers"))


def _labelled(seed: int, n: int = 10, d: int = 3, classes: int = 3, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(n, d, generator=g, dtype=torch.float64) * scale,
            "labels": torch.randint(0, classes, (n,), generator=g)}


def test_contrastive_gradcheck() -> None:
    _gradcheck("contrastive", {"margin": 1.2}, _labelled(7))


def test_multi_similarity_gradcheck() -> None:
    _gradcheck("multi_similarity", {"alpha": 2.0, "beta": 10.0, "epsilon": 0.5}, _labelled(8, d=4))


# ---- weighted_margin_ranking: matrix form ------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"margin": 0.4},
    {"margin": 0.4, "weighted": False, "reduction": "sum"},
    {"margin": 0.4, "min_dist": 1.0, "max_dist": 3.0},
    {"margin": 0.4, "min_dist": 1.0, "max_dist": 3.0, "pair_order": "index"},
    {"margin": 0.4, "max_dist": 0.5},  # most anchors all-far
])
def test_wmr_matrix_equals_mean_of_row_runs(params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    problem = _random_gt_problem(11, n=n, matrix=True)
    x, gt = problem["embeddings"], problem["gt_distances"]
    gt[2] = gt[2, 1]  # an anchor whose samples are all tied: no pairs, must not count in the mean
    ref_loss, ref_grad, ref_triplets, used = 0.0, torch.zeros_like(x), [], 0
    for i in range(n):
        order = [i] + [j for j in range(n) if j != i]  # the anchor first, the others in index order
        out, grads, _ = _run("weighted_margin_ranking", params,
                             {"embeddings": x[order], "gt_distances": gt[i, order[1:]]})
        if out.stats["pairs"] == 0:
            continue
        used += 1
        ref_loss += float(out.loss.detach())
        ref_grad[order] += grads["embeddings"]
        ref_triplets += [[order[a], order[r], order[c]] for a, r, c in out.triplets.tolist()]
    # The tied anchor has pairs only under the literal index rule.
    assert used == (n if params.get("pair_order") == "index" else n - 1)
    ref_triplets.sort()

    # A block of one anchor exercises the blockwise path against the row-by-row reference.
    monkeypatch.setattr(wmr_module, "_BLOCK_ELEMENTS", 1)
    out, grads, _ = _run("weighted_margin_ranking", params, problem)
    assert float(out.loss.detach()) == pytest.approx(ref_loss / used, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grads["embeddings"], ref_grad / used, rtol=1e-10, atol=1e-13)
    assert out.triplets.tolist() == ref_triplets
    assert out.triplets_total == len(ref_triplets)
    assert out.stats["anchors_with_pairs"] == used

    capped, _, _ = _run("weighted_margin_ranking", params, problem, max_triplets=5)
    assert capped.triplets.tolist() == ref_triplets[:5]
    assert capped.triplets_total == len(ref_triplets)


@pytest.mark.parametrize("name", ["a01_wmr_weighted_basic", "a03_wmr_clamp_dontcare", "a05_wmr_all_far",
                                  "a07_wmr_index_order_compat"])
def test_wmr_vector_split_by_rows(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget below one anchor's n x n pairs splits its rows r into chunks of 2: same results as the vector.
    monkeypatch.setattr(wmr_module, "_BLOCK_ELEMENTS", 2 * len(_vector(name)["inputs"]["embeddings"]))
    v = _vector(name)
    out, grads, _ = _run(v["loss"], v["hyperparameters"], _inputs_of(v), max_triplets=3)
    tol = v["tolerance"]["float64"]
    _close(out.loss, v["expected"]["loss"], tol)
    _close(grads["embeddings"], v["expected"]["grad_embeddings"], tol)
    _close(out.per_item, v["expected"]["per_triplet_loss"], tol)
    assert out.triplets.tolist() == v["expected"]["mined_triplets"][:3]
    assert out.triplets_total == len(v["expected"]["mined_triplets"])


def test_wmr_no_pairs_is_zero_not_nan() -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    for gt in (torch.full((4,), 2.0), torch.full((5, 5), 2.0), torch.tensor([0.1, 0.2, 0.3, 0.4])):
        params = {"min_dist": 1.0} if gt.dim() == 1 and gt[0] < 1 else {}
        out, grads, _ = _run("weighted_margin_ranking", params, {"embeddings": x, "gt_distances": gt})
        assert float(out.loss.detach()) == 0.0 and not grads["embeddings"].any()
        assert out.triplets.shape == (0, 3) and out.triplets_total == 0


@pytest.mark.parametrize("gt, field_text", [
    (torch.tensor([1.0, 2.0]), "length 2, expected 3"),
    (torch.tensor([1.0, -0.5, 2.0]), ">= 0"),
    (torch.tensor([1.0, math.nan, 2.0]), "finite"),
    (torch.tensor([1.0, math.inf, 2.0]), "finite"),
    (torch.ones(4, 3), "shape [4, 3]"),
    (torch.ones(2, 2, 1), "3-D"),
])
def test_wmr_rejects_bad_gt(gt: torch.Tensor, field_text: str) -> None:
    loss = get("weighted_margin_ranking")({})
    with pytest.raises(InvalidArgument) as err:
        loss.check_inputs({"embeddings": torch.zeros(4, 2), "gt_distances": gt})
    assert err.value.field == "inputs.gt_distances" and field_text in err.value.message


def test_wmr_matrix_diagonal_is_ignored() -> None:
    gt = torch.rand(4, 4, dtype=torch.float64)
    gt.fill_diagonal_(math.nan)
    get("weighted_margin_ranking")({}).check_inputs({"embeddings": torch.zeros(4, 2), "gt_distances": gt})


@pytest.mark.parametrize("params, field", [
    ({"min_dist": 2.0, "max_dist": 2.0}, "params.max_dist"),
    ({"margin": -0.1}, "params.margin"),
    ({"pair_order": "lua"}, "params.pair_order"),
    ({"reduction": "none"}, "params.reduction"),
])
def test_wmr_rejects_bad_params(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get("weighted_margin_ranking")(params)
    assert err.value.field == field


def test_wmr_accepts_infinite_max_dist() -> None:
    assert get("weighted_margin_ranking")({"max_dist": math.inf}).params["max_dist"] == math.inf


# ---- island: session state ------------------------------------------------------------------------------------

def _session(params: dict[str, Any], centers: torch.Tensor | None = None, k: int | None = None, seed: int = 0,
             dim: int = 3):
    loss = get("island")(params | ({"num_classes": k} if k is not None else {}))
    initial = {} if centers is None else {"initial_centers": centers}
    loss.init_state(dim, torch.device("cpu"), torch.Generator().manual_seed(seed), initial)
    return loss


def test_island_init_from_seed_is_reproducible() -> None:
    a = _session({}, k=5, seed=42).state_tensors()["centers"]
    b = _session({}, k=5, seed=42).state_tensors()["centers"]
    c = _session({}, k=5, seed=43).state_tensors()["centers"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # N(0,1) drawn from the session generator.
    torch.testing.assert_close(a, torch.randn(5, 3, generator=torch.Generator().manual_seed(42)), rtol=0, atol=0)


def test_island_init_needs_num_classes_or_centres() -> None:
    """No centres without num_classes or initial_centers; initial centres of another width than the first batch
    refuse the batch (inputs.embeddings); centres of another count than num_classes refuse the initial state."""
    with pytest.raises(InvalidArgument) as err:
        _session({})
    assert err.value.field == "params.num_classes"
    with pytest.raises(InvalidArgument) as err:
        _session({}, centers=torch.zeros(4, 2), dim=3)
    assert err.value.field == "inputs.embeddings"
    with pytest.raises(InvalidArgument) as err:
        _session({}, centers=torch.zeros(4, 3), k=5)
    assert err.value.field == "config.initial_state.initial_centers"


@pytest.mark.parametrize("name", ["d01_island_unordered_mean", "d02_island_paper_ordered_missing_class",
                                  "d03_island_n1_zero_center"])
@pytest.mark.parametrize("mode", ["paper", "sgd", "none"])
def test_island_session_update(name: str, mode: str) -> None:
    v = _vector(name)
    inputs = _inputs_of(v)
    centers = inputs.pop("centers")
    alpha, lr = 0.3, 0.7
    params = v["hyperparameters"] | {"center_update": mode, "center_alpha": alpha, "center_lr": lr}
    loss = _session(params, centers=centers, dim=centers.shape[1])
    held = loss.state_tensors()["centers"]
    assert isinstance(held, torch.nn.Parameter) == (mode == "sgd")
    torch.testing.assert_close(held.detach(), centers, rtol=0, atol=0)

    ctx = _ctx("cpu")
    out, grads = _forward(loss, inputs, ctx)
    tol = v["tolerance"]["float64"]
    _close(out.loss, v["expected"]["loss"], tol)  # the centres before the update
    _close(grads["embeddings"], v["expected"]["grad_embeddings"], tol)
    loss.update({k: t for k, t in inputs.items()}, out, ctx)
    after = loss.state_tensors()["centers"].detach()
    step = {"paper": alpha * torch.tensor(v["expected"]["paper_center_delta"], dtype=torch.float64),
            "sgd": lr * torch.tensor(v["expected"]["grad_centers"], dtype=torch.float64),
            "none": torch.zeros_like(centers)}[mode]
    torch.testing.assert_close(after, centers - step, rtol=1e-9, atol=1e-12)


def test_island_no_update_outside_training_or_when_stepped_externally() -> None:
    v = _vector("d01_island_unordered_mean")
    inputs = _inputs_of(v)
    centers = inputs.pop("centers")
    for params, ctx in (({"center_update": "paper"}, _ctx("cpu", training=False)),
                        ({"center_update": "sgd"}, _ctx("cpu", training=False)),
                        ({"center_update": "sgd"}, _ctx("cpu", external=True))):
        loss = _session(v["hyperparameters"] | params, centers=centers)
        out, _ = _forward(loss, inputs, ctx)
        loss.update(inputs, out, ctx)
        torch.testing.assert_close(loss.state_tensors()["centers"].detach(), centers, rtol=0, atol=0)


def test_island_stateless_call_leaves_session_centres_alone() -> None:
    v = _vector("d01_island_unordered_mean")
    inputs = _inputs_of(v)
    loss = _session(v["hyperparameters"], k=4, seed=1)
    before = loss.state_tensors()["centers"].clone()
    out, grads = _forward(loss, inputs, _ctx("cpu"))
    _close(out.loss, v["expected"]["loss"], v["tolerance"]["float64"])  # the given centres were used
    _close(grads["centers"], v["expected"]["grad_centers"], v["tolerance"]["float64"])
    loss.update(inputs, out, _ctx("cpu"))
    torch.testing.assert_close(loss.state_tensors()["centers"], before, rtol=0, atol=0)


def test_island_state_round_trip() -> None:
    loss = _session({"center_update": "sgd"}, k=3, seed=9)
    saved = {k: t.detach().clone() for k, t in loss.state_tensors().items()}
    other = get("island")({"center_update": "sgd", "num_classes": 3})
    other.load_state_tensors(saved)
    assert isinstance(other.state_tensors()["centers"], torch.nn.Parameter)
    torch.testing.assert_close(other.state_tensors()["centers"].detach(), saved["centers"], rtol=0, atol=0)
    with pytest.raises(InvalidArgument):
        get("island")({"num_classes": 4}).load_state_tensors(saved)


@pytest.mark.parametrize("labels", [[0, 1, 4], [0, -1, 1]])
def test_island_rejects_labels_outside_k(labels: list[int]) -> None:
    x = torch.zeros(3, 3)
    session = _session({}, k=4)
    stateless = get("island")({})
    for loss, inputs in ((session, {}), (stateless, {"centers": torch.ones(4, 3)})):
        with pytest.raises(InvalidArgument) as err:
            loss.check_inputs({"embeddings": x, "labels": torch.tensor(labels)} | inputs)
        assert err.value.field == "inputs.labels"


def test_island_rejects_bad_centres_and_missing_state() -> None:
    loss = get("island")({"num_classes": 3})
    base = {"embeddings": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}
    for centers in (torch.zeros(3, 2), torch.zeros(4, 3), torch.full((3, 3), math.nan)):
        with pytest.raises(InvalidArgument) as err:
            loss.check_inputs(base | {"centers": centers})
        assert err.value.field == "inputs.centers"
    with pytest.raises(InvalidArgument) as err:
        loss.check_inputs(base)
    assert err.value.field == "inputs.centers"


def test_island_single_class_has_no_island_term() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    c = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    out, grads, _ = _run("island", {"lambda1": 3.0}, {"embeddings": x, "labels": torch.tensor([0, 0]),
                                                      "centers": c})
    expected = 0.5 * ((x - c) ** 2).sum() / 2
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-14)
    torch.testing.assert_close(grads["centers"], -(x - c).sum(0, keepdim=True) / 2)
    torch.testing.assert_close(paper_center_delta(x, torch.tensor([0, 0]), c, 3.0), (2 * c - x.sum(0)) / 3)


# ---- contrastive and multi-similarity: brute force ------------------------------------------------------------

def _contrastive_reference(x: torch.Tensor, y: torch.Tensor, margin: float, reduction: str,
                           mem: Memory | None = None) -> tuple[torch.Tensor, list[float]]:
    partners = [(x[j], int(y[j]), j) for j in range(len(x))]
    if mem is not None:
        partners += [(mem.embeddings[k], int(mem.labels[k]), len(x) + k) for k in range(len(mem.labels))]
    terms = []
    for i in range(len(x)):
        for xj, yj, j in partners:
            if j <= i:
                continue
            sq = ((x[i] - xj) ** 2).sum()
            if int(y[i]) == yj:
                terms.append(0.5 * sq)
            else:
                terms.append(0.5 * torch.clamp(margin - torch.sqrt(torch.clamp(sq, min=1e-12)), min=0) ** 2)
    if not terms:
        return x.sum() * 0, []
    total = torch.stack(terms).sum()
    return (total / len(terms) if reduction == "mean" else total), [float(t.detach()) for t in terms]


def _memory(seed: int, m: int, d: int, classes: int, scale: float = 0.5) -> Memory:
    g = torch.Generator().manual_seed(seed)
    return Memory(embeddings=torch.randn(m, d, generator=g, dtype=torch.float64) * scale,
                  labels=torch.randint(0, classes, (m,), generator=g), ids=torch.arange(m))


@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_contrastive_matches_pair_loop(reduction: str, with_memory: bool) -> None:
    inputs = _labelled(21, n=9, d=3)
    inputs["embeddings"][4] = inputs["embeddings"][1]  # a duplicate: smooth positive or clamped negative
    mem = _memory(22, 5, 3, 3) if with_memory else None
    margin = 1.1
    out, grads, _ = _run("contrastive", {"margin": margin, "reduction": reduction}, inputs, memory=mem)
    x = inputs["embeddings"].clone().requires_grad_(True)
    ref, per_pair = _contrastive_reference(x, inputs["labels"], margin, reduction, mem)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(grads["embeddings"], ref_grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(out.per_item, torch.tensor(per_pair, dtype=torch.float64))
    y = inputs["labels"]
    same = (y[:, None] == y[None, :]).triu(1).sum()
    n_pairs = 9 * 8 // 2 + (9 * 5 if with_memory else 0)
    mem_same = (y[:, None] == mem.labels[None, :]).sum() if with_memory else 0
    assert out.stats["positive_pairs"] == float(same + mem_same)
    assert out.stats["negative_pairs"] == n_pairs - out.stats["positive_pairs"]


def test_contrastive_empty_and_float32() -> None:
    out, grads, _ = _run("contrastive", {}, {"embeddings": torch.ones(1, 4), "labels": torch.tensor([3])},
                         dtype=torch.float32)
    assert float(out.loss.detach()) == 0.0 and not grads["embeddings"].any()
    # Near-duplicates far from the origin, in float32: distances and gradients follow the true differences
    # (the Gram form would cancel to noise of order 1e-4 here).
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + 1e-3 * torch.randn(6, 8, generator=g, dtype=torch.float64)).to(torch.float32)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    out, grads, _ = _run("contrastive", {"margin": 0.01}, {"embeddings": x, "labels": y}, dtype=torch.float32)
    x64 = x.to(torch.float64).requires_grad_(True)  # the same float32 values, exactly
    ref, _ = _contrastive_reference(x64, y, 0.01, "mean")
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(grads["embeddings"].double(), ref_grad, rtol=1e-5, atol=1e-9)


def _ms_reference(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, base: float, eps: float,
                  mem: Memory | None = None) -> tuple[torch.Tensor, set, set]:
    xs = [x[i] for i in range(len(x))] + ([mem.embeddings[k] for k in range(len(mem.labels))] if mem else [])
    ys = [int(v) for v in y] + ([int(v) for v in mem.labels] if mem else [])
    unit = [v / torch.clamp(torch.linalg.vector_norm(v), min=1e-12) for v in xs]
    total = x.sum() * 0
    kept_pos, kept_neg = set(), set()
    for i in range(len(x)):
        sims = {j: torch.dot(unit[i], unit[j]) for j in range(len(xs))}
        s = {j: float(v.detach()) for j, v in sims.items()}  # the selection is not differentiated
        pos = [j for j in sims if j != i and ys[j] == ys[i]]
        neg = [j for j in sims if ys[j] != ys[i]]
        if not pos or not neg:
            continue
        min_pos = min(s[j] for j in pos)
        max_neg = max(s[j] for j in neg)
        hard_neg = [k for k in neg if s[k] + eps > min_pos]
        hard_pos = [j for j in pos if s[j] - eps < max_neg]
        if not hard_pos or not hard_neg:
            continue
        kept_pos |= {(i, j) for j in hard_pos}
        kept_neg |= {(i, k) for k in hard_neg}
        total = total + torch.log(1 + sum(torch.exp(-alpha * (sims[j] - base)) for j in hard_pos)) / alpha
        total = total + torch.log(1 + sum(torch.exp(beta * (sims[k] - base)) for k in hard_neg)) / beta
    return total / len(x), kept_pos, kept_neg


@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("params", [
    {},
    {"alpha": 1.5, "beta": 20.0, "base": 0.2, "epsilon": 0.3},
    {"epsilon": 0.0},
])
def test_multi_similarity_matches_anchor_loop(params: dict[str, Any], with_memory: bool) -> None:
    inputs = _labelled(31, n=12, d=4, classes=4)
    inputs["labels"][11] = 9  # a singleton anchor: no positives, counts in n
    inputs["embeddings"][6] = inputs["embeddings"][5] * 2  # same direction: a duplicate, kept as a positive
    inputs["labels"][6] = inputs["labels"][5]
    mem = _memory(32, 6, 4, 4) if with_memory else None
    full = {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1} | params
    out, grads, loss = _run("multi_similarity", params, inputs, memory=mem)
    x = inputs["embeddings"].clone().requires_grad_(True)
    ref, kept_pos, kept_neg = _ms_reference(x, inputs["labels"], full["alpha"], full["beta"], full["base"],
                                            full["epsilon"], mem)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(grads["embeddings"], ref_grad, rtol=1e-10, atol=1e-13)
    assert out.stats["kept_positive_pairs"] == len(kept_pos) and out.stats["kept_negative_pairs"] == len(kept_neg)
    assert out.stats["anchors_with_pairs"] == len({a for a, _ in kept_pos})
    assert out.per_item.shape == (12,) and float(out.per_item[11]) == 0.0


def test_multi_similarity_single_class_is_zero() -> None:
    out, grads, _ = _run("multi_similarity", {}, {"embeddings": torch.randn(5, 3, dtype=torch.float64),
                                                  "labels": torch.zeros(5, dtype=torch.int64)})
    assert float(out.loss.detach()) == 0.0 and not grads["embeddings"].any()


@pytest.mark.parametrize("name, params, field", [
    ("multi_similarity", {"alpha": 0.0}, "params.alpha"),
    ("multi_similarity", {"beta": -1.0}, "params.beta"),
    ("multi_similarity", {"epsilon": -0.1}, "params.epsilon"),
    ("multi_similarity", {"base": math.inf}, "params.base"),
    ("contrastive", {"margin": -1.0}, "params.margin"),
    ("island", {"lambda1": -1.0}, "params.lambda1"),
    ("island", {"center_alpha": 1.5}, "params.center_alpha"),
    ("island", {"center_update": "adam"}, "params.center_update"),
    ("island", {"num_classes": 0}, "params.num_classes"),
])
def test_rejects_bad_params(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        get(name)(params)
    assert err.value.field == field


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "island"])
def test_rejects_label_length_mismatch(name: str) -> None:
    extra = {"centers": torch.zeros(3, 2)} if name == "island" else {}
    with pytest.raises(InvalidArgument) as err:
        get(name)({}).check_inputs({"embeddings": torch.zeros(4, 2), "labels": torch.zeros(3, dtype=torch.int64)}
                                   | extra)
    assert err.value.field == "inputs.labels"


def test_registered_names_and_flags() -> None:
    flags = {n: (get(n).mines_triplets, get(n).stateful) for n in
             ("weighted_margin_ranking", "island", "contrastive", "multi_similarity")}
    assert flags == {"weighted_margin_ranking": (True, False), "island": (False, True),
                     "contrastive": (False, False), "multi_similarity": (False, False)}
    assert [p.name for p in get("island").schema.params][:6] == [
        "lambda1", "pairs", "center_reduction", "loss_weight", "center_update", "center_alpha"]
    assert list(itertools.islice((p.default for p in get("multi_similarity").schema.params), 4)) == [
        2.0, 50.0, 0.5, 0.1]
