"""The digits example (examples/digits): its retrieval metrics on hand-checked cases and against
pytorch-metric-learning's AccuracyCalculator, its class-balanced sampler, and a short training run showing that the
remote loss (``RemoteLoss`` against a real server) and the same loss computed in-process train identically."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from digits.retrieval import retrieval_metrics  # noqa: E402
from digits.train import (  # noqa: E402
    InProcessLoss,
    LossConfig,
    initial_encoder,
    island_centers,
    load_split,
    pk_batches,
    train,
)

from embtrain.torch import RemoteLoss  # noqa: E402


# ---- metrics on cases worked out by hand -------------------------------------------------------------------------


def test_metrics_hand_checked_1d() -> None:
    # Points on a line (no normalisation), labels a a a b b:
    #   q0 (0.0, a): 0.5 a, 3.0 a, 3.4 b, 10 b     R=2 rel 1 1   hit, AP = (1/1 + 2/2)/2 = 1
    #   q1 (0.5, a): 0.0 a, 3.0 a, ...             R=2 rel 1 1   hit, AP = 1
    #   q2 (3.0, a): 3.4 b, 0.5 a, 0.0 a, 10 b     R=2 rel 0 1   miss, AP = (1/2)/2 = 0.25
    #   q3 (3.4, b): 3.0 a, 0.5 a, 0.0 a, 10 b     R=1 rel 0     miss, AP = 0
    #   q4 (10, b):  3.4 b, ...                    R=1 rel 1     hit, AP = 1
    x = torch.tensor([[0.0], [0.5], [3.0], [3.4], [10.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    m = retrieval_metrics(x, y, normalize=False)
    assert m["queries"] == 5
    assert m["recall_at_1"] == pytest.approx(3 / 5)
    assert m["map_at_r"] == pytest.approx((1 + 1 + 0.25 + 0 + 1) / 5)


def test_metrics_normalisation_and_singleton_queries() -> None:
    # Class 1 has one sample: it cannot retrieve a same-class neighbour and is not a query.
    # Euclidean: q0 (1,0) is nearer to (0,2) [2.24] than to (5,0.1) [4.00] -> miss; q1 (5,0.1) -> (1,0) hit.
    # Cosine (normalised): (1,0) and (5,0.1) point the same way -> both hit.
    x = torch.tensor([[1.0, 0.0], [5.0, 0.1], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    raw = retrieval_metrics(x, y, normalize=False)
    assert raw["queries"] == 2
    assert raw["recall_at_1"] == pytest.approx(0.5)
    assert raw["map_at_r"] == pytest.approx(0.5)
    cos = retrieval_metrics(x, y)
    assert cos["recall_at_1"] == pytest.approx(1.0)
    assert cos["map_at_r"] == pytest.approx(1.0)


def test_metrics_ties_go_to_the_lower_index() -> None:
    # q0 at 0 is equally far (1) from index 1 (label b) and index 2 (label a): index 1 wins -> miss.
    # q2 at -1: nearest is 0 (label a, d=1) -> hit. q1 is b's only sample -> not a query.
    x = torch.tensor([[0.0], [1.0], [-1.0]])
    y = torch.tensor([0, 1, 0])
    m = retrieval_metrics(x, y, normalize=False)
    assert m["queries"] == 2
    assert m["recall_at_1"] == pytest.approx(0.5)
    # AP@R with R = 1 is the hit itself.
    assert m["map_at_r"] == pytest.approx(0.5)


@pytest.mark.parametrize("normalize", [True, False])
def test_metrics_match_pytorch_metric_learning(normalize: bool) -> None:
    pytest.importorskip("pytorch_metric_learning", reason="needs the pml extra: pip install 'embtrain[pml]'")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    g = torch.Generator().manual_seed(3)
    # Clustered data so the metrics are far from 0 and 1.
    y = torch.randint(0, 6, (257,), generator=g)
    x = torch.randn(6, 5, generator=g)[y] * 1.5 + torch.randn(257, 5, generator=g)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(LpDistance(normalize_embeddings=normalize)))
    ref = calc.get_accuracy(x, y)
    ours = retrieval_metrics(x, y, normalize=normalize, chunk=100)  # several chunks
    assert 0.2 < ours["recall_at_1"] < 0.95
    assert ours["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-9)
    assert ours["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-9)


# ---- sampler -------------------------------------------------------------------------------------------------


def test_pk_batches_are_class_balanced_and_reproducible() -> None:
    labels = torch.arange(100) % 10
    batches = pk_batches(labels, 4, 3, 20, seed=7)
    assert len(batches) == 20
    for b in batches:
        counts = torch.bincount(labels[b], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3]
        assert len(set(b.tolist())) == 12  # no row twice: every class has >= K rows
    again = pk_batches(labels, 4, 3, 20, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_split_is_stratified_and_disjoint() -> None:
    split = load_split()
    assert set(split.y_train.tolist()) == set(split.y_test.tolist()) == set(range(10))
    assert len(split.y_train) + len(split.y_test) == 1797
    # Standardised with the training statistics.
    assert split.x_train.mean(0).abs().max() < 1e-4


# ---- remote and local training agree ---------------------------------------------------------------------------

CONFIGS = [
    LossConfig("batch_hard_triplet", {"margin": 0.2}),
    LossConfig("triplet_margin", {"miner": "semihard", "margin": 0.2}),
    LossConfig("multi_similarity", {}),
    LossConfig("island", {"lambda1": 10.0, "center_alpha": 0.5}, normalize=False, session=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.loss for c in CONFIGS])
def test_remote_and_local_training_match(client, cfg: LossConfig) -> None:  # type: ignore[no-untyped-def]
    split = load_split()
    encoder = initial_encoder(cfg.normalize, out_dim=16, seed=0)
    batches = pk_batches(split.y_train, 8, 8, 2 * len(split.y_train) // 64, seed=1)  # two epochs
    initial = {"initial_centers": island_centers(10, 16, seed=2)} if cfg.session else {}
    session = client.create_session(cfg.loss, dict(cfg.params), seed=0, initial_state=initial) if cfg.session \
        else None
    remote_fn = RemoteLoss(session) if session is not None else RemoteLoss(client, cfg.loss, dict(cfg.params))
    try:
        remote = train(encoder, split, batches, remote_fn)
    finally:
        if session is not None:
            session.close()
    local = train(encoder, split, batches, InProcessLoss(cfg.loss, cfg.params, initial_state=initial))
    # Same batches, same initial weights, same gradients: the per-step losses agree to float32 rounding.
    assert len(remote.losses) == len(local.losses) == len(batches)
    torch.testing.assert_close(torch.tensor(remote.losses), torch.tensor(local.losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(remote.encoder.parameters(), local.encoder.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # The loss went down: training did something.
    assert sum(remote.losses[-5:]) < sum(remote.losses[:5])


def test_in_process_island_moves_its_centres_like_the_session(client) -> None:  # type: ignore[no-untyped-def]
    params = {"lambda1": 10.0, "center_alpha": 0.5}
    c0 = island_centers(3, 4, seed=5)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 4, generator=g), torch.arange(12) % 3
    session = client.create_session("island", params, seed=0, initial_state={"initial_centers": c0})
    local = InProcessLoss("island", params, initial_state={"initial_centers": c0})
    try:
        for _ in range(3):
            r = session.compute(x, y)
            mine = local(x.clone().requires_grad_(True), y)
            assert r.loss == pytest.approx(float(mine.detach()), rel=1e-6)
        served = session.export_model().state["centers"]
    finally:
        session.close()
    torch.testing.assert_close(torch.tensor(served), local.impl.state_tensors()["centers"], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(local.impl.state_tensors()["centers"], c0)  # they did move


def test_run_demo_end_to_end(server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("digits_run_demo", ROOT / "examples" / "digits" / "run_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rc = demo.main(["--target", server.target, "--losses", "multi_similarity", "--epochs", "1", "--out",
                    str(tmp_path), "--no-copy", "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (r,) = data["results"]
    assert r["loss"] == "multi_similarity" and r["max_rel_loss_diff"] < 1e-5
    assert r["remote"]["metrics"]["recall_at_1"] == pytest.approx(r["local"]["metrics"]["recall_at_1"], abs=0.01)
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "results.md").read_text()
    assert "| multi_similarity | remote |" in text
    step_row = next(line for line in text.splitlines() if line.startswith("| multi_similarity |")
                    and "bare" not in line and line.count("|") == 7)
    local, remote, diff, trip, rest = (float(c) for c in step_row.strip("|").split("|")[1:])
    assert diff == pytest.approx(remote - local, abs=0.011) and rest == pytest.approx(diff - trip, abs=0.011)
    assert trip > 0
