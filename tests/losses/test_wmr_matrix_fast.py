"""weighted_margin_ranking's counting form (the matrix form without O(n³) pair tensors) and its direct small-block
path, each against a brute-force
reference written here from the spec (LOSSES.md §A.2, one anchor at a time, plain float64 broadcasting over the
pairs; the matrix form is the mean over the anchors with at least one pair). Loss, gradient (autograd of the
reference), mined triplets, their total and per_item must agree, for both pair orders, weighted or not, with
min_dist / max_dist, far samples, the all-far case, ties and duplicates in gt and duplicate embeddings; near-ties of
the hinge (|ℓ| within a few ulps of 0) must be decided exactly like the direct expression."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from served import serve

from embtrain_server.losses import ComputeContext, get, load_all
from embtrain_server.losses import weighted_margin_ranking as wmr_module

load_all()

NAME = "weighted_margin_ranking"
DEFAULTS = {"margin": 0.03, "min_dist": 0.0, "max_dist": math.inf, "weighted": True, "pair_order": "gt",
            "reduction": "mean"}


@pytest.fixture(autouse=True, params=["direct", "counting"])
def block_path(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Every test runs both ways a block is decided: small blocks all pairs at once (the default at these sizes),
    and the counting form that larger blocks take (forced here by a zero threshold)."""
    if request.param == "counting":
        monkeypatch.setattr(wmr_module, "_DENSE_ELEMENTS", 0)
    return str(request.param)


# ---- the reference --------------------------------------------------------------------------------------------

def _anchor_reference(xa: torch.Tensor, xs: torch.Tensor, gt: list[float], p: dict[str, Any]
                      ) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, int]:
    """One anchor ``xa`` [d] and its samples ``xs`` [m, d] (in input order) with ground truth ``gt`` (length m).

    Returns (this anchor's loss, the active pairs (r, c) as sample positions in lexicographic order, every used
    pair's loss in (r, c) order, |P|)."""
    m = len(gt)
    dist = ((xa[None, :] - xs) ** 2).sum(1)  # squared euclidean, from differences
    g = [max(v, p["min_dist"]) for v in gt]
    far = [v > p["max_dist"] for v in g]
    if m and all(far):
        far[min(range(m), key=lambda i: (g[i], i))] = False  # the closest (lowest index on ties) is the reference
    lo = p["min_dist"]
    hi = p["max_dist"] if math.isfinite(p["max_dist"]) else (max(g) if g else lo)
    gn = [min(max((v - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.0 for v in g]
    if p["pair_order"] == "gt":
        pairs = [(r, c) for r in range(m) for c in range(m) if g[r] < g[c] and not (far[r] and far[c])]
    else:
        n_neg = max(min(sum(far), m - 1), 1)
        tail = [i >= m - n_neg for i in range(m)]
        pairs = [(r, c) for r in range(m) for c in range(r + 1, m) if not (tail[r] and tail[c])]
    if not pairs:
        return dist.sum() * 0.0, [], dist.new_zeros(0), 0
    r_idx = torch.tensor([r for r, _ in pairs])
    c_idx = torch.tensor([c for _, c in pairs])
    gn_t = torch.tensor(gn, dtype=torch.float64)
    w = p["margin"] * (1.0 + gn_t[c_idx] - gn_t[r_idx]) if p["weighted"] else torch.full(
        (len(pairs),), p["margin"], dtype=torch.float64)
    ell = dist[r_idx] - dist[c_idx] + w
    hinge = torch.where(ell > 0, ell, 0.0)  # §0.3: a hinge of exactly 0 is inactive, its subgradient 0
    active = [pairs[k] for k in (ell > 0).nonzero().flatten().tolist()]
    total = hinge.sum() / len(pairs) if p["reduction"] == "mean" else hinge.sum()
    return total, active, hinge, len(pairs)


def _reference(x: torch.Tensor, gt: torch.Tensor, params: dict[str, Any]
               ) -> tuple[float, torch.Tensor, list[list[int]], torch.Tensor, int]:
    """(loss, gradient, active triplets [a, r, c] sorted, per_item, |P| summed) of the spec for a batch."""
    p = DEFAULTS | params
    x = x.detach().to(torch.float64).requires_grad_(True)
    n = x.shape[0]
    if gt.dim() == 1:
        jobs = [(0, list(range(1, n)), gt.tolist())]
    else:
        jobs = [(a, [j for j in range(n) if j != a], [float(gt[a, j]) for j in range(n) if j != a]) for a in range(n)]
    losses, triplets, items, n_pairs = [], [], [], 0
    for a, rows, g in jobs:
        value, active, hinge, count = _anchor_reference(x[a], x[rows], g, p)
        if count:
            losses.append(value)
        triplets += [[a, rows[r], rows[c]] for r, c in active]
        items.append(hinge)
        n_pairs += count
    loss = torch.stack(losses).mean() if losses else x.sum() * 0.0
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad, sorted(triplets), torch.cat(items), n_pairs


def _check(x: torch.Tensor, gt: torch.Tensor, params: dict[str, Any], max_triplets: int = 1 << 30) -> None:
    ref_loss, ref_grad, ref_triplets, ref_items, ref_pairs = _reference(x, gt, params)
    res = serve(get(NAME)(params), {"embeddings": x, "gt_distances": gt}, max_triplets=max_triplets)
    assert res.loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(res.gradients["embeddings"], ref_grad, rtol=1e-10, atol=1e-13)
    assert res.triplets.tolist() == ref_triplets[:max_triplets]
    assert res.triplets_total == len(ref_triplets)
    assert res.stats["pairs"] == ref_pairs and res.stats["active_pairs"] == len(ref_triplets)
    torch.testing.assert_close(res.per_item, ref_items, rtol=1e-12, atol=1e-15)
    # Without per_item the triplets come from the counts and a partial enumeration; the numbers are the same.
    lean = serve(get(NAME)(params), {"embeddings": x, "gt_distances": gt}, max_triplets=max_triplets,
                 per_item=False)
    assert lean.loss == res.loss and torch.equal(lean.gradients["embeddings"], res.gradients["embeddings"])
    assert lean.triplets.tolist() == res.triplets.tolist() and lean.triplets_total == res.triplets_total


# ---- problems -------------------------------------------------------------------------------------------------

PARAMS = [
    {},
    {"margin": 0.4},
    {"margin": 0.4, "weighted": False},
    {"margin": 0.4, "reduction": "sum"},
    {"margin": 0.3, "min_dist": 1.0, "max_dist": 3.0},
    {"margin": 0.3, "min_dist": 1.0, "max_dist": 3.0, "weighted": False, "reduction": "sum"},
    {"margin": 0.3, "max_dist": 0.6},  # many anchors all far
    {"margin": 0.0},
    {"margin": 0.5, "min_dist": 0.5, "max_dist": 2.0},
]
PARAMS = [p | order for p in PARAMS for order in ({"pair_order": "gt"}, {"pair_order": "index"})]


def _problem(seed: int, n: int, matrix: bool, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1) * 1.5
    x[3] = x[1]  # duplicate embeddings
    shape = (n, n) if matrix else (n - 1,)
    gt = torch.randint(0, 9, shape, generator=gen).to(torch.float64) * 0.5  # ties and duplicates in gt
    gt += (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5) * torch.rand(shape, generator=gen,
                                                                                      dtype=torch.float64)
    if matrix:
        gt.fill_diagonal_(7.0)  # ignored
        gt[2] = 0.25  # one anchor whose samples are all tied (and clamped by min_dist = 0.5 / 1.0)
        gt[4, :] = 5.0  # one anchor whose samples are all beyond max_dist (where it is finite)
        gt[4, 6] = 4.0
    return x, gt


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "default")
@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
def test_against_brute_force(params: dict[str, Any], matrix: bool) -> None:
    for seed in range(3):
        x, gt = _problem(seed, 11 + 4 * seed, matrix)
        _check(x, gt, params)


@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
def test_capped_triplets_are_the_first_ones(matrix: bool) -> None:
    x, gt = _problem(7, 14, matrix)
    for cap in (0, 1, 5, 37):
        _check(x, gt, {"margin": 0.4}, max_triplets=cap)


def test_small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # One anchor per counting block and one row per enumeration block: the blockwise paths give the same numbers.
    monkeypatch.setattr(wmr_module, "_BLOCK_ELEMENTS", 1)
    x, gt = _problem(3, 13, True)
    for params in ({"margin": 0.4}, {"margin": 0.3, "min_dist": 1.0, "max_dist": 3.0, "pair_order": "index"}):
        _check(x, gt, params, max_triplets=9)


def test_exact_zero_hinges_are_inactive() -> None:
    # Half-integer coordinates and margins: the squared distances and margins are exact, and many hinges are
    # exactly 0 (inactive, §0.3) in both the direct and the split form.
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (12, 2), generator=gen).to(torch.float64) * 0.5
    gt = torch.randint(0, 5, (12, 12), generator=gen).to(torch.float64) * 0.5
    for params in ({"margin": 0.25, "weighted": False}, {"margin": 0.5, "min_dist": 0.0, "max_dist": 2.0},
                   {"margin": 0.5, "max_dist": 2.0, "pair_order": "index"}, {"margin": 0.0}):
        _check(x, gt, params)


def _near_tie_problem(seed: int, weighted: bool, order: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """A vector-form batch on a line through the anchor (d = 1, anchor at 0, so dist_j = x_j² exactly) where many
    pairs have ``dist_c`` within a few ulps of ``dist_r + w_rc``: ℓ_rc is 0 up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    params = {"margin": 0.1, "min_dist": 0.0, "max_dist": 2.0, "weighted": weighted, "pair_order": order}
    m = 30
    gt = torch.randint(0, 6, (m,), generator=gen).to(torch.float64) * 0.5  # gn in {0, .25, .5, .75, 1}
    gn = (gt / 2.0).clamp(0.0, 1.0)
    xs = (torch.rand(m, generator=gen, dtype=torch.float64) + 0.5).tolist()
    for _ in range(3 * m):
        r, c = torch.randint(0, m, (2,), generator=gen).tolist()
        w = 0.1 * (1.0 + float(gn[c]) - float(gn[r])) if weighted else 0.1
        target = math.sqrt(xs[r] * xs[r] + w)
        for _ in range(int(torch.randint(-2, 3, (), generator=gen))):
            target = math.nextafter(target, math.inf)
        xs[c] = target
    x = torch.tensor([0.0] + xs, dtype=torch.float64)[:, None]
    return x, gt, params


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("order", ["gt", "index"])
def test_near_ties_decided_like_the_direct_expression(weighted: bool, order: str) -> None:
    split_differs = 0
    for seed in range(4):
        x, gt, params = _near_tie_problem(seed, weighted, order)
        _check(x, gt, params)
        # Not vacuous: the split form A_r - B_c alone would decide some of these pairs otherwise.
        p = DEFAULTS | params
        dist = (x[1:, 0] - x[0, 0]) ** 2
        gn = (gt / 2.0).clamp(0.0, 1.0) if weighted else torch.zeros_like(gt)
        a = dist - p["margin"] * gn + p["margin"]
        b = dist - p["margin"] * gn
        w = p["margin"] * (1.0 + gn[None, :] - gn[:, None]) if weighted else p["margin"]
        direct = (dist[:, None] - dist[None, :] + w) > 0
        split_differs += int((direct != (a[:, None] > b[None, :])).sum())
    assert split_differs > 0


def test_gradient_matches_finite_differences() -> None:
    x, gt = _problem(11, 8, True, d=2)
    loss = get(NAME)({"margin": 0.3, "min_dist": 1.0, "max_dist": 3.0})
    loss.check_inputs({"embeddings": x, "gt_distances": gt})
    ctx = ComputeContext(device=torch.device("cpu"), max_triplets=100)

    def fn(emb: torch.Tensor) -> torch.Tensor:
        return loss.forward({"embeddings": emb, "gt_distances": gt}, ctx).loss

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_matrix_form_of_1500_rows_runs() -> None:
    # This took minutes as O(n³) pair tensors; the counting form takes seconds. No time is asserted.
    n = 1500
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    gt = torch.rand(n, n, generator=gen, dtype=torch.float64).to(torch.float32)
    res = serve(get(NAME)({}), {"embeddings": x, "gt_distances": gt}, max_triplets=500, per_item=False)
    assert math.isfinite(res.loss) and torch.isfinite(res.gradients["embeddings"]).all()
    assert res.triplets_total == res.stats["active_pairs"] and res.triplets.shape == (500, 3)
    # The kept triplets are anchor 0's first active pairs (it has hundreds of thousands), by the spec's rule.
    x64, g = x.double(), gt[0, 1:].double()
    dist = ((x64[0] - x64[1:]) ** 2).sum(1)
    gn = g / g.max()
    ell = dist[:, None] - dist[None, :] + 0.03 * (1.0 + gn[None, :] - gn[:, None])
    active = ((g[:, None] < g[None, :]) & (ell > 0)).nonzero() + 1
    assert res.triplets.tolist() == [[0, r, c] for r, c in active[:500].tolist()]
