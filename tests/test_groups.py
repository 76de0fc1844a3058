"""Group steps: W members send their slices of every step; the server answers each as one process holding the
concatenated batch would. References are a plain session (same configuration and seed) computing the rank-ordered
concatenation in one Compute: equal bit for bit, state included."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

import embtrain
from tests.conftest import ServerHandle

W = 4
SIZES = [5, 0, 7, 3]  # uneven, one member with no rows at all


@pytest.fixture(scope="module")
def server(module_server: ServerHandle) -> ServerHandle:
    """This module's own server (its tests create many sessions)."""
    return module_server


CASES: dict[str, dict[str, Any]] = {
    "batch_hard_triplet": dict(loss="batch_hard_triplet", params={"margin": 0.2}),
    "triplet_margin_semihard": dict(loss="triplet_margin", params={"miner": "semihard", "margin": 0.5}),
    "multi_similarity": dict(loss="multi_similarity", params={}),
    "contrastive": dict(loss="contrastive", params={"margin": 1.5}),
    "island": dict(loss="island", params={"num_classes": 3, "lambda1": 0.5}),
    "head_and_optimizer": dict(loss="batch_all_triplet", params={"margin": 0.3},
                               head=[{"type": "mlp", "hidden": [8], "out_dim": 4}, {"type": "l2_normalize"}],
                               optimizer={"type": "adam", "lr": 0.05}),
    "memory": dict(loss="batch_hard_triplet", params={"margin": 0.2}, head={"type": "linear", "out_dim": 4},
                   memory={"size": 20}),
}


def slices(step: int, dtype: type, sizes: list[int] = SIZES, d: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(100 * step + len(sizes))
    return [(rng.standard_normal((n, d)).astype(dtype), rng.integers(0, 3, n).astype(np.int64)) for n in sizes]


def create(client: embtrain.Client, case: str, **kw: Any) -> embtrain.Session:
    cfg = dict(CASES[case])
    return client.create_session(cfg.pop("loss"), cfg.pop("params"), seed=11, **cfg, **kw)


def run_members(calls: dict[int, Callable[[], Any]], seed: int = 0) -> dict[int, Any]:
    """Run each member's call in its own thread, started in a shuffled order with small delays; results (or the
    exception raised) by rank."""
    out: dict[int, Any] = {}
    order = list(calls)
    random.Random(seed).shuffle(order)

    def run(rank: int) -> None:
        try:
            out[rank] = calls[rank]()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in order]
    for t in threads:
        t.start()
        time.sleep(random.Random(seed + len(out)).uniform(0, 0.02))
    for t in threads:
        t.join(60)
    return out


def group_step(session: embtrain.Session, parts: list[tuple[np.ndarray, np.ndarray]], step: int,
               seed: int = 0, **kw: Any) -> dict[int, Any]:
    return run_members({r: (lambda r=r: session.member(r).compute(*parts[r], step=step, **kw))
                        for r in range(len(parts))}, seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_group_step_equals_one_compute_on_the_concatenation(client: embtrain.Client, case: str,
                                                              dtype: type) -> None:
    group = create(client, case, group_size=W, group_timeout=30)
    ref = create(client, case)
    for step in range(1, 4):
        parts = slices(step, dtype)
        got = group_step(group, parts, step, seed=step)
        want = ref.compute(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
        offset = 0
        for rank, (x, _) in enumerate(parts):
            r = got[rank]
            assert not isinstance(r, Exception), r
            assert r.loss == want.loss and r.step == want.step == step and r.stats == want.stats
            assert r.row_offset == offset and r.triplets_truncated == want.triplets_truncated
            np.testing.assert_array_equal(r.gradient, want.gradient[offset:offset + len(x)])
            assert r.gradient.dtype == dtype
            if want.triplets is None:  # a pair loss: no triplets
                assert r.triplets is None
            else:
                touches = ((want.triplets >= offset) & (want.triplets < offset + len(x))).any(1)
                np.testing.assert_array_equal(r.triplets, want.triplets[touches])
            offset += len(x)
    assert group.info().step == ref.info().step == 3
    ge, re_ = group.export_model(), ref.export_model()
    assert ge.weights == re_.weights
    assert ge.state.keys() == re_.state.keys()
    for name in ge.state:
        np.testing.assert_array_equal(ge.state[name], re_.state[name])
    assert group.info().memory_fill == ref.info().memory_fill


def test_triplet_ids_name_the_members_samples(client: embtrain.Client) -> None:
    group = create(client, "batch_hard_triplet", group_size=2)
    ref = create(client, "batch_hard_triplet")
    parts = slices(1, np.float32, [6, 4])
    ids = [np.arange(6) + 1000, np.arange(4) + 2000]
    got = run_members({r: (lambda r=r: group.member(r).compute(*parts[r], step=1, ids=ids[r])) for r in range(2)})
    want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                       ids=np.concatenate(ids))
    for rank, lo, hi in [(0, 0, 6), (1, 6, 10)]:
        touches = ((want.triplets >= lo) & (want.triplets < hi)).any(1)
        np.testing.assert_array_equal(got[rank].triplet_ids, want.triplet_ids[touches])


def test_a_withheld_member_aborts_the_step_and_changes_nothing(client: embtrain.Client) -> None:
    group = create(client, "head_and_optimizer", group_size=3, group_timeout=0.5)
    group_step(group, slices(1, np.float32, [4, 5, 3]), 1)
    parts = slices(2, np.float32, [4, 5, 3])
    before = group.export_model().weights
    got = run_members({r: (lambda r=r: group.member(r).compute(*parts[r], step=2)) for r in (0, 2)})
    for r in (0, 2):
        assert isinstance(got[r], embtrain.Aborted), got[r]
        assert got[r].code == grpc.StatusCode.ABORTED and got[r].missing_ranks == [1]
        assert "ranks 1 did not send" in got[r].message
    assert group.info().step == 1 and group.export_model().weights == before
    full = group_step(group, parts, 2)  # the whole step resent: it commits once
    assert all(full[r].step == 2 for r in range(3)) and group.info().step == 2


def test_a_resend_after_the_commit_gets_the_same_answer_and_a_different_one_is_refused(
        client: embtrain.Client) -> None:
    group = create(client, "head_and_optimizer", group_size=2)
    parts = slices(1, np.float32, [4, 5])
    first = group_step(group, parts, 1)
    weights = group.export_model().weights
    again = group.member(1).compute(*parts[1], step=1)
    assert again.loss == first[1].loss and again.row_offset == 4
    np.testing.assert_array_equal(again.gradient, first[1].gradient)
    np.testing.assert_array_equal(again.triplets, first[1].triplets)
    with pytest.raises(embtrain.FailedPrecondition, match="different batch"):
        group.member(1).compute(*slices(9, np.float32, [4, 5])[1], step=1)
    assert group.info().step == 1 and group.export_model().weights == weights


@pytest.mark.parametrize("call, error, field", [
    (lambda g, x, y: g.member(2).compute(x, y, step=1), embtrain.InvalidArgument, "rank"),
    (lambda g, x, y: g.client.compute(x, y, session_id=g.id, rank=0), embtrain.InvalidArgument, "step"),
    (lambda g, x, y: g.client.compute(x, y, session_id=g.id, step=1), embtrain.InvalidArgument, "rank"),
    (lambda g, x, y: g.member(0).compute(x, y, step=3), embtrain.FailedPrecondition, "step"),  # the future
    (lambda g, x, y: g.member(0).compute(x, y, step=1), embtrain.FailedPrecondition, "step"),  # the past
    (lambda g, x, y: g.member(0).compute(x[:, :3], y, step=2), embtrain.InvalidArgument, "inputs.embeddings"),
])
def test_bad_slices_are_refused_naming_the_field(client: embtrain.Client, call: Any, error: type,
                                                 field: str) -> None:
    group = create(client, "batch_hard_triplet", group_size=2, group_timeout=5)
    group_step(group, slices(1, np.float32, [3, 3]), 1)
    x, y = slices(2, np.float32, [3, 3])[0]  # step 1 again with another batch is refused like a step from the past
    with pytest.raises(error) as info:
        call(group, x, y)
    assert field in info.value.fields, info.value
    assert group.info().step == 1


def test_group_size_and_losses_that_cannot_be_split_are_refused(client: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("batch_hard_triplet", group_size=0)
    assert info.value.fields == ["config.group_size"]
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("weighted_margin_ranking", group_size=2)
    assert info.value.fields == ["config.group_size"] and "gt_distances" in info.value.message
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.create_session("batch_hard_triplet", group_size=2, group_timeout=-1)
    assert info.value.fields == ["config.group_timeout"]


def test_another_principal_cannot_send_slices(make_server: Callable[..., ServerHandle]) -> None:
    alice, bob = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef0"
    h = make_server(tokens=f"alice:{alice},bob:{bob}")
    with h.client(token=alice) as a, h.client(token=bob) as b:
        group = create(a, "batch_hard_triplet", group_size=2)
        x, y = slices(1, np.float32, [3, 3])[0]
        with pytest.raises(embtrain.NotFound):
            embtrain.Session(b, group.id).member(0).compute(x, y, step=1)
        assert group.info().step == 0


def test_members_can_stream_their_slices(client: embtrain.Client) -> None:
    group = create(client, "head_and_optimizer", group_size=2)
    ref = create(client, "head_and_optimizer")
    steps = [slices(s, np.float32, [4, 6]) for s in range(1, 5)]
    got = run_members({r: (lambda r=r: list(group.member(r).stream([p[r] for p in steps], first_step=1)))
                       for r in range(2)})
    for s, parts in enumerate(steps):
        want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        assert got[0][s].loss == got[1][s].loss == want.loss
        np.testing.assert_array_equal(np.concatenate([got[0][s].gradient, got[1][s].gradient]), want.gradient)
    assert group.export_model().weights == ref.export_model().weights


def test_a_member_that_gives_up_releases_its_slice(client: embtrain.Client) -> None:
    """A cancelled or expired member call before the commit withdraws its slice; the step then needs it again."""
    group = create(client, "batch_hard_triplet", group_size=2, group_timeout=30)
    parts = slices(1, np.float32, [3, 4])
    with pytest.raises(embtrain.DeadlineExceeded):
        group.member(0).compute(*parts[0], step=1, timeout=0.3)
    time.sleep(0.2)
    out = run_members({1: lambda: group.member(1).compute(*parts[1], step=1, timeout=1.0)})
    assert isinstance(out[1], embtrain.DeadlineExceeded)  # rank 0's slice is gone: the step still waits for it
    full = group_step(group, parts, 1)
    assert full[0].step == full[1].step == 1


def test_the_budget_is_checked_on_the_step_so_far_before_a_member_waits(
        make_server: Callable[..., ServerHandle]) -> None:
    """Each slice fits the memory budget alone; together they do not: the slice that would overflow it is refused
    at once (RESOURCE_EXHAUSTED) and not kept, while the first keeps waiting for a slice that fits."""
    h = make_server(memory_budget_bytes=3 * 2**20)
    with h.client() as c:
        group = c.create_session("batch_hard_triplet", group_size=2, group_timeout=30)
        x0, y0 = slices(1, np.float32, [200])[0]
        x1, y1 = slices(2, np.float32, [300])[0]
        first: dict[int, Any] = {}
        t = threading.Thread(target=lambda: first.setdefault(0, group.member(0).compute(x0, y0, step=1)))
        t.start()
        time.sleep(0.3)
        with pytest.raises(embtrain.ResourceExhausted) as info:
            group.member(1).compute(x1, y1, step=1)
        assert info.value.fields == ["inputs.embeddings"]
        r1 = group.member(1).compute(x1[:10], y1[:10], step=1)  # a slice that fits completes the step
        t.join(30)
        assert r1.step == first[0].step == 1 and r1.row_offset == 200


def test_a_restart_during_a_step_loses_the_collected_slices_and_the_resend_commits_once(
        make_server: Callable[..., ServerHandle], tmp_path: Any) -> None:
    cfg = dict(persist=True, state_dir=str(tmp_path), checkpoint_every_steps=1)
    h = make_server(**cfg)
    with h.client() as c:
        group = create(c, "head_and_optimizer", group_size=2, group_timeout=30)
        group_step(group, slices(1, np.float32, [3, 4]), 1)
        parts = slices(2, np.float32, [3, 4])
        waiting = threading.Thread(target=lambda: pytest.raises(embtrain.EmbtrainError,
                                                                 group.member(0).compute, *parts[0], step=2))
        waiting.start()
        time.sleep(0.3)
    h.stop(grace=0.5)  # the pending step (rank 0's slice) is not in any checkpoint
    waiting.join(30)
    h2 = make_server(**cfg)
    with h2.client() as c:
        group = c.get_session(group.id)
        assert group.info().step == 1
        done = group_step(group, parts, 2)
        assert done[0].step == done[1].step == 2 and group.info().step == 2
        ref = create(c, "head_and_optimizer")
        for s in (1, 2):
            p = slices(s, np.float32, [3, 4])
            ref.compute(np.concatenate([p[0][0], p[1][0]]), np.concatenate([p[0][1], p[1][1]]))
        assert group.export_model().weights == ref.export_model().weights
