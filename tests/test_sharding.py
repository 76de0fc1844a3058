"""Shard mode (``embtrain_server.sharding``): replicas hold the same global batch and each computes the loss terms
of its own anchors; ``compute.forward_backward(shard=...)`` sums and gathers the shares.

Real gloo process groups on 127.0.0.1 with R = 2 and R = 3 processes (this file run as a script is the worker)
compute every case below; one process here computes the same cases with ``shard=None``. Asserted: the summed
loss, the full input gradient, the head's parameter gradients, per-item losses and stats agree within
``TOL`` relative to the largest reference magnitude (float64 1e-12; float32, and everything behind a float32
head, 1e-5); triplets (capped and uncapped), their ids, ``triplets_total`` and ``truncated`` are equal exactly;
and every replica returns bitwise the same result (so their optimisers make identical updates). The largest
differences observed are printed (``pytest -s``). Also: ``Shard.rows``, uneven ``all_gather`` and ``all_reduce``
for several dtypes, and the refusal of a non-shardable loss.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import importlib
import pytest
import torch

from embtrain_server import compute, sharding
from embtrain_server.errors import FailedPrecondition
from embtrain_server.losses import all_losses, get, load_all
from embtrain_server.losses import _mining as mining
from embtrain_server.losses.base import Memory
from embtrain_server.validation import validate_inputs

SHARDABLE = {"batch_hard_triplet", "batch_all_triplet", "contrastive", "multi_similarity"}
IS_WORKER = __name__ == "__main__" and sys.argv[1:2] == ["--worker"]
if IS_WORKER:  # only the losses under test: the optional extras take seconds to import in every worker
    for _name in sorted(SHARDABLE):
        importlib.import_module(f"embtrain_server.losses.{_name}")
else:
    load_all()
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # relative to the largest magnitude of the reference
WORLDS = (2, 3)
GROUP_TIMEOUT_S = 150  # the whole group, start-up included; every worker is killed after it


# ---- the cases (built identically here and in every worker) -----------------------------------------------------

def _case(name: str, loss: str, params: dict[str, Any] | None = None, *, n: int = 40, d: int = 8, classes: int = 5,
          head: int = 0, memory: int = 0, max_triplets: int = 100_000, triplets: bool = True,
          small_blocks: bool = False, dtypes: tuple[str, ...] = ("float64", "float32")) -> dict[str, Any]:
    return {"name": name, "loss": loss, "params": params or {}, "n": n, "d": d, "classes": classes, "head": head,
            "memory": memory, "max_triplets": max_triplets, "triplets": triplets, "small_blocks": small_blocks,
            "dtypes": dtypes}


BASE_CASES = [
    _case("bh", "batch_hard_triplet"),
    _case("bh_soft_capped", "batch_hard_triplet", {"soft": True}, max_triplets=7),
    _case("bh_memory", "batch_hard_triplet", {"margin": 0.5}, memory=24),
    _case("bh_head", "batch_hard_triplet", head=6),
    _case("bh_one_class", "batch_hard_triplet", classes=1),  # nothing selected anywhere
    _case("ba_mean", "batch_all_triplet"),
    _case("ba_mean_nonzero_capped", "batch_all_triplet", {"reduction": "mean_nonzero", "margin": 0.5},
          max_triplets=50),
    _case("ba_sum_soft_capped", "batch_all_triplet", {"reduction": "sum", "soft": True}, max_triplets=1000),
    _case("ba_memory", "batch_all_triplet", {"margin": 1.0}, memory=24),
    _case("ba_head_memory", "batch_all_triplet", {"margin": 1.0}, head=6, memory=16),
    _case("ba_no_triplets", "batch_all_triplet", triplets=False),
    _case("ba_two_rows", "batch_all_triplet", {"margin": 5.0}, n=2, classes=2, memory=6),  # R=3: a shard has no row
    _case("con_mean", "contrastive", {"margin": 3.0}),
    _case("con_sum_memory", "contrastive", {"margin": 3.0, "reduction": "sum"}, memory=24),
    _case("con_head", "contrastive", head=6),
    _case("ms", "multi_similarity"),
    _case("ms_memory", "multi_similarity", memory=24),
    _case("ms_head", "multi_similarity", head=6),
    # many anchor blocks per shard (blocks start at the shard's first row), chunked triplet evaluation
    _case("bh_blocks_memory", "batch_hard_triplet", memory=10, small_blocks=True),
    _case("ba_blocks_capped", "batch_all_triplet", {"margin": 1.0}, small_blocks=True, max_triplets=300),
    _case("ba_blocks_soft_memory", "batch_all_triplet", {"soft": True}, memory=10, small_blocks=True),
    # large enough for the Gram-form distances on one process (n·m·d > SMALL_WORK) while the shards' blocks may
    # take the difference form: float64 only, since float32 round-off of that size may flip a near-tie in mining
    _case("bh_large", "batch_hard_triplet", n=400, d=64, classes=20, dtypes=("float64",)),
    _case("ba_large", "batch_all_triplet", {"margin": 1.0}, n=400, d=64, classes=20, max_triplets=5000,
          dtypes=("float64",)),
    _case("con_large", "contrastive", {"margin": 12.0}, n=400, d=64, classes=20, dtypes=("float64",)),
    _case("ms_large", "multi_similarity", n=400, d=64, classes=20, dtypes=("float64",)),
]
CASES = [dict(c, name=f"{c['name']}-{dt}", dtype=dt) for c in BASE_CASES for dt in c["dtypes"]]


def build(case: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(loss, validated inputs, keyword arguments of forward_backward) for ``case``; deterministic."""
    g = torch.Generator().manual_seed(1000 + sum(map(ord, case["name"])))
    dtype = getattr(torch, case["dtype"])
    n, d = case["n"], case["d"]
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, case["classes"], (n,), generator=g)
    head = None
    trainable: list[torch.nn.Parameter] = []
    if case["head"]:
        head = torch.nn.Sequential(torch.nn.Linear(d, case["head"]))  # float32, as the server's heads
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).sub(0.5).mul(0.8))
        trainable = list(head.parameters())
    memory = None
    if case["memory"]:
        m = case["memory"]
        mem_dtype = torch.float32 if head is not None else dtype
        memory = Memory(torch.randn(m, case["head"] or d, generator=g, dtype=torch.float64).to(mem_dtype),
                        torch.randint(0, case["classes"], (m,), generator=g), torch.arange(m) + 5000)
    loss = get(case["loss"])(case["params"])
    inputs = validate_inputs(type(loss), {"embeddings": x, "labels": y, "ids": torch.arange(n) + 100},
                             max_batch_elements=1 << 30)
    loss.check_inputs(inputs)
    options = compute.ComputeOptions(max_triplets=case["max_triplets"], triplets=case["triplets"], per_item=True)
    return loss, inputs, {"device": torch.device("cpu"), "options": options, "head": head, "memory": memory,
                          "trainable": trainable}


def run_case(case: dict[str, Any], shard: sharding.Shard | None) -> dict[str, Any]:
    loss, inputs, kwargs = build(case)
    saved = dict(mining.BLOCK_ELEMS), mining.CHUNK_ELEMS
    if case["small_blocks"]:
        mining.BLOCK_ELEMS["cpu"], mining.CHUNK_ELEMS = 64, 48  # 1-2 anchor rows per block, 6 triplets per chunk
    try:
        p = compute.forward_backward(loss, inputs, shard=shard, **kwargs)
    finally:
        mining.BLOCK_ELEMS.update(saved[0])
        mining.CHUNK_ELEMS = saved[1]
    r = p.result
    return {"loss": r.loss, "gradients": r.gradients, "triplets": r.triplets, "triplets_total": r.triplets_total,
            "truncated": r.truncated, "triplet_ids": r.triplet_ids, "per_item": r.per_item, "stats": r.stats,
            "param_grads": [g for _, g in p.param_grads]}


def compute_dtype(case: dict[str, Any]) -> torch.dtype:
    return torch.float32 if case["head"] else getattr(torch, case["dtype"])


# ---- collectives: what each rank contributes, and what all_gather / all_reduce must give -------------------------

GATHER_DTYPES = ("float64", "float32", "bfloat16", "int64", "int32", "uint8", "bool")
REDUCE_DTYPES = ("float64", "float32", "int64", "int32", "bool")


def gather_piece(rank: int, dtype: str, flat: bool) -> torch.Tensor:
    rows = [0, 3, 1, 2][rank % 4]  # uneven, rank 0 empty
    v = torch.arange(rows * 2, dtype=torch.float64).reshape(rows, 2) + 10 * rank + 1
    t = (v % 2 == 0) if dtype == "bool" else v.to(getattr(torch, dtype))
    return t.reshape(-1) if flat else t


def reduce_piece(rank: int, dtype: str) -> torch.Tensor:
    if dtype == "bool":
        return torch.tensor([False, rank == 1, True, False])
    return (torch.arange(4, dtype=torch.float64) * (rank + 1) + 0.5 * (dtype.startswith("float"))).to(
        getattr(torch, dtype))


def collective_checks(shard: sharding.Shard) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dt in GATHER_DTYPES:
        for flat in (False, True):
            out[f"gather-{dt}-{flat}"] = shard.all_gather(gather_piece(shard.index, dt, flat))
    out["gather-scalar"] = shard.all_gather(torch.tensor(float(shard.index)))
    for dt in REDUCE_DTYPES:
        t = reduce_piece(shard.index, dt)
        out[f"reduce-{dt}"] = (shard.all_reduce(t), t)
    return out


# ---- the worker (this file run as a script) ------------------------------------------------------------------------

def worker(rank: int, world: int, port: int, out_dir: pathlib.Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        shard = sharding.from_process_group()
        assert (shard.index, shard.count) == (rank, world)
        result = {"collectives": collective_checks(shard),
                  "cases": {c["name"]: run_case(c, shard) for c in CASES}}
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_group(world: int, out_dir: pathlib.Path) -> list[subprocess.Popen[bytes]]:
    """Start the ``world`` worker processes of one gloo group (their output goes to ``rank<r>.log``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    for r in range(world):
        with open(out_dir / f"rank{r}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", str(r), str(world), str(port), str(out_dir)],
                stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def run_groups(dirs: dict[int, pathlib.Path]) -> dict[int, list[dict[str, Any]]]:
    """Run one gloo group per world size at once; wait for every worker, killing all that are left at the
    deadline or once any has failed; return each group's per-rank results."""
    groups: dict[int, list[subprocess.Popen[bytes]]] = {}
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    logs = [d / f"rank{r}.log" for w, d in dirs.items() for r in range(w)]

    def everyone() -> list[subprocess.Popen[bytes]]:
        return [p for ps in groups.values() for p in ps]

    try:
        for world, out_dir in dirs.items():
            groups[world] = start_group(world, out_dir)
        while any(p.poll() is None for p in everyone()):
            if time.monotonic() > deadline:
                pytest.fail(f"the gloo groups did not finish within {GROUP_TIMEOUT_S} s:\n" + _tails(logs))
            if any(p.returncode not in (None, 0) for p in everyone()):
                break  # one failed: its peers would wait for it in a collective
            time.sleep(0.05)
    finally:
        for p in everyone():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    codes = {world: [p.returncode for p in ps] for world, ps in groups.items()}
    assert all(c == [0] * w for w, c in codes.items()), f"worker exit codes {codes}:\n{_tails(logs)}"
    return {world: [torch.load(dirs[world] / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for world in dirs}


def _tails(logs: list[pathlib.Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


# ---- comparison ----------------------------------------------------------------------------------------------------

def rel_diff(a: torch.Tensor | None, b: torch.Tensor | None, floor: float = 0.0) -> float:
    """max |a - b| / max(max |b|, floor) (max |a - b| when that is 0). ``floor``: the scale of the terms a sum
    of nearly cancelling terms adds up (a head's bias gradient sums the rows' gradients, about 0 for a
    translation-invariant loss)."""
    assert (a is None) == (b is None)
    if a is None or b is None:
        return 0.0
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if b.numel() == 0:
        return 0.0
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    scale = max(float(b64.abs().max()), floor)
    diff = float((a64 - b64).abs().max())
    return diff / scale if scale > 0 else diff


def scalar_rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else abs(a - b)


OBSERVED: dict[tuple[int, str], float] = {}


@pytest.fixture(scope="module")
def all_groups(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    return run_groups({world: tmp_path_factory.mktemp(f"gloo{world}") for world in WORLDS})


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"R{w}")
def group(request: pytest.FixtureRequest, all_groups: dict[int, list[dict[str, Any]]]) -> tuple[int, list[dict]]:
    return request.param, all_groups[request.param]


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    return {c["name"]: run_case(c, None) for c in CASES}


def teardown_module() -> None:
    if OBSERVED:
        print("\nlargest relative differences, shard mode vs one process:")
        for (world, dt), v in sorted(OBSERVED.items()):
            print(f"  R={world} {dt}: {v:.3g} (tolerance {TOL[getattr(torch, dt)]:g})")


# ---- tests ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 101])
def test_rows_partition_the_batch_in_index_order(count: int, n: int) -> None:
    ranges = [sharding.Shard(i, count, lambda t: t, lambda t: [t]).rows(n) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, e), (s, _) in zip(ranges, ranges[1:]):
        assert e == s
    sizes = [e - s for s, e in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert ranges == [(n * i // count, n * (i + 1) // count) for i in range(count)]


def test_shard_index_is_checked() -> None:
    with pytest.raises(ValueError):
        sharding.Shard(2, 2, lambda t: t, lambda t: [t])
    with pytest.raises(ValueError):
        sharding.Shard(0, 0, lambda t: t, lambda t: [t])


def test_local_shard_is_one_process() -> None:
    shard = sharding.local()
    assert (shard.index, shard.count, shard.rows(9)) == (0, 1, (0, 9))
    t = torch.arange(3.0)
    s = shard.all_reduce(t)
    assert torch.equal(s, t) and s is not t
    case = next(c for c in CASES if c["name"] == "ba_mean-float64")
    a, b = run_case(case, shard), run_case(case, None)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-14)
    assert rel_diff(a["gradients"]["embeddings"], b["gradients"]["embeddings"]) <= 1e-14
    assert torch.equal(a["triplets"], b["triplets"])


def test_only_the_sharded_losses_are_shardable() -> None:
    """The others stay ``shardable = False`` (a loss made shardable belongs in SHARDABLE and in CASES)."""
    flagged = {cls.name for cls in all_losses() if cls.shardable}
    assert flagged == SHARDABLE
    for cls in all_losses():
        if cls.shardable:
            assert not (cls.stateful and cls.has_update_rule)


def test_a_non_shardable_loss_is_refused_before_any_collective() -> None:
    def never(t: torch.Tensor) -> Any:
        raise AssertionError("no collective may run")

    two = sharding.Shard(0, 2, never, never)
    loss = get("triplet_margin")({})
    inputs = validate_inputs(type(loss), {"embeddings": torch.randn(6, 3, dtype=torch.float64),
                                          "labels": torch.tensor([0, 0, 1, 1, 2, 2])}, max_batch_elements=1 << 20)
    with pytest.raises(FailedPrecondition, match="cannot be sharded"):
        compute.forward_backward(loss, inputs, device=torch.device("cpu"), shard=two)
    # one replica: any loss computes the whole batch
    one = compute.forward_backward(loss, inputs, device=torch.device("cpu"), shard=sharding.Shard(0, 1, never, never))
    plain = compute.forward_backward(loss, inputs, device=torch.device("cpu"))
    assert one.result.loss == plain.result.loss and one.shard is None
    assert torch.equal(one.result.gradients["embeddings"], plain.result.gradients["embeddings"])


@pytest.mark.timeout(GROUP_TIMEOUT_S + 60)
def test_uneven_all_gather_and_all_reduce(group: tuple[int, list[dict]]) -> None:
    world, ranks = group
    for rank, res in enumerate(ranks):
        got = res["collectives"]
        for dt in GATHER_DTYPES:
            for flat in (False, True):
                parts = got[f"gather-{dt}-{flat}"]
                assert len(parts) == world
                for r, part in enumerate(parts):
                    want = gather_piece(r, dt, flat)
                    assert part.dtype == want.dtype and part.shape == want.shape and torch.equal(part, want), (dt, r)
        assert [float(t) for t in got["gather-scalar"]] == [float(r) for r in range(world)]
        assert all(t.shape == () for t in got["gather-scalar"])
        for dt in REDUCE_DTYPES:
            total, mine = got[f"reduce-{dt}"]
            pieces = [reduce_piece(r, dt) for r in range(world)]
            want = torch.stack(pieces).any(0) if dt == "bool" else sum(pieces[1:], pieces[0])
            assert total.dtype == want.dtype and torch.equal(total, want), dt
            assert torch.equal(mine, pieces[rank])  # the input is left alone


@pytest.mark.timeout(GROUP_TIMEOUT_S + 60)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_shards_sum_to_one_process(group: tuple[int, list[dict]], reference: dict[str, dict[str, Any]],
                                  case: dict[str, Any]) -> None:
    world, ranks = group
    ref = reference[case["name"]]
    got = ranks[0]["cases"][case["name"]]
    tol = TOL[compute_dtype(case)]
    diffs = [scalar_rel(got["loss"], ref["loss"])]
    assert set(got["gradients"]) == set(ref["gradients"]) == {"embeddings"}
    diffs.append(rel_diff(got["gradients"]["embeddings"], ref["gradients"]["embeddings"]))
    assert len(got["param_grads"]) == len(ref["param_grads"]) == (2 if case["head"] else 0)
    # scale of a parameter gradient: its own, or the weight gradient's (the largest) for a cancelling bias
    floor = max((float(g.abs().max()) for g in ref["param_grads"] if g.numel()), default=0.0)
    diffs += [rel_diff(a, b, floor) for a, b in zip(got["param_grads"], ref["param_grads"])]
    diffs.append(rel_diff(got["per_item"], ref["per_item"]))
    assert set(got["stats"]) == set(ref["stats"])
    diffs += [scalar_rel(got["stats"][k], ref["stats"][k]) for k in ref["stats"]]
    worst = max(diffs)
    key = (world, case["dtype"] if not case["head"] else "float32")
    OBSERVED[key] = max(OBSERVED.get(key, 0.0), worst)
    assert worst <= tol, (diffs, tol)
    assert math.isfinite(got["loss"])
    # triplets: exactly the same list, total and truncation
    assert got["triplets_total"] == ref["triplets_total"]
    assert got["truncated"] == ref["truncated"]
    for k in ("triplets", "triplet_ids"):
        assert (got[k] is None) == (ref[k] is None)
        if ref[k] is not None:
            assert torch.equal(got[k], ref[k]), k
    if case["loss"].endswith("triplet") and case["triplets"] and case["classes"] > 1:
        assert ref["triplets"].shape[0] > 0  # the case exercises the triplet lists
        if case["max_triplets"] < 100_000:
            assert ref["truncated"] and ref["triplets"].shape[0] == case["max_triplets"]
    # every replica holds bitwise the same result
    for other in ranks[1:]:
        o = other["cases"][case["name"]]
        assert o["loss"] == got["loss"] and o["stats"] == got["stats"]
        assert torch.equal(o["gradients"]["embeddings"], got["gradients"]["embeddings"])
        assert all(torch.equal(a, b) for a, b in zip(o["param_grads"], got["param_grads"]))
        for k in ("triplets", "per_item"):
            assert (o[k] is None and got[k] is None) or torch.equal(o[k], got[k])


if IS_WORKER:
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), pathlib.Path(sys.argv[5]))
