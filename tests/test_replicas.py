"""Replicas: R server processes that compute replicated sessions together on torch.distributed (gloo, loopback).

The reference for every step is one server process (world_size 1) computing the rank-ordered concatenation of the
members' slices in one Compute of a plain session with the same configuration and seed: replicate mode must equal
it bit for bit, state included, on every replica. Every process is started by this module and killed when it ends,
whatever happened."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import embtrain
from embtrain_server import process
from tests.test_groups import run_members, slices

W = 4
SIZES = [[3, 7, 1, 9], [6, 0, 5, 4], [2, 8, 3, 3]]  # uneven, one member empty at step 2
CONFIG: dict[str, Any] = dict(loss="batch_hard_triplet", params={"margin": 0.2},
                              head=[{"type": "linear", "out_dim": 8}, {"type": "l2_normalize"}],
                              optimizer={"type": "adam", "lr": 0.05}, memory={"size": 24}, seed=5)
COMMON = ["--metrics-port", "0", "--device", "cpu", "--workers", "1", "--torch-threads", "1", "--log-level", "INFO",
          "--drain-seconds", "2", "--digest-every-steps", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embtrain.Client]:
    """One server process, the same settings, no replicas."""
    log = tmp_path_factory.mktemp("reference") / "server.log"
    with process.running([*COMMON, "--no-persist"], log_path=log, grace=10) as (target, _):
        with embtrain.Client(target) as client:
            yield client


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def replicas(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[process.ReplicaGroup]:
    with process.replica_group(tmp_path_factory.mktemp(f"r{request.param}"), request.param, *COMMON,
                               "--replica-timeout", "3") as c:
        yield c


def steps_data(dtype: type = np.float32) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    return [slices(s + 1, dtype, sizes, d=6) for s, sizes in enumerate(SIZES)]


def replicated_step(session: embtrain.Session, parts: list[tuple[np.ndarray, np.ndarray]], step: int,
                    seed: int = 0, **kw: Any) -> dict[int, Any]:
    """Every member sends its slice (member r through replica r mod R), concurrently, in a shuffled order."""
    return run_members({r: (lambda r=r: session.member(r).compute(*parts[r], step=step, **kw))
                        for r in range(len(parts))}, seed)


def assert_member_answers(got: dict[int, Any], want: Any, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Each member's answer is its part of the reference's answer on the concatenation, bit for bit."""
    offset = 0
    for r, (x, _) in enumerate(parts):
        res = got[r]
        assert not isinstance(res, Exception), res
        n = len(x)
        assert res.loss == want.loss and res.row_offset == offset and res.stats == want.stats
        np.testing.assert_array_equal(res.gradient, want.gradient[offset:offset + n])
        mine = ((want.triplets >= offset) & (want.triplets < offset + n)).any(1)
        np.testing.assert_array_equal(res.triplets, want.triplets[mine])
        assert res.triplets_total == want.triplets_total
        offset += n


def replica_sessions(c: process.ReplicaGroup, sid: str) -> list[embtrain.Session]:
    return [embtrain.Client(a).get_session(sid) for a in c.addresses]


def test_replicate_mode_is_one_server_on_the_concatenation(replicas: process.ReplicaGroup,
                                                           reference: embtrain.Client) -> None:
    client = replicas.client()
    cfg = dict(CONFIG)
    group = client.create_session(cfg.pop("loss"), cfg.pop("params"), group_size=W, replicated=True, **cfg)
    ref = reference.create_session(CONFIG["loss"], CONFIG["params"], **{k: v for k, v in CONFIG.items()
                                                                         if k not in ("loss", "params")})
    for step, parts in enumerate(steps_data(), start=1):
        got = replicated_step(group, parts, step, seed=step)
        want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        assert_member_answers(got, want, parts)
    exported = ref.export_model()
    for s in replica_sessions(replicas, group.id):  # the same session, the same state, on every replica
        info = s.info()
        assert info.step == 3 and info.memory_fill == ref.info().memory_fill and info.config["replicated"]
        assert s.export_model().weights == exported.weights
        np.testing.assert_array_equal(s.embed(steps_data()[0][0][0]), ref.embed(steps_data()[0][0][0]))
    group.close()
    for address in replicas.addresses:
        with pytest.raises(embtrain.NotFound):
            embtrain.Client(address).get_session(group.id)
    for k in range(replicas.size):  # the digests were compared after every step, and agreed
        assert "differs between replicas" not in replicas.log(k)


def test_the_state_digest_sees_every_bit_of_the_state(tmp_path: pathlib.Path) -> None:
    """What the replicas compare every digest_every_steps steps: equal for equal states (whenever they were created
    or saved), different after any change of a weight's bits, the step or the memory bank."""
    import torch

    from embtrain_server import checkpoint, losses, training
    from embtrain_server.compute import ComputeOptions
    from embtrain_server.replicas import state_digest
    from embtrain_server.sessions import Session, parse_spec

    losses.load_all()
    cfg = {k: v for k, v in CONFIG.items() if k not in ("loss", "params", "seed")}
    spec = parse_spec(CONFIG["loss"], CONFIG["params"], cfg["head"], cfg["optimizer"], cfg["memory"], 5)
    a = Session(id="s", owner="o", spec=spec, device=torch.device("cpu"))
    x, y = steps_data()[0][1]
    training.prepare(a, {"embeddings": torch.from_numpy(x), "labels": torch.from_numpy(y)}, ComputeOptions(),
                     "input").commit()
    a.step = 1
    b = checkpoint.session_from_checkpoint(*checkpoint.decode(checkpoint.encode(
        *checkpoint.session_to_checkpoint(a))), torch.device("cpu"))
    b.created_time += 100.0
    assert state_digest(a) == state_digest(b)
    weight = next(iter(b.state.head.parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(float("inf")))
    assert state_digest(a) != state_digest(b)
    b.step = 2
    c = checkpoint.session_from_checkpoint(*checkpoint.decode(checkpoint.encode(
        *checkpoint.session_to_checkpoint(a))), torch.device("cpu"))
    c.step = 2
    assert state_digest(a) != state_digest(c)


def test_a_withheld_member_aborts_the_step_on_every_replica(replicas: process.ReplicaGroup,
                                                            reference: embtrain.Client) -> None:
    client = replicas.client()
    cfg = dict(CONFIG)
    group = client.create_session(cfg.pop("loss"), cfg.pop("params"), group_size=W, replicated=True,
                                  group_timeout=1.5, **cfg)
    ref = reference.create_session(CONFIG["loss"], CONFIG["params"], **{k: v for k, v in CONFIG.items()
                                                                         if k not in ("loss", "params")})
    parts = steps_data()[0]
    got = run_members({r: (lambda r=r: group.member(r).compute(*parts[r], step=1)) for r in (0, 1, 3)})
    for r in (0, 1, 3):
        assert isinstance(got[r], embtrain.Aborted), got[r]
        assert got[r].missing_ranks == [2]
    for s in replica_sessions(replicas, group.id):
        assert s.info().step == 0
    # The group survived: the whole step, resent, commits, and equals the reference.
    got = replicated_step(group, parts, 1)
    want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    assert_member_answers(got, want, parts)
    for s in replica_sessions(replicas, group.id):
        assert s.info().step == 1 and s.export_model().weights == ref.export_model().weights
    group.close()


def test_bad_input_is_refused_on_every_replica(replicas: process.ReplicaGroup) -> None:
    client = replicas.client()
    cfg = dict(CONFIG)
    group = client.create_session(cfg.pop("loss"), cfg.pop("params"), group_size=W, replicated=True,
                                  group_timeout=20, **cfg)
    good = steps_data()
    assert all(not isinstance(v, Exception) for v in replicated_step(group, good[0], 1).values())
    weights = group.export_model().weights
    bad = [(x.astype(np.float64) if r == 2 else x, y) for r, (x, y) in enumerate(good[1])]  # dtypes disagree
    got = replicated_step(group, bad, 2)
    for r in range(W):
        assert isinstance(got[r], embtrain.InvalidArgument), got[r]
        assert "inputs.embeddings" in got[r].fields
    for s in replica_sessions(replicas, group.id):
        assert s.info().step == 1 and s.export_model().weights == weights
    assert all(not isinstance(v, Exception) for v in replicated_step(group, good[1], 2).values())
    group.close()


def test_a_replicated_session_needs_replicas(reference: embtrain.Client) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        reference.create_session("batch_hard_triplet", group_size=2, replicated=True)
    assert info.value.fields == ["config.replicated"]


@pytest.mark.parametrize("lost", [1, 0], ids=["replica1", "replica0-the-store"])
def test_a_lost_replica_is_named_and_the_group_forms_again(tmp_path: pathlib.Path, reference: embtrain.Client,
                                                            lost: int) -> None:
    """SIGKILL one replica (replica 0 also keeps the group's store): the other names it within replica_timeout
    and goes on serving its ordinary sessions; the replica restarts from its own state_dir (its checkpoint is
    older), the group forms again, levels the session and the next step equals one server's."""
    other = 1 - lost
    with process.replica_group(tmp_path, 2, *COMMON, "--replica-timeout", "1.5") as c:
        client = c.client(retries=0)
        cfg = dict(CONFIG)
        group = client.create_session(cfg.pop("loss"), cfg.pop("params"), group_size=W, replicated=True, **cfg)
        ref = reference.create_session(CONFIG["loss"], CONFIG["params"], **{k: v for k, v in CONFIG.items()
                                                                             if k not in ("loss", "params")})
        data = steps_data()
        plain = embtrain.Client(c.addresses[other]).create_session("batch_hard_triplet")  # on one replica only
        for step in (1, 2):
            replicated_step(group, data[step - 1], step)
            ref.compute(np.concatenate([p[0] for p in data[step - 1]]),
                        np.concatenate([p[1] for p in data[step - 1]]))
        c.kill(lost)
        killed = time.monotonic()
        survivor = embtrain.Client(c.addresses[other], retries=0).get_session(group.id)
        while True:  # within replica_timeout (+ a heartbeat), the survivor names the lost replica
            try:
                survivor.member(other).compute(*data[2][other], step=3, timeout=5)
            except embtrain.Unavailable as exc:
                assert f"replica {lost}" in str(exc) and c.addresses[lost] in str(exc), exc
                break
            except embtrain.EmbtrainError:
                pass
            assert time.monotonic() - killed < 10, "the survivor did not notice the lost replica"
        # Sessions that are not replicated go on.
        assert plain.compute(*data[0][3]).ok
        # The replica comes back (from its own state_dir): the group forms again, the session continues.
        c.spawn(lost)
        c.wait(lost)
        deadline = time.monotonic() + 60
        while True:
            got = replicated_step(group, data[2], 3)
            if not any(isinstance(v, embtrain.Unavailable) for v in got.values()):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.5)
        want = ref.compute(np.concatenate([p[0] for p in data[2]]), np.concatenate([p[1] for p in data[2]]))
        assert_member_answers(got, want, data[2])
        for s in replica_sessions(c, group.id):
            assert s.info().step == 3 and s.export_model().weights == ref.export_model().weights
        assert f"took step 2 from replica {other}" in c.log(lost)


SHARD_CONFIG: dict[str, Any] = dict(CONFIG, optimizer={"type": "sgd", "lr": 0.1})
SHARD_RTOL = 1e-5  # float32: the replicas sum their partial losses and gradients in another order than one server


@pytest.mark.parametrize("loss, params", [("batch_hard_triplet", {"margin": 0.2}),
                                          ("multi_similarity", {}), ("contrastive", {"margin": 1.5})])
def test_shard_mode_is_one_server_within_round_off(replicas: process.ReplicaGroup, reference: embtrain.Client,
                                                    loss: str, params: dict[str, Any]) -> None:
    """Each replica computes its share of the anchors; loss, gradients and the head's weights stay within float32
    round-off of one server's (max |difference| / max |value| <= 1e-5 after three SGD steps), the mined triplets
    are the same, and every replica holds bit-identical state (they apply the same summed gradients)."""
    client = replicas.client()
    cfg = {k: v for k, v in SHARD_CONFIG.items() if k not in ("loss", "params")}
    group = client.create_session(loss, params, group_size=W, shard=True, **cfg)
    ref = reference.create_session(loss, params, **cfg)

    def close(a: np.ndarray, b: np.ndarray) -> None:
        assert a.shape == b.shape
        if not b.size:
            return
        scale = max(float(np.abs(b).max()), 1e-30)
        assert float(np.abs(a - b).max()) / scale <= SHARD_RTOL

    for step, parts in enumerate(steps_data(), start=1):
        got = replicated_step(group, parts, step, seed=step)
        want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        offset = 0
        for r, (x, _) in enumerate(parts):
            res = got[r]
            assert not isinstance(res, Exception), res
            assert abs(res.loss - want.loss) <= SHARD_RTOL * max(abs(want.loss), 1e-30)
            close(res.gradient, want.gradient[offset:offset + len(x)])
            if want.triplets is None:  # a loss that mines none
                assert res.triplets is None
            else:
                mine = ((want.triplets >= offset) & (want.triplets < offset + len(x))).any(1)
                np.testing.assert_array_equal(res.triplets, want.triplets[mine])
            assert res.triplets_total == want.triplets_total
            offset += len(x)
    weights = [s.export_model().weights for s in replica_sessions(replicas, group.id)]
    assert all(w == weights[0] for w in weights)  # identical on every replica
    from safetensors.numpy import load as st_load
    mine, theirs = st_load(weights[0]), st_load(ref.export_model().weights)
    for name in theirs:
        close(mine[name], theirs[name])
    assert group.info().config["shard"] is True
    group.close()


def test_shard_mode_refuses_a_loss_that_cannot_split_its_anchors(replicas: process.ReplicaGroup) -> None:
    with pytest.raises(embtrain.InvalidArgument) as info:
        replicas.client().create_session("island", {"num_classes": 3}, group_size=W, shard=True)
    assert info.value.fields == ["config.shard"]


def test_members_may_send_to_any_replica(replicas: process.ReplicaGroup, reference: embtrain.Client) -> None:
    """``Client(replica).get_session(id).member(r)`` works on every replica: here member r sends step s to replica
    (r + s) mod R, so every step's slices reach the replicas in a different pattern (and a member may reach a
    replica that is still applying the previous step); the answers are still one server's, bit for bit."""
    cfg = dict(CONFIG)
    group = replicas.client().create_session(cfg.pop("loss"), cfg.pop("params"), group_size=W, replicated=True,
                                             **cfg)
    ref = reference.create_session(CONFIG["loss"], CONFIG["params"], **{k: v for k, v in CONFIG.items()
                                                                         if k not in ("loss", "params")})
    direct = [embtrain.Client(a).get_session(group.id) for a in replicas.addresses]
    for step, parts in enumerate(steps_data(), start=1):
        got = run_members({r: (lambda r=r: direct[(r + step) % replicas.size].member(r).compute(*parts[r],
                                                                                    step=step))
                           for r in range(W)}, seed=step)
        want = ref.compute(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        assert_member_answers(got, want, parts)
    group.close()
