"""Time weighted_margin_ranking's forward + gradient, matrix form (every row an anchor) and vector form.

    .venv/bin/python bench/wmr_matrix.py [--matrix 500,1000,2000] [--vector 4096] [--dim 128] [--repeats 3]
                                          [--threads N] [--params '{"max_dist": 3.0}'] [--source FILE]

Each size reports the median wall time (and process CPU time, a steadier figure on a shared machine) of ``repeats``
forward + backward calls after one warm-up (one call and no warm-up with ``--repeats 1``), float32 embeddings,
random gt in [0, 5), mined triplets capped at 10 000 and no per_item (what a training client asks for).
``--source`` loads the loss class from another copy of ``weighted_margin_ranking.py`` (e.g. the output of
``git show HEAD:server/embtrain_server/losses/weighted_margin_ranking.py``) to time an older implementation in the
same process setup.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch

from embtrain_server.losses import ComputeContext, get, load_all


def _loss_class(source: str | None) -> type:
    load_all()
    if source is None:
        return get("weighted_margin_ranking")
    text = open(source).read().replace("@register\n", "")  # not registered twice under the same name
    name = "embtrain_server.losses._wmr_bench_alt"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "embtrain_server.losses"
    sys.modules[name] = module
    exec(compile(text, source, "exec"), module.__dict__)
    return module.WeightedMarginRankingLoss


def _time(cls: type, params: dict, n: int, d: int, matrix: bool, repeats: int) -> list[tuple[float, float]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    gt = torch.rand((n, n) if matrix else (n - 1,), generator=gen, dtype=torch.float64).mul(5).float()
    loss = cls(params)
    ctx = ComputeContext(device=torch.device("cpu"), max_triplets=10_000, want_triplets=True, want_per_item=False)
    times = []
    for _ in range(repeats + (1 if repeats > 1 else 0)):
        emb = x.detach().requires_grad_(True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = loss.forward({"embeddings": emb, "gt_distances": gt}, ctx)
        torch.autograd.grad(out.loss, emb)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times[1:] if repeats > 1 else times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", default="500,1000,2000")
    ap.add_argument("--vector", default="4096")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--source", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cls = _loss_class(args.source)
    params = json.loads(args.params)
    for form, sizes in (("matrix", args.matrix), ("vector", args.vector)):
        for n in [int(s) for s in sizes.split(",") if s]:
            times = _time(cls, params, n, args.dim, form == "matrix", args.repeats)
            wall = statistics.median(t for t, _ in times)
            cpu = statistics.median(c for _, c in times)
            print(f"{form:6s} n={n:5d} d={args.dim}: median wall {wall:8.3f} s, process CPU {cpu:8.3f} s  "
                  f"(wall {', '.join(f'{t:.3f}' for t, _ in times)}; torch threads {torch.get_num_threads()})",
                  flush=True)


if __name__ == "__main__":
    main()
