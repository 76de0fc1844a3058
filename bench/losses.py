"""Loss benchmark: every native loss against its pytorch-metric-learning equivalent, same device, same run.

For each loss configuration, embedding size ``n`` (16 rows per class, classes shuffled) and width ``d``
(float32), each implementation runs in its own subprocess (so peak memory is clean and an out-of-memory
configuration cannot take the run down) and reports the median wall time of forward + backward over
``--repeats`` calls after one warm-up call, and its peak memory above the level before the first call:

* CPU: the process's peak RSS (``ru_maxrss``) minus its RSS before the first call. The subprocess runs under an
  address-space limit (``RLIMIT_AS`` = its size before the first call + ``--mem-limit-gb``), so a configuration
  that needs more fails with "OOM" instead of swapping the machine.
* CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the first call; OOM is the CUDA one.

A configuration that runs longer than ``--timeout`` seconds is reported as "timeout"; after an OOM or a timeout the
larger sizes of the same implementation are skipped. The native losses are looked up through the registry by
name, so the benchmark runs with whichever of them exist.

    python bench/losses.py [--device cpu|cuda] [--sizes 256,1024,4096,8192,16384] [--dims 128,512]
                           [--repeats 5] [--timeout 600] [--mem-limit-gb 8] [--threads N]
                           [--only batch_hard_triplet,...] [--no-pml]
                           [--out results.json] [--markdown table.md]

Targets (CPU, n=4096, d=128/512): batch_all_triplet and triplet_margin[semihard] >= 20x faster than PML's
all-triplets / semihard-miner configurations; batch_hard_triplet >= 1.5x faster than PML's batch-hard one;
n=16384 within 8 GB.
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
    Case("island", "island", {}),
    Case("weighted_margin_ranking", "weighted_margin_ranking", {}),
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


def _native_step(case: Case, x, labels, device):  # type: ignore[no-untyped-def]
    import torch

    from embtrain_server.losses import ComputeContext, get, load_all

    load_all()
    cls = get(case.loss)
    n, d = x.shape
    params = dict(case.params)
    if case.loss == "island":
        params.setdefault("num_classes", int(labels.max()) + 1)
    loss = cls(params)
    if cls.stateful:
        loss.init_state(d, device, torch.Generator(device=device).manual_seed(1), {})
    extra: dict[str, Any] = {}
    names = {s.name for s in cls.inputs}
    if "labels" in names:
        extra["labels"] = labels
    if "gt_distances" in names:
        extra["gt_distances"] = torch.rand(n - 1, generator=torch.Generator().manual_seed(2)).to(device)
    ctx = ComputeContext(device=device, max_triplets=MAX_TRIPLETS, want_triplets=True, want_per_item=False)

    def step() -> None:
        emb = x.detach().requires_grad_(True)
        inputs = {"embeddings": emb, **extra}
        loss.check_inputs({k: v.cpu() for k, v in inputs.items()})
        out = loss.forward(inputs, ctx)
        if out.gradients is None:
            torch.autograd.grad(out.loss, emb)

    return step


def _pml_step(case: Case, x, labels):  # type: ignore[no-untyped-def]
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
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device)
    labels = torch.arange(max(n // 16, 1)).repeat_interleave(16)[:n]
    labels = labels[torch.randperm(n, generator=gen)].to(device)
    step = _native_step(case, x, labels, device) if spec["impl"] == "native" else _pml_step(case, x, labels)
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
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
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


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Device: {meta['device']} ({meta['device_name']}, {meta['threads']} torch threads), "
             f"torch {meta['torch']}, float32, "
             f"median of {meta['repeats']} forward+backward calls; memory = peak above the level before the first "
             f"call ({'RSS' if meta['device'] == 'cpu' else 'CUDA allocator'}), MiB.", "",
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="256,1024,4096,8192,16384")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--repeats", type=int, default=5)
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
    args = ap.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
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
            "repeats": args.repeats, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mem_limit_gb": args.mem_limit_gb, "timeout_s": args.timeout, "missing_native": missing,
            "threads": args.threads or torch.get_num_threads()}
    rows: list[dict[str, Any]] = []
    for case in cases:
        for d in dims:
            failed: dict[str, str] = {}
            for n in sizes:
                row: dict[str, Any] = {"label": case.label, "loss": case.loss, "params": case.params, "n": n, "d": d,
                                       "pml_desc": case.pml_desc}
                impls = ["native"] + (["pml"] if case.pml and not args.no_pml else [])
                for impl in impls:
                    if impl in failed:
                        row[impl] = {"status": f"skipped ({failed[impl]})"}
                        continue
                    spec = {"case": asdict(case), "impl": impl, "n": n, "d": d, "device": args.device,
                            "repeats": args.repeats, "mem_limit_gb": args.mem_limit_gb, "threads": args.threads}
                    res = run_inprocess(spec) if args.inprocess else run_one(spec, args.timeout)
                    row[impl] = res
                    if res["status"] != "ok":
                        failed[impl] = f"{res['status']} at n={n}"
                    print(f"{case.label:28s} n={n:6d} d={d:4d} {impl:6s} {_fmt_time(res):>10s} ms "
                          f"{_fmt_mem(res):>7s} MiB", flush=True)
                rows.append(row)
    if args.out:
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
