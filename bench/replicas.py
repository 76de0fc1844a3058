"""Replicas benchmark (``make bench-replicas``): what one group step of a large global batch costs on R replicas of
one group (torch.distributed, gloo on CPU) against one server, in time and in memory per replica.

For each R in ``--replicas`` (default 1, 2, 3) and mode (R = 1: one server, a plain group session; R >= 2:
``replicate``, every replica computes the whole step, and ``shard``, each replica computes its share of the
anchors and the partial results are summed), W members (one client and one thread each, member r talks to
replica r mod R) send equal slices of an n x d float32 batch (default 4096 x 128, ``batch_hard_triplet``):

* **step time**: wall time from the first member's send to the last member's answer, median and p90 over
  ``--steps`` steps after ``--warmup`` warm-up steps (every configuration sees the same batches);
* **memory per replica**: for each replica process, the growth of its peak RSS during the measured steps:
  VmRSS from ``/proc/<pid>/status`` just before the first measured step, the high-water mark reset by writing
  ``5`` to ``/proc/<pid>/clear_refs``, then VmHWM after the last step minus that RSS (where the reset is refused,
  VmHWM since the process started minus that RSS, flagged in the output); reported as the max over replicas.
  Memory the allocator kept from the warm-up steps is already in that RSS, so the benchmark also reports the
  peak over warm-up and measured steps above the RSS before the first step ("above idle");
* **bytes per step, computed (not measured)**: replicate mode gathers every replica's slices (an ``all_gather``
  padded to the largest replica's share, ``replicas._gather_bytes``), so replica k receives (R - 1) x the largest
  share, nominally (R - 1)/R of the step's B = n (4d + 16) bytes; shard mode additionally all-reduces the n x d
  float32 gradient, 2 (R - 1)/R x 4nd per replica in a ring.

It ends with "expected on GPU nodes" arithmetic (exchange time of those bytes at 100 and 25 Gb/s, the size of a
dense distance matrix per replica) for ``--gpu-n`` x ``--gpu-d``: arithmetic, not measurements. NCCL (one GPU per
replica) cannot be exercised on one machine with one GPU, and this benchmark does not simulate it.

On a machine with fewer cores than replicas the replicas compete for the cores (each runs ``--torch-threads``
threads, default 1): the step times then show the replicas' overhead, not a speed-up.

    python bench/replicas.py [--n 4096] [--d 128] [--members 4] [--loss batch_hard_triplet] [--steps 10]
                             [--replicas 1,2,3] [--modes replicate,shard] [--out bench/results/replicas-cpu.json]
                             [--markdown [FILE]] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import embtrain
from embtrain_server import process

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from groups import batch, group_step_seconds  # noqa: E402 - the sibling benchmark's data and step timer

MIB = 2**20
NCCL_NOTE = ("NCCL (one GPU per replica) cannot be exercised on one machine with one GPU; this benchmark measures "
             "gloo on CPU only and does not simulate NCCL.")


# ---- memory of a replica process (/proc) -------------------------------------------------------------------------

def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (``clear_refs`` 5); False where the kernel or permissions refuse."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- computed exchange -------------------------------------------------------------------------------------------

def slice_bytes(rows: int, d: int) -> int:
    """The bytes of ``rows`` rows of a step's slices: float32 embeddings and int64 labels (4d + 8 per row) plus
    8 per row for framing: B = n (4d + 16)."""
    return rows * (4 * d + 16)


def exchange_bytes(n: int, d: int, members: int, replicas: int, mode: str) -> dict[str, float]:
    """Bytes one replica receives per step (computed, not measured), the largest over replicas.

    ``gather``: the slices. Member r goes to replica r mod R; ``_gather_bytes`` pads every replica's share to the
    largest one, so each replica receives (R - 1) x the largest share; nominally (R - 1)/R x B (equal shares).
    ``allreduce``: shard mode's ring all-reduce of the n x d float32 gradient, 2 (R - 1)/R x 4nd."""
    if replicas <= 1:
        return {"gather": 0.0, "gather_nominal": 0.0, "allreduce": 0.0, "total": 0.0}
    cuts = [n * r // members for r in range(members + 1)]
    held = [sum(cuts[r + 1] - cuts[r] for r in range(members) if r % replicas == k) for k in range(replicas)]
    gather = (replicas - 1) * slice_bytes(max(held), d)
    nominal = (replicas - 1) / replicas * slice_bytes(n, d)
    allreduce = 2 * (replicas - 1) / replicas * n * d * 4 if mode == "shard" else 0.0
    return {"gather": float(gather), "gather_nominal": nominal, "allreduce": allreduce,
            "total": gather + allreduce}


def gpu_arithmetic(n: int, d: int, members: int, configs: list[tuple[int, str]]) -> list[dict[str, Any]]:
    out = []
    for replicas, mode in configs:
        b = exchange_bytes(n, d, members, replicas, mode)
        anchors = n if mode != "shard" else -(-n // replicas)  # replicate: every replica computes every anchor
        out.append({"replicas": replicas, "mode": mode, "n": n, "d": d, "bytes": b["total"],
                    "ms_100gbit": 1e3 * b["total"] * 8 / 100e9, "ms_25gbit": 1e3 * b["total"] * 8 / 25e9,
                    "dense_distance_bytes": anchors * n * 4})
    return out


# ---- the configurations, interleaved ---------------------------------------------------------------------------

class Unavailable(Exception):
    """The server refused the configuration (e.g. shard mode for a loss that cannot shard)."""


@contextlib.contextmanager
def servers(root: pathlib.Path, replicas: int, flags: list[str]) -> Iterator[tuple[list[str], list[int]]]:
    """``replicas`` server processes (one: a plain server); yields their addresses and pids. Every process is
    stopped on exit, whatever happened."""
    if replicas == 1:
        with process.running([*flags, "--no-persist"], log_path=root / "server.log", grace=10) as (target, proc):
            yield [target], [proc.pid]
    else:
        with process.replica_group(root, replicas, *flags, "--no-persist") as group:
            yield group.addresses, [p.pid for p in group.procs if p is not None]


@dataclass
class Config:
    """One row: its own server process(es), one client per member, one session, and what was measured."""

    replicas: int
    mode: str
    root: pathlib.Path
    pids: list[int] = field(default_factory=list)
    clients: list[embtrain.Client] = field(default_factory=list)
    session_id: str = ""
    idle: list[int] = field(default_factory=list)  # KiB, before the first step
    base: list[int] = field(default_factory=list)  # KiB, before the first measured step
    warm_peak: list[int] = field(default_factory=list)  # KiB, VmHWM over the warm-up
    reset: bool = True
    times: list[float] = field(default_factory=list)
    outcome: dict[str, str] = field(default_factory=dict)  # {"unavailable": why} or {"error": why}

    def logs(self) -> str:
        return "".join(f"\n--- {p.name} ---\n" + p.read_text(errors="replace")[-1500:]
                       for p in sorted(self.root.glob("*.log")))


def start(cfg: Config, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Start ``cfg``'s servers (stopped when ``stack`` closes), its clients and its session."""
    flags = ["--metrics-port", "0", "--device", "cpu", "--workers", "1", "--torch-threads", str(args.torch_threads),
             "--log-level", "WARNING", "--drain-seconds", "2"]
    addresses, cfg.pids = stack.enter_context(servers(cfg.root, cfg.replicas, flags))
    # One client (its own channels) per member, like separate workers; a client of every replica sends member r
    # to replica r mod R.
    for _ in range(args.members):
        cfg.clients.append(stack.enter_context(embtrain.Client(addresses if cfg.replicas > 1 else addresses[0])))
    kw: dict[str, Any] = {"group_size": args.members}
    if cfg.replicas > 1:
        kw["shard" if cfg.mode == "shard" else "replicated"] = True
    try:
        cfg.session_id = cfg.clients[0].create_session(args.loss, json.loads(args.params), **kw).id
    except embtrain.InvalidArgument as exc:
        if cfg.mode == "shard":
            raise Unavailable(str(exc).splitlines()[0]) from None
        raise
    cfg.idle = [proc_status_kib(p)["VmRSS"] for p in cfg.pids]
    cfg.reset = all([reset_peak(p) for p in cfg.pids])  # so that the warm-up's peak is the warm-up's alone


def step(cfg: Config, args: argparse.Namespace, index: int) -> None:
    """Step ``index`` (0-based; the first ``args.warmup`` are warm-up) of ``cfg``."""
    if index == args.warmup:
        cfg.warm_peak = [proc_status_kib(p)["VmHWM"] for p in cfg.pids]
        cfg.base = [proc_status_kib(p)["VmRSS"] for p in cfg.pids]
        cfg.reset = all([reset_peak(p) for p in cfg.pids]) and cfg.reset
    x, y = batch(args.n, args.d, index)  # every configuration sees the same batches
    t = group_step_seconds(cfg.clients, cfg.session_id, x, y, index + 1)
    if index >= args.warmup:
        cfg.times.append(t)


def result_row(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"replicas": cfg.replicas, "mode": cfg.mode, **cfg.outcome}
    if cfg.outcome or not cfg.times:
        return row
    peak = [proc_status_kib(p)["VmHWM"] for p in cfg.pids]
    growth = [(h - b) * 1024 for h, b in zip(peak, cfg.base)]
    above_idle = [(max(w, h) - i) * 1024 for w, h, i in zip(cfg.warm_peak, peak, cfg.idle)]
    times = cfg.times
    p90 = statistics.quantiles(times, n=10, method="inclusive")[8] if len(times) > 1 else times[0]
    row.update({"step_ms": [1e3 * t for t in times], "median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * p90,
                "idle_rss_bytes": [k * 1024 for k in cfg.idle], "rss_before_bytes": [k * 1024 for k in cfg.base],
                "peak_rss_bytes": [k * 1024 for k in peak], "peak_growth_bytes": growth,
                "max_peak_growth_bytes": max(growth), "peak_above_idle_bytes": above_idle,
                "max_peak_above_idle_bytes": max(above_idle), "hwm_reset": cfg.reset,
                "exchange": exchange_bytes(args.n, args.d, args.members, cfg.replicas, cfg.mode)})
    return row


def measure(args: argparse.Namespace, configs: list[tuple[int, str]]) -> tuple[list[dict[str, Any]], bool]:
    """Every configuration's servers run at once (idle but for their own steps) and the steps go round-robin, in
    an order that rotates every step, so that the machine's background load drifts over all rows alike. Returns
    the rows and whether any configuration failed (not counting "unavailable")."""
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, contextlib.ExitStack() as stack:
        cfgs = [Config(r, m, pathlib.Path(tmp) / f"r{r}-{m}") for r, m in configs]
        for cfg in cfgs:
            print(f"starting R={cfg.replicas} {cfg.mode} ...", flush=True)
            try:
                start(cfg, args, stack)
            except Unavailable as exc:
                cfg.outcome = {"unavailable": str(exc)}
                print(f"  unavailable: {exc}", flush=True)
            except (embtrain.EmbtrainError, RuntimeError, OSError) as exc:
                cfg.outcome = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                print(f"  failed: {exc}{cfg.logs()}", flush=True)
        live = [c for c in cfgs if not c.outcome]
        for index in range(args.warmup + args.steps):
            started = time.monotonic()
            order = live[index % len(live):] + live[:index % len(live)] if live else []
            for cfg in order:
                if cfg.outcome:
                    continue
                try:
                    step(cfg, args, index)
                except (embtrain.EmbtrainError, RuntimeError, OSError) as exc:
                    cfg.outcome = {"error": f"step {index + 1}: {type(exc).__name__}: {exc}"}
                    print(f"  R={cfg.replicas} {cfg.mode} failed: {cfg.outcome['error']}{cfg.logs()}", flush=True)
            what = "warm-up" if index < args.warmup else "measured"
            print(f"step {index + 1} ({what}): " + ", ".join(
                f"R={c.replicas} {c.mode} {1e3 * c.times[-1]:.0f} ms" for c in live
                if c.times and not c.outcome and index >= args.warmup) + f" [{time.monotonic() - started:.1f} s]",
                flush=True)
        rows = [result_row(c, args) for c in cfgs]  # before the servers stop: reads their VmHWM
    return rows, any("error" in r for r in rows)


# ---- output ------------------------------------------------------------------------------------------------------

def fmt_bytes(b: float) -> str:
    if b == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def label(mode: str) -> str:
    return "one server" if mode == "single" else mode


def markdown(result: dict[str, Any]) -> str:
    a, m = result["args"], result["machine"]
    lines = [f"Replicas ({m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, load average at start "
             f"{m['loadavg']}, at the end {m.get('loadavg_end', '?')}; `{result['command']}`). Global batch "
             f"n = {a['n']} x d = {a['d']} float32, "
             f"`{a['loss']}` {a['params']}, W = {a['members']} members with equal slices (member r -> replica "
             f"r mod R), {a['torch_threads']} torch thread(s) per replica; median and p90 of {a['steps']} steps "
             f"after {a['warmup']} warm-up steps, every configuration's servers running at once and the steps "
             f"taken in turn (rotating order). Memory: growth of each replica's peak RSS during the measured "
             "steps over its RSS just before them, and of its peak RSS over the warm-up and measured steps over its "
             "RSS before the first step (idle: the session created, no step yet); MiB, max over replicas. Bytes: "
             "computed, not measured.", "",
             "| R | mode | step median (ms) | step p90 (ms) | time / R=1 | peak RSS growth per replica (MiB) "
             "| growth / R=1 | peak RSS above idle per replica (MiB) | above idle / R=1 "
             "| received per replica per step |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = next((r for r in result["rows"] if r["replicas"] == 1 and "median_ms" in r), None)
    notes = []
    for r in result["rows"]:
        if "median_ms" not in r:
            what = "unavailable" if r.get("unavailable") else "failed"
            lines.append(f"| {r['replicas']} | {label(r['mode'])} | {what} | | | | | | | |")
            notes.append(f"R={r['replicas']} {r['mode']}: {what}: {r.get('unavailable') or r.get('error')}")
            continue
        t_ratio = f"{r['median_ms'] / ref['median_ms']:.2f}x" if ref else "-"
        g = r["max_peak_growth_bytes"]
        m_ratio = (f"{g / ref['max_peak_growth_bytes']:.2f}x" if ref and ref["max_peak_growth_bytes"] > 0 else "-")
        gi = r["max_peak_above_idle_bytes"]
        i_ratio = (f"{gi / ref['max_peak_above_idle_bytes']:.2f}x" if ref and ref["max_peak_above_idle_bytes"] > 0
                   else "-")
        ex = r["exchange"]
        cell = fmt_bytes(ex["gather"]) + ("\\*" if abs(ex["gather"] - ex["gather_nominal"]) > 1 else "")
        if ex["allreduce"]:
            cell += f" + {fmt_bytes(ex['allreduce'])} all-reduce"
        lines.append(f"| {r['replicas']} | {label(r['mode'])} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {t_ratio} | "
                     f"{g / MIB:.0f} | {m_ratio} | {gi / MIB:.0f} | {i_ratio} | {cell} |")
    if any(r.get("exchange", {}).get("gather", 0) != r.get("exchange", {}).get("gather_nominal", 0)
           for r in result["rows"] if "median_ms" in r):
        notes.append("\\* more than the nominal (R-1)/R of B: the slices' all-gather pads every replica's share to the "
                     "largest (W = {0} members over R replicas: unequal shares).".format(a["members"]))
    if not all(r.get("hwm_reset", True) for r in result["rows"]):
        notes.append("The peak could not be reset (clear_refs refused): growth is VmHWM since the process started "
                     "minus the RSS before the measured steps.")
    lines.append("")
    for note in notes:
        lines += [note, ""]
    gpu = result["gpu"]
    if gpu:
        b = slice_bytes(gpu[0]["n"], gpu[0]["d"])
        lines += [f"Expected on GPU nodes: **arithmetic, not measured**, for n = {gpu[0]['n']}, d = {gpu[0]['d']} "
                  "float32 "
                  f"(B = n (4d + 16) = {fmt_bytes(b)} of slices per step), W = {a['members']}. Exchange time = bytes "
                  "received per replica per step / link rate (no latency, no overlap with compute). The dense "
                  "distance matrix is anchors x n x 4 bytes per replica (replicate: all n anchors; shard: n/R); the "
                  "losses compute it in blocks of anchor rows (at most 2^24 elements per block on CUDA), so this "
                  "is what a dense implementation would hold, not what this one allocates. Per-replica compute "
                  "time is not scaled from the CPU measurement: a CPU's cost per row squared says nothing about a "
                  "GPU's.", "",
                  "| R | mode | received per replica per step | at 100 Gb/s (ms) | at 25 Gb/s (ms) "
                  "| dense distance matrix per replica |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in gpu:
            lines.append(f"| {r['replicas']} | {label(r['mode'])} | {fmt_bytes(r['bytes'])} | {r['ms_100gbit']:.1f} | "
                         f"{r['ms_25gbit']:.1f} | {fmt_bytes(r['dense_distance_bytes'])} |")
        lines.append("")
    lines.append(NCCL_NOTE)
    return "\n".join(lines)


def write_markdown(text: str, path: pathlib.Path) -> None:
    begin, end = "<!-- replicas:begin -->", "<!-- replicas:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if begin in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = (doc.rstrip() + "\n\n" if doc else "") + "## Replicas\n\n" + block + "\n"
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="rows of the global batch")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--members", type=int, default=4, help="W: members of the group, equal slices")
    ap.add_argument("--loss", default="batch_hard_triplet")
    ap.add_argument("--params", default='{"margin": 0.2}', help="the loss's parameters, JSON")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--replicas", default="1,2,3", help="R values; 1 = one server, plain group session")
    ap.add_argument("--modes", default="replicate,shard", help="modes for R >= 2")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--gpu-n", type=int, default=65536, help="n of the GPU arithmetic")
    ap.add_argument("--gpu-d", type=int, default=512, help="d of the GPU arithmetic")
    ap.add_argument("--out", default=str(HERE / "results" / "replicas-cpu.json"))
    ap.add_argument("--markdown", nargs="?", const=str(HERE / "README.md"), default=None,
                    help="write the tables between the replicas markers of FILE (default bench/README.md)")
    ap.add_argument("--from-json", default=None, help="render a previous run's JSON instead of running")
    args = ap.parse_args(argv)

    if args.from_json:
        result = json.loads(pathlib.Path(args.from_json).read_text())
        text = markdown(result)
        print(text)
        if args.markdown:
            write_markdown(text, pathlib.Path(args.markdown))
        return 0

    configs = [(r, mode) for r in (int(v) for v in args.replicas.split(","))
               for mode in (["single"] if r == 1 else args.modes.split(","))]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "loadavg": ", ".join(f"{v:.1f}" for v in os.getloadavg())}
    command = shlex.join(["python", "bench/replicas.py", *(sys.argv[1:] if argv is None else argv)])
    rows, failed = measure(args, configs)
    machine["loadavg_end"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    for row in rows:
        if "median_ms" in row:
            print(f"R={row['replicas']} {row['mode']}: step median {row['median_ms']:.1f} ms, p90 "
                  f"{row['p90_ms']:.1f} ms; peak RSS growth per replica "
                  f"{[round(g / MIB) for g in row['peak_growth_bytes']]} MiB, above idle "
                  f"{[round(g / MIB) for g in row['peak_above_idle_bytes']]} MiB"
                  f"{'' if row['hwm_reset'] else ' (peak not reset)'}", flush=True)
    gpu = gpu_arithmetic(args.gpu_n, args.gpu_d, args.members,
                         [(r["replicas"], r["mode"]) for r in rows if "unavailable" not in r])
    result = {"machine": machine, "command": command, "args": vars(args), "rows": rows, "gpu": gpu,
              "note": NCCL_NOTE}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if args.markdown:
        write_markdown(text, pathlib.Path(args.markdown))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
