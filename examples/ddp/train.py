"""Two DDP ranks train one encoder with a remote loss mined over both ranks' rows.

Each of the W processes of a ``torch.distributed`` group (gloo on the CPU) holds its slice of every batch of
scikit-learn's digits, runs the encoder (wrapped in ``DistributedDataParallel``) on it and calls
``RemoteLoss(session)`` on a session created with ``group_size=W``: the server mines semi-hard triplets over the
concatenation of all slices, and each rank back-propagates its rows' gradient times W (DDP averages the ranks'
parameter gradients; see ``embtrain.torch.RemoteLoss``). A reference process trains a copy of the same encoder on
the concatenated batches with a plain session. After every step the script compares, on every rank, the
loss, the encoder's gradients and its parameters with the reference's.

    python examples/ddp/train.py --target 127.0.0.1:50051 [--world-size 2] [--steps 20] [--dtype float64]

Prints one line per step (loss, largest gradient and parameter differences) and exits 1 when a difference
exceeds the tolerance: float32 round-off (the all-reduce sums in another order), 1e-12 relative in float64.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn

import embtrain
from embtrain.torch import RemoteLoss

LOSS = "triplet_margin"
PARAMS = {"miner": "semihard", "margin": 0.2}
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}  # relative to the largest entry


def batches(steps: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced batches of standardised digits (8 classes x batch/8 rows)."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        classes = rng.choice(10, 8, replace=False)
        rows = np.concatenate([rng.choice(np.flatnonzero(y == c), batch // 8, replace=False) for c in classes])
        rng.shuffle(rows)
        out.append((torch.from_numpy(x[rows]), torch.from_numpy(y[rows])))
    return out


def encoder(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(dtype)


def bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Uneven slices: rank r holds rows [lo, hi) of each batch."""
    cuts = [0] + [round(n * (r + 1) / world + (1 if r == 0 else 0)) for r in range(world - 1)] + [n]
    return list(zip(cuts[:-1], cuts[1:]))


def worker(rank: int, world: int, port: int, target: str, session_id: str, steps: int, batch: int, dtype: str,
           results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        dt = getattr(torch, dtype)
        model = nn.parallel.DistributedDataParallel(encoder(dt))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with embtrain.Client(target) as client:
            loss_fn = RemoteLoss(client.get_session(session_id))  # rank, step and DDP factor from the group
            for x, y in batches(steps, batch):
                lo, hi = bounds(len(x), world)[rank]
                opt.zero_grad()
                loss = loss_fn(model(x[lo:hi].to(dt)), y[lo:hi])
                loss.backward()
                grads = [p.grad.numpy().copy() for p in model.parameters()]
                opt.step()
                results.put((rank, float(loss.detach()), grads, [p.detach().numpy().copy() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(target: str, world: int = 2, steps: int = 20, batch: int = 32, dtype: str = "float32") -> float:
    """Train and compare; returns the largest relative difference seen (gradients and parameters)."""
    with embtrain.Client(target) as client:
        group = client.create_session(LOSS, PARAMS, group_size=world, group_timeout=120)
        ref_session = client.create_session(LOSS, PARAMS)
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, target, group.id, steps, batch, dtype, results),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            dt = getattr(torch, dtype)
            ref = encoder(dt)
            opt = torch.optim.SGD(ref.parameters(), lr=0.05)
            ref_loss = RemoteLoss(ref_session)
            worst = 0.0
            for step, (x, y) in enumerate(batches(steps, batch), 1):
                opt.zero_grad()
                loss = ref_loss(ref(x.to(dt)), y)
                loss.backward()
                ref_grads = [p.grad.numpy().copy() for p in ref.parameters()]
                opt.step()
                for _ in range(world):
                    rank, got_loss, grads, params = results.get(timeout=120)
                    want = float(loss.detach())
                    worst = max(worst, _rel(grads, ref_grads), abs(got_loss - want) / abs(want),
                                _rel(params, [p.detach().numpy() for p in ref.parameters()]))
                print(f"step {step:3d}  loss {float(loss.detach()):.6f}  largest relative difference {worst:.2e}", flush=True)
            return worst
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()


def _rel(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest difference relative to the largest reference entry of all tensors (a tensor whose own entries
    are all near zero, such as the last bias's gradient under a translation-invariant loss, is no scale)."""
    scale = max(max(float(np.abs(w).max()) for w in want), 1e-30)
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=os.environ.get("EMBTRAIN_TARGET", "127.0.0.1:50051"))
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    args = ap.parse_args(argv)
    worst = run(args.target, args.world_size, args.steps, args.batch, args.dtype)
    ok = worst <= TOLERANCE[args.dtype]
    print(f"{'OK' if ok else 'FAILED'}: largest relative difference {worst:.2e} (tolerance {TOLERANCE[args.dtype]:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
