"""Group steps benchmark (``make bench-groups``): what a group step costs against one ``Compute`` of the same
rows, and what mining across workers gains.

* **Cost**: a global batch of N rows (d = 128) sent as W = 1, 2, 4, 8 member slices (one client and one thread per
  member, loopback) against one ``Compute`` of the N rows on a plain session, in the same server and run: median
  wall time of a step (first slice sent to last answer received) over the repeats, and the ratio.
* **Mining**: active triplets per anchor of ``batch_all_triplet`` (margin 0.2) on scikit-learn's digits embedded
  by a fixed random projection, mined over the whole step (group step) against each worker's slice alone (what an
  in-process loss on each worker sees), same rows.

    python bench/groups.py [--rows 1024] [--repeats 15] [--out bench/results/groups-cpu.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

import embtrain
from embtrain_server import process

HERE = pathlib.Path(__file__).resolve().parent
LOSS, PARAMS = "batch_hard_triplet", {"margin": 0.2}


def batch(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), (np.arange(n) % 32).astype(np.int64)


def group_step_seconds(clients: list[embtrain.Client], session_id: str, x: np.ndarray, y: np.ndarray,
                       step: int) -> float:
    w = len(clients)
    cuts = np.linspace(0, len(x), w + 1).astype(int)
    barrier = threading.Barrier(w + 1)
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        lo, hi = cuts[rank], cuts[rank + 1]
        m = embtrain.Session(clients[rank], session_id).member(rank)
        barrier.wait()
        try:
            m.compute(x[lo:hi], y[lo:hi], step=step, return_triplets=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(w)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def cost(target: str, rows: int, d: int, members: list[int], repeats: int) -> list[dict[str, Any]]:
    out = []
    with embtrain.Client(target) as client:
        plain = client.create_session(LOSS, PARAMS)
        clients = [embtrain.Client(target) for _ in range(max(members))]
        try:
            sessions = {w: client.create_session(LOSS, PARAMS, group_size=w) for w in members}
            single, group = [], {w: [] for w in members}
            for rep in range(repeats + 2):  # interleaved, the first two rounds are warm-up
                x, y = batch(rows, d, rep)
                t0 = time.perf_counter()
                plain.compute(x, y, return_triplets=False)
                t_single = time.perf_counter() - t0
                t_group = {w: group_step_seconds(clients[:w], sessions[w].id, x, y, rep + 1) for w in members}
                if rep >= 2:
                    single.append(t_single)
                    for w in members:
                        group[w].append(t_group[w])
        finally:
            for c in clients:
                c.close()
    base = statistics.median(single)
    for w in members:
        med = statistics.median(group[w])
        out.append({"members": w, "rows": rows, "d": d, "compute_ms": 1e3 * base, "group_step_ms": 1e3 * med,
                    "ratio": med / base})
        print(f"  W={w}: group step {1e3 * med:7.2f} ms, one Compute {1e3 * base:7.2f} ms -> {med / base:.2f}x",
              flush=True)
    return out


def mining(target: str, members: list[int], rows: int = 512) -> list[dict[str, Any]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(x), rows, replace=False)
    emb = (x[idx] @ (rng.standard_normal((64, 16)) / 8.0)).astype(np.float32)
    labels = y[idx].astype(np.int64)
    out = []
    with embtrain.Client(target) as client:
        whole = client.compute(emb, labels, loss="batch_all_triplet", params={"margin": 0.2}, max_triplets=1)
        for w in members:
            cuts = np.linspace(0, rows, w + 1).astype(int)
            alone = sum(client.compute(emb[lo:hi], labels[lo:hi], loss="batch_all_triplet", params={"margin": 0.2},
                                       max_triplets=1).triplets_total for lo, hi in zip(cuts[:-1], cuts[1:]))
            out.append({"members": w, "rows": rows, "global_per_anchor": whole.triplets_total / rows,
                        "per_worker_per_anchor": alone / rows, "gain": whole.triplets_total / max(alone, 1)})
            print(f"  W={w}: active triplets per anchor {whole.triplets_total / rows:.1f} global, "
                  f"{alone / rows:.1f} per worker -> {whole.triplets_total / max(alone, 1):.2f}x", flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Group steps ({result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}; `python bench/groups.py`). Median of {result['repeats']} steps.", "",
             "| members W | rows N | d | one Compute (ms) | group step (ms) | group / Compute |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["cost"]:
        lines.append(f"| {r['members']} | {r['rows']} | {r['d']} | {r['compute_ms']:.2f} | {r['group_step_ms']:.2f} | "
                     f"{r['ratio']:.2f}x |")
    lines += ["", "Mining across workers (`batch_all_triplet`, margin 0.2, digits through a fixed projection):", "",
              "| members W | rows | active triplets per anchor, global | per worker alone | gain |",
              "|---:|---:|---:|---:|---:|"]
    for r in result["mining"]:
        lines.append(f"| {r['members']} | {r['rows']} | {r['global_per_anchor']:.1f} | {r['per_worker_per_anchor']:.1f} |"
                     f" {r['gain']:.2f}x |")
    return "\n".join(lines)


def write_markdown(text: str, path: pathlib.Path) -> None:
    begin, end = "<!-- groups:begin -->", "<!-- groups:end -->"
    doc = path.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n## Group steps\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--members", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "groups-cpu.json"))
    ap.add_argument("--markdown", nargs="?", const=str(HERE / "README.md"), default=None)
    args = ap.parse_args(argv)
    members = [int(w) for w in args.members.split(",")]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}
    with process.running(["--metrics-port", "0", "--device", "cpu", "--no-persist", "--log-level", "WARNING"]) \
            as (target, _):
        print("cost:", flush=True)
        cost_rows = cost(target, args.rows, args.d, members, args.repeats)
        print("mining:", flush=True)
        mining_rows = mining(target, members)
    result = {"machine": machine, "repeats": args.repeats, "cost": cost_rows, "mining": mining_rows}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_markdown(markdown(result), pathlib.Path(args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
