"""Loss benchmark: every native loss against its pytorch-metric-learning equivalent, same device, same run.

For each loss configuration, embedding size ``n`` (16 rows per class, classes shuffled) and width ``d``
(float32), each implementation runs in its own subprocess (so peak memory is clean and an out-of-memory
configuration cannot take the run down) and reports the median time of forward + backward over ``--repeats``
calls after one warm-up call (``--large-repeats`` calls from ``--large-n`` rows on), and its peak memory above the
level before the first call:

* CPU: the process's peak RSS (``ru_maxrss``) minus its RSS before the first call. The subprocess runs under an
  address-space limit (``RLIMIT_AS`` = its size before the first call + ``--mem-limit-gb``), so a configuration
  that needs more fails with "OOM" instead of swapping the machine.
* CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the first call; OOM is the CUDA one.

Time is wall-clock (``--clock wall``) or the calling thread's CPU time (``--clock cpu``, CPU only, meant for
``--threads 1`` where every operation runs on that thread): on a shared machine the CPU time leaves out the time the
process waited for a core. ``--rounds R`` runs the native and the PML subprocess of each row alternately R times and
keeps each one's fastest median, so that a burst of background load hits both alike or neither.

A configuration that runs longer than ``--timeout`` seconds is reported as "timeout"; after an OOM or a timeout the
larger sizes of the same implementation are skipped. The native losses are looked up through the registry by
name, so the benchmark runs with whichever of them exist. Both sides are differentiated with respect to the same
tensors (the embeddings; for island also the centres).

    python bench/losses.py [--device cpu|cuda] [--sizes 256,1024,4096,8192,16384] [--dims 128,512]
                           [--repeats 5] [--large-n 16384 --large-repeats 2] [--rounds 1] [--clock wall|cpu]
                           [--timeout 600] [--mem-limit-gb 8] [--threads N]
                           [--only batch_hard_triplet,...] [--no-pml]
                           [--out results.json] [--markdown table.md] [--from-json a.json,b.json]

Targets (CPU; issue 14): every native loss at least 1.5x faster than its PML configuration at every n from 256 to
16384 (d = 128 and 512), peak memory no worse than before; n=16384 within 8 GB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_LP = "LpDistance(normalize_embeddings=False)"


@dataclass(frozen=True)
class Case:
    label: str
    loss: str  # registry name
    params: dict[str, Any] = field(default_factory=dict)
    pml: str | None = None  # key into _pml_builders
    pml_desc: str = "none (no PML equivalent)"


_WMR_PML = ("TripletMarginLoss(margin=0.03, LpDistance(normalize_embeddings=False, power=2), MeanReducer()) with "
            "indices_tuple = (0, r+1, c+1) for every pair gt_r < gt_c (built inside the timed call)")
CASES = [
    Case("batch_hard_triplet", "batch_hard_triplet", {"margin": 0.3}, "batch_hard",
         f"BatchHardMiner({_LP}) + TripletMarginLoss(margin=0.3, {_LP}, MeanReducer())"),
    Case("batch_all_triplet", "batch_all_triplet", {"margin": 0.3}, "all",
         f"TripletMarginLoss(margin=0.3, {_LP}, MeanReducer()), no miner (all triplets)"),
    Case("triplet_margin[semihard]", "triplet_margin", {"miner": "semihard", "margin": 0.3}, "semihard",
         f"TripletMarginMiner(margin=0.3, type_of_triplets='semihard', {_LP}) + "
         f"TripletMarginLoss(margin=0.3, {_LP}, MeanReducer())"),
    Case("triplet_margin[all]", "triplet_margin", {"miner": "all", "margin": 0.3}, "all",
         f"TripletMarginLoss(margin=0.3, {_LP}, MeanReducer()), no miner (all triplets)"),
    Case("triplet_margin[batch_hard]", "triplet_margin", {"miner": "batch_hard", "margin": 0.3}, "batch_hard",
         f"BatchHardMiner({_LP}) + TripletMarginLoss(margin=0.3, {_LP}, MeanReducer())"),
    Case("contrastive", "contrastive", {}, "contrastive",
         f"ContrastiveLoss(pos_margin=0, neg_margin=1, {_LP}) (PML's non-squared variant)"),
    Case("multi_similarity", "multi_similarity", {}, "multi_similarity",
         "MultiSimilarityMiner(epsilon=0.1) + MultiSimilarityLoss(alpha=2, beta=50, base=0.5)"),
    Case("island", "island", {}, "island",
         "no center or island loss in PML; composed from its distances with a learnable centres tensor (n/16 "
         "classes, the gradient taken for the embeddings and the centres on both sides): "
         "0.5·LpDistance(normalize_embeddings=False, power=2)(x, C)[i, y_i] mean + 0.01·Σ_{j<k}(CosineSimilarity()(C)"
         " + 1); the native loss is the stateless call with the same centres (defaults: lambda1=0.01, unordered)"),
    Case("weighted_margin_ranking[unweighted]", "weighted_margin_ranking", {"weighted": False}, "wmr",
         f"{_WMR_PML}; the native loss with weighted=false (anchor row 0, the same pairs and margin: equal values)"),
    Case("weighted_margin_ranking", "weighted_margin_ranking", {}, None,
         "none: the weighted margin 0.03·(1 + gn_c − gn_r) has no PML equivalent (the [unweighted] row is the "
         "same selection with a constant margin)"),
]
MAX_TRIPLETS = 10_000  # mined triplets returned per call, as a server cap would


# ---- worker (one configuration, in a subprocess) -----------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vsz_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _pml_builders():  # type: ignore[no-untyped-def]
    from pytorch_metric_learning import distances, losses, miners, reducers

    def lp():  # type: ignore[no-untyped-def]
        return distances.LpDistance(normalize_embeddings=False)

    def triplet():  # type: ignore[no-untyped-def]
        return losses.TripletMarginLoss(margin=0.3, distance=lp(), reducer=reducers.MeanReducer())

    return {
        "batch_hard": lambda: (miners.BatchHardMiner(distance=lp()), triplet()),
        "all": lambda: (None, triplet()),
        "semihard": lambda: (miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=lp()),
                             triplet()),
        "contrastive": lambda: (None, losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0, distance=lp())),
        "multi_similarity": lambda: (miners.MultiSimilarityMiner(epsilon=0.1),
                                     losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)),
    }


def _inputs(case: Case, n: int, d: int, device):  # type: ignore[no-untyped-def]
    """The batch of one row: embeddings, labels (16 per class, shuffled) and the case's extra inputs."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    labels = (torch.arange(n) // 16)[torch.randperm(n, generator=gen)].to(device)
    extra: dict[str, Any] = {}
    if case.loss == "weighted_margin_ranking":
        extra["gt_distances"] = torch.rand(n - 1, generator=torch.Generator().manual_seed(2)).to(device)
    if case.loss == "island":
        k = int(labels.max()) + 1
        extra["centers"] = torch.randn(k, d, generator=torch.Generator().manual_seed(3)).to(device)
    return x, labels, extra


def _native_step(case: Case, x, labels, device, extra=None):  # type: ignore[no-untyped-def]
    import torch

    from embtrain_server.losses import ComputeContext, get, load_all

    load_all()
    cls = get(case.loss)
    n, d = x.shape
    params = dict(case.params)
    loss = cls(params)
    extra = dict(extra or {})
    names = {s.name for s in cls.inputs}
    if "labels" in names:
        extra["labels"] = labels
    diff = [s.name for s in cls.inputs if s.differentiable and s.name != "embeddings" and s.name in extra]
    ctx = ComputeContext(device=device, max_triplets=MAX_TRIPLETS, want_triplets=True, want_per_item=False)

    def step() -> None:
        emb = x.detach().requires_grad_(True)
        inputs = {**extra, "embeddings": emb}
        for name in diff:
            inputs[name] = extra[name].detach().requires_grad_(True)
        loss.check_inputs({k: v.cpu() for k, v in inputs.items()})
        out = loss.forward(inputs, ctx)
        if out.gradients is None:
            torch.autograd.grad(out.loss, [emb] + [inputs[name] for name in diff])

    return step


def _pml_step(case: Case, x, labels, extra=None):  # type: ignore[no-untyped-def]
    import torch

    extra = extra or {}
    if case.pml == "island":
        from pytorch_metric_learning import distances

        lp, cos = distances.LpDistance(normalize_embeddings=False, power=2), distances.CosineSimilarity()
        centers = extra["centers"]
        k = centers.shape[0]
        rows = torch.arange(x.shape[0], device=x.device)

        def island_step() -> None:
            emb = x.detach().requires_grad_(True)
            c = centers.detach().requires_grad_(True)
            center_loss = 0.5 * lp(emb, c)[rows, labels].sum() / emb.shape[0]
            sim = cos(c)
            island = 0.5 * (sim.sum() - sim.diagonal().sum()) + k * (k - 1) / 2
            (center_loss + 0.01 * island).backward()

        return island_step
    if case.pml == "wmr":
        from pytorch_metric_learning import distances, losses, reducers

        loss = losses.TripletMarginLoss(margin=0.03, reducer=reducers.MeanReducer(),
                                        distance=distances.LpDistance(normalize_embeddings=False, power=2))
        gt = extra["gt_distances"]

        def wmr_step() -> None:
            emb = x.detach().requires_grad_(True)
            r, c = (gt[:, None] < gt[None, :]).nonzero(as_tuple=True)  # r is closer to the anchor than c
            anchors = torch.zeros_like(r)
            value = loss(emb, indices_tuple=(anchors, r + 1, c + 1))
            value.backward()

        return wmr_step
    miner, loss = _pml_builders()[case.pml]()

    def step() -> None:
        emb = x.detach().requires_grad_(True)
        value = loss(emb, labels, miner(emb, labels) if miner is not None else None)
        value.backward()

    return step


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    n, d = spec["n"], spec["d"]
    x, labels, extra = _inputs(case, n, d, device)
    step = _native_step(case, x, labels, device, extra) if spec["impl"] == "native" else \
        _pml_step(case, x, labels, extra)
    clock = time.thread_time if spec.get("clock") == "cpu" and device.type == "cpu" else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        if spec.get("mem_limit_gb"):
            limit = _vsz_bytes() + int(spec["mem_limit_gb"] * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times = []
    for _ in range(spec["repeats"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"status": "ok", "median_s": statistics.median(times[1:]), "times_s": times[1:],
            "peak_bytes": max(int(peak), 0)}


def _worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = worker(spec)
    except MemoryError:
        result = {"status": "OOM"}
    except RuntimeError as exc:  # torch reports failed allocations as RuntimeError / OutOfMemoryError
        text = str(exc).lower()
        if "memory" in text or "alloc" in text:
            result = {"status": "OOM"}
        else:
            result = {"status": "error", "error": str(exc)[:300]}
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver ------------------------------------------------------------------------------------------------------

def run_one(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_ARENA_MAX="2")  # glibc arenas would otherwise eat the address-space limit
    if os.environ.get("BENCH_WARM_MALLOC", "1") != "0":
        # glibc's malloc kept warm, as the server keeps it (its malloc_retain_bytes, allocator.py): freed memory
        # stays mapped, so a call does not page-fault through temporaries a previous call just returned to the
        # kernel. The same for native and PML.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 * 2**20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 * 2**20))
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout"}
    for line in out.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "OOM"}  # killed by the kernel's OOM killer
    return {"status": "error", "error": (err or out)[-300:]}


def run_inprocess(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    spec = dict(spec, mem_limit_gb=None)
    try:
        return worker(spec)
    except (MemoryError, torch.OutOfMemoryError):
        return {"status": "OOM"}
    except RuntimeError as exc:
        text = str(exc).lower()
        return {"status": "OOM"} if ("memory" in text or "alloc" in text) else {"status": "error",
                                                                                "error": str(exc)[:300]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _available_native() -> set[str]:
    from embtrain_server.losses import load_all, names

    load_all()
    return set(names())


def _fmt_time(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{r['median_s'] * 1e3:.1f}" if r["status"] == "ok" else r["status"]


def _fmt_mem(r: dict[str, Any] | None) -> str:
    if r is None or r["status"] != "ok":
        return "-"
    return f"{r['peak_bytes'] / 2**20:.0f}"


def _repeats_of(meta: dict[str, Any], n: int) -> int:
    large = meta.get("large_n")
    return meta["large_repeats"] if large and n >= large else meta["repeats"]


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    clock = "the calling thread's CPU time" if meta.get("clock") == "cpu" else "wall-clock time"
    rounds = meta.get("rounds", 1)
    reps = f"median of {meta['repeats']} forward+backward calls after a warm-up"
    if meta.get("large_n"):
        reps += f" ({meta['large_repeats']} from n={meta['large_n']} on)"
    if rounds > 1:
        reps += (f"; native and PML each ran {rounds} times, alternately, in fresh processes, and the faster of "
                 "their medians is shown")
    lines = [f"Device: {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), "
             f"torch {meta['torch']}, float32, {clock}, {reps}; memory = peak above the level before the first "
             f"call ({'RSS' if meta['device'] == 'cpu' else 'CUDA allocator'}), MiB; speedup = PML ms / native ms.",
             "",
             "| loss | n | d | native ms | native MiB | PML ms | PML MiB | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nat, ref = r.get("native"), r.get("pml")
        speed = "-"
        if nat and ref and nat["status"] == "ok":
            if ref["status"] == "ok":
                speed = f"{ref['median_s'] / nat['median_s']:.1f}x"
            elif ref["status"] in ("OOM", "timeout") or ref["status"].startswith("skipped"):
                speed = f"PML {ref['status']}"
        lines.append(f"| {r['label']} | {r['n']} | {r['d']} | {_fmt_time(nat)} | {_fmt_mem(nat)} | "
                     f"{_fmt_time(ref)} | {_fmt_mem(ref)} | {speed} |")
    lines += ["", "PML configurations:", ""]
    seen = set()
    for r in rows:
        if r["label"] not in seen:
            seen.add(r["label"])
            lines.append(f"* `{r['label']}`: {r['pml_desc']}")
    return "\n".join(lines) + "\n"


def _best(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The faster of two results of the same configuration (an ok one beats a failed one)."""
    if a is None or a["status"] != "ok":
        return b if (a is None or b["status"] == "ok") else a
    if b["status"] != "ok":
        return a
    best = dict(min(a, b, key=lambda r: r["median_s"]))
    best["rounds_median_s"] = a.get("rounds_median_s", [a["median_s"]]) + [b["median_s"]]
    best["peak_bytes"] = max(a["peak_bytes"], b["peak_bytes"])
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="256,1024,4096,8192,16384")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large-n", type=int, default=0, help="from this n on, time --large-repeats calls")
    ap.add_argument("--large-repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run native and PML alternately this many times per row and keep each one's fastest median")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or the calling thread's CPU time (CPU device; for --threads 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space headroom per process (CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per process (default: torch's); 1 gives stable figures on a busy machine")
    ap.add_argument("--only", default="", help="comma-separated case labels (default: all)")
    ap.add_argument("--no-pml", action="store_true", help="native losses only")
    ap.add_argument("--inprocess", action="store_true",
                    help="run every configuration in this process (CUDA: saves the start-up of a subprocess per "
                         "configuration; no timeout and no address-space limit)")
    ap.add_argument("--out", default="")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--from-json", default="",
                    help="comma-separated JSON files of earlier runs: render their rows (in order) as one table")
    args = ap.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0

    if args.from_json:
        runs = [json.load(open(f)) for f in args.from_json.split(",") if f]
        meta = dict(runs[0]["meta"])
        rows = [r for run in runs for r in run["rows"]]
        large = [run["meta"] for run in runs if run["meta"].get("large_n")]
        if len(runs) > 1 and not large:
            # e.g. a run of the small sizes and one of n=16384 with fewer repeats
            big = runs[-1]["meta"]
            meta.update(large_n=min(r["n"] for r in runs[-1]["rows"]), large_repeats=big["repeats"])
        rows.sort(key=lambda r: ([c.label for c in CASES].index(r["label"]) if r["label"] in
                                 [c.label for c in CASES] else 99, r["d"], r["n"]))
        table = markdown(rows, meta)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        print(table)
        return 0

    import torch

    sizes = [int(s) for s in args.sizes.split(",") if s]
    dims = [int(s) for s in args.dims.split(",") if s]
    only = {s for s in args.only.split(",") if s}
    available = _available_native()
    cases = [c for c in CASES if (not only or c.label in only) and c.loss in available]
    missing = [c.label for c in CASES if c.loss not in available]
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    meta = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
            "repeats": args.repeats, "large_n": args.large_n, "large_repeats": args.large_repeats,
            "rounds": args.rounds, "clock": args.clock if args.device == "cpu" else "wall",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mem_limit_gb": args.mem_limit_gb, "timeout_s": args.timeout, "missing_native": missing,
            "threads": args.threads or torch.get_num_threads(), "command": " ".join(sys.argv)}
    rows: list[dict[str, Any]] = []
    for case in cases:
        for d in dims:
            failed: dict[str, str] = {}
            for n in sizes:
                row: dict[str, Any] = {"label": case.label, "loss": case.loss, "params": case.params, "n": n, "d": d,
                                       "pml_desc": case.pml_desc}
                impls = ["native"] + (["pml"] if case.pml and not args.no_pml else [])
                for rnd in range(max(args.rounds, 1)):
                    for impl in impls:
                        if impl in failed:
                            row.setdefault(impl, {"status": f"skipped ({failed[impl]})"})
                            continue
                        if rnd and row.get(impl, {}).get("status") != "ok":
                            continue
                        spec = {"case": asdict(case), "impl": impl, "n": n, "d": d, "device": args.device,
                                "repeats": _repeats_of(meta, n), "mem_limit_gb": args.mem_limit_gb,
                                "threads": args.threads, "clock": args.clock}
                        res = run_inprocess(spec) if args.inprocess else run_one(spec, args.timeout)
                        row[impl] = _best(row.get(impl), res)
                        if res["status"] != "ok" and not rnd:
                            failed[impl] = f"{res['status']} at n={n}"
                        print(f"{case.label:36s} n={n:6d} d={d:4d} {impl:6s} {_fmt_time(res):>10s} ms "
                              f"{_fmt_mem(res):>7s} MiB", flush=True)
                rows.append(row)
                if args.out:  # after every row: a long run that is stopped keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = markdown(rows, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    print(table)
    if missing:
        print(f"native losses not found (skipped): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
