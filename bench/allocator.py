"""What the server's allocator setting (``malloc_retain_bytes``, ``server/embtrain_server/allocator.py``) buys:
one loss computed in process the way the server computes it (``compute.run`` on a worker thread, OpenMP threads
sleeping when idle), in a fresh process per setting, glibc's own thresholds (0) against the server's default,
alternated over rounds. Reports the median wall time per batch and the CPU time per batch (user and system: the
system time is mostly page faults on freshly mapped memory).

    python bench/allocator.py [--sizes 256x128,1024x512,4096x512] [--rounds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

# Like the server (main.py): OpenMP threads sleep as soon as a parallel region ends.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

HERE = pathlib.Path(__file__).resolve().parent
LOSS = "batch_hard_triplet"


def child(n: int, d: int, retain: int, seconds: float) -> dict[str, Any]:
    """One process, one setting: the loss on (n, d) timed on a worker thread for about ``seconds``."""
    import torch

    from embtrain_server import allocator, compute, losses, validation

    said = allocator.retain_freed_memory(retain)
    losses.load_all()
    loss = losses.get(LOSS)({})
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    inputs = validation.validate_inputs(type(loss), {"embeddings": x, "labels": torch.arange(n) % max(2, n // 8)},
                                        max_batch_elements=1 << 40)
    out: dict[str, Any] = {}

    def work() -> None:
        def once() -> None:
            compute.run(loss, inputs, device=torch.device("cpu"), options=compute.ComputeOptions())

        for _ in range(3):
            once()
        walls = []
        t0, cpu0 = time.perf_counter(), os.times()
        while time.perf_counter() - t0 < seconds or len(walls) < 5:
            s = time.perf_counter()
            once()
            walls.append(time.perf_counter() - s)
        cpu1 = os.times()
        k = len(walls)
        out.update(batches=k, wall_ms=1000 * statistics.median(walls),
                   user_ms=1000 * (cpu1.user - cpu0.user) / k, system_ms=1000 * (cpu1.system - cpu0.system) / k)

    t = threading.Thread(target=work)  # the server computes on a worker thread (glibc gives it its own arena)
    t.start()
    t.join()
    return {"n": n, "d": d, "retain": retain, "allocator": said, **out}


def measure(sizes: list[tuple[int, int]], rounds: int, seconds: float) -> dict[str, Any]:
    from embtrain_server.config import ServerConfig

    default = ServerConfig().malloc_retain_bytes
    started = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg()}
    rows = []
    for n, d in sizes:
        runs: dict[int, list[dict[str, Any]]] = {0: [], default: []}
        for _ in range(rounds):
            for retain in runs:  # alternated, so that background noise hits both alike
                cmd = [sys.executable, __file__, "--child", f"{n},{d},{retain},{seconds}"]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
                runs[retain].append(json.loads(done.stdout.strip().splitlines()[-1]))
        med = {r: {k: statistics.median(x[k] for x in v) for k in ("wall_ms", "user_ms", "system_ms")}
               for r, v in runs.items()}
        rows.append({"n": n, "d": d, "glibc": med[0], "retained": med[default], "retain_bytes": default,
                     "speedup": med[0]["wall_ms"] / med[default]["wall_ms"], "runs": {str(k): v for k, v in runs.items()}})
        print(f"  {n}x{d}: glibc {med[0]['wall_ms']:.2f} ms (system {med[0]['system_ms']:.2f}), retained "
              f"{med[default]['wall_ms']:.2f} ms (system {med[default]['system_ms']:.2f}) -> "
              f"{rows[-1]['speedup']:.2f}x", flush=True)
    return {"loss": LOSS, "rounds": rounds, "seconds": seconds, "cores": len(os.sched_getaffinity(0)), **started,
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"`{result['loss']}` forward and backward in process, float32, on a worker thread, {result['cores']} cores, "
        f"{result['date']} (load average at start {result['load_average'][0]:.1f}); a fresh process per setting, "
        f"alternated, median of {result['rounds']} rounds of about {result['seconds']:.0f} s each. Retained: "
        f"`malloc_retain_bytes` = {result['rows'][0]['retain_bytes']} (the server's default); glibc: 0.",
        "",
        "```",
        "python bench/allocator.py --markdown",
        "```",
        "",
        "| n | d | wall ms, glibc | wall ms, retained | speed-up | user ms, glibc | user ms, retained | "
        "system ms, glibc | system ms, retained |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        g, k = r["glibc"], r["retained"]
        lines.append(f"| {r['n']} | {r['d']} | {g['wall_ms']:.2f} | {k['wall_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{g['user_ms']:.2f} | {k['user_ms']:.2f} | {g['system_ms']:.2f} | {k['system_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256x128,1024x512,4096x512", help="n x d shapes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0, help="timing loop of one process")
    p.add_argument("--out", default=str(HERE / "results" / "allocator-cpu.json"))
    p.add_argument("--markdown", nargs="?", const=str(HERE / "README.md"), default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, d, retain, seconds = args.child.split(",")
        print(json.dumps(child(int(n), int(d), int(retain), float(seconds))))
        return 0
    sizes = [(int(a), int(b)) for a, b in (s.split("x") for s in args.sizes.split(","))]
    result = measure(sizes, args.rounds, args.seconds)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    text = render(result)
    print(text)
    if args.markdown:
        from transport import write_markdown

        write_markdown(pathlib.Path(args.markdown), "allocator", text)
        print(f"updated {args.markdown}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
