"""A data pipeline whose workers feed one session's group steps and collect dataset-level hard triplets by id.

W worker processes (plain ``multiprocessing``) each load their shard of every step of scikit-learn's digits,
embed it with a fixed encoder (a seeded random projection: a stand-in for a frozen model) and send it as member
``rank`` of a session created with ``group_size=W``, with the rows' dataset indices as ``ids``. The server mines
batch-hard triplets over the whole step, across all workers, and each worker receives the triplets that touch its
rows as dataset ids (``triplet_ids``). The main process gathers them, and compares with what the same workers
would mine each on its own shard (per-worker mining, as an in-process loss would).

    python examples/pipeline/pipeline.py --target 127.0.0.1:50051 [--workers 3] [--steps 10] [--batch 48]

Prints, per step, the hard triplets found across workers and within workers alone, and the total.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

import embtrain

LOSS, PARAMS = "batch_hard_triplet", {"margin": 0.5}


def step_rows(step: int, batch: int, rows: int, seed: int = 0) -> np.ndarray:
    """The dataset rows of one step (the pipeline's sampler)."""
    return np.random.default_rng(seed + step).choice(rows, batch, replace=False)


def shard(ids: np.ndarray, rank: int, workers: int) -> np.ndarray:
    return ids[rank::workers]


def embed(x: np.ndarray) -> np.ndarray:
    projection = np.random.default_rng(7).standard_normal((x.shape[1], 16)) / 8.0
    return (x @ projection).astype(np.float32)


def worker(rank: int, workers: int, target: str, session_id: str, steps: int, batch: int, out: Any) -> None:
    x, y = load_digits(return_X_y=True)
    with embtrain.Client(target) as client:
        member = client.get_session(session_id).member(rank)
        for step in range(1, steps + 1):
            ids = shard(step_rows(step, batch, len(x)), rank, workers)
            r = member.compute(embed(x[ids]), y[ids], step=step, ids=ids.astype(np.int64))
            alone = client.compute(embed(x[ids]), y[ids], loss=LOSS, params=PARAMS) if len(ids) > 1 else None
            out.put((step, rank, r.triplet_ids.tolist(), 0 if alone is None else int(alone.triplets_total)))


def run(target: str, workers: int = 3, steps: int = 10, batch: int = 48) -> dict[int, set[tuple[int, int, int]]]:
    """Run the pipeline; the dataset-level hard triplets of each step, as (anchor, positive, negative) ids."""
    with embtrain.Client(target) as client:
        session = client.create_session(LOSS, PARAMS, group_size=workers, group_timeout=120)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(r, workers, target, session.id, steps, batch, out), daemon=True)
                 for r in range(workers)]
        for p in procs:
            p.start()
        found: dict[int, set[tuple[int, int, int]]] = {s: set() for s in range(1, steps + 1)}
        alone: dict[int, int] = {s: 0 for s in range(1, steps + 1)}
        try:
            for _ in range(steps * workers):
                step, _rank, triplet_ids, within = out.get(timeout=120)
                found[step].update(map(tuple, triplet_ids))
                alone[step] += within
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        for s in range(1, steps + 1):
            print(f"step {s:3d}: {len(found[s]):4d} hard triplets across {workers} workers, {alone[s]:4d} within "
                  "workers alone", flush=True)
        print(f"total: {sum(len(v) for v in found.values())} dataset-level hard triplets over {steps} steps")
        return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=os.environ.get("EMBTRAIN_TARGET", "127.0.0.1:50051"))
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=48)
    args = ap.parse_args(argv)
    run(args.target, args.workers, args.steps, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
