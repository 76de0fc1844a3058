"""Load benchmark (``make bench-load``): N concurrent clients, each with its own connection and session, stream
batches to one server for a fixed time on loopback. Reports batches per second, per-batch latency (p50, p99,
max: from the moment a batch is handed to gRPC to its answer), errors, answers out of order or missing, and
the server's resident memory over time.

    python bench/load.py [--clients 32] [--seconds 60] [--batch 128] [--dim 64] [--loss batch_hard_triplet]
                         [--max-in-flight 4] [--stateless] [--device cpu] [--target HOST:PORT --server-pid PID]
                         [--json out.json] [--markdown]
    python bench/load.py --from-json bench/results/load-cpu.json --markdown     # re-render a saved run

Without ``--target`` it starts an ``embtrain-server`` subprocess (no persistence, metrics off) and samples the
subprocess's RSS every second; with ``--target`` it samples ``--server-pid`` when given. ``--markdown`` writes
the figures and the command into ``bench/README.md`` between ``<!-- load:begin -->`` and ``<!-- load:end -->``.

``run_load`` is also what ``tests/test_load.py`` runs, with a fixed number of batches per client instead of a
fixed time.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from embtrain import codec
from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc
from embtrain_server import process

ROOT = pathlib.Path(__file__).resolve().parent.parent
MB = 1024 * 1024


# ---- the server under load ------------------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def start_server(device: str = "cpu", workers: int = 0, extra: Sequence[str] = (),
                 timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """An ``embtrain-server`` subprocess on a free loopback port, serving. Returns (process, target)."""
    port = process.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "embtrain_server.main", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
         "0", "--no-persist", "--device", device, "--workers", str(workers), "--log-level", "WARNING", *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        process.wait_serving(target, lambda: proc.poll() is None, timeout)
    except RuntimeError:
        proc.kill()
        raise
    return proc, target


def stop_server(proc: subprocess.Popen) -> int:
    return process.stop(proc, grace=60.0)


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``every`` seconds into ``samples`` as (seconds since start, bytes)."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append((round(time.monotonic() - self._t0, 2), rss_bytes(self.pid)))
            if self._halt.wait(self.every):
                return

    def stop(self) -> list[tuple[float, int]]:
        self._halt.set()
        self.join(10)
        self.samples.append((round(time.monotonic() - self._t0, 2), rss_bytes(self.pid)))
        return self.samples


# ---- the clients ----------------------------------------------------------------------------------------------

@dataclass
class ClientResult:
    answered: int = 0
    errors: int = 0  # in-band errors and stream failures
    out_of_order: int = 0  # an answer whose request_id or step is not the next one expected
    missing: int = 0  # batches sent and never answered
    latencies: list[float] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    clients: int
    seconds: float
    answered: int
    errors: int
    out_of_order: int
    missing: int
    batches_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    per_client: list[int]
    error_messages: list[str]
    rss: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.out_of_order == 0 and self.missing == 0


def _templates(batch: int, dim: int, classes: int, seed: int, count: int = 4) -> list[pb.ComputeRequest]:
    g = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y = np.repeat(np.arange(classes), batch // classes + 1)[:batch]
        x = (g.standard_normal((batch, dim)) + y[:, None] * 0.2).astype(np.float32)
        req = pb.ComputeRequest()
        req.inputs["embeddings"].CopyFrom(codec.encode(x))
        req.inputs["labels"].CopyFrom(codec.encode(y.astype(np.int64)))
        out.append(req)
    return out


class Deadline:
    """The end of a timed run, set by the driver when every client is ready (inf until then; or for ever)."""

    def __init__(self) -> None:
        self.at = float("inf")

    def passed(self) -> bool:
        return time.monotonic() >= self.at


def _client(index: int, target: str, *, deadline: Deadline, batches: int | None, batch: int, dim: int,
            loss: str, sessions: bool, max_in_flight: int, token: str | None, result: ClientResult,
            ready: threading.Barrier) -> None:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 256 * MB),
               ("grpc.max_send_message_length", 256 * MB)]
    try:
        with grpc.insecure_channel(target, options=options) as ch:  # one connection per client
            _stream(index, pb_grpc.EmbeddingTrainerStub(ch), metadata, deadline, batches, batch, dim, loss,
                    sessions, max_in_flight, result, ready)
    except grpc.RpcError as err:  # CreateSession / CloseSession
        result.errors += 1
        result.error_messages.append(f"{err.code().name}: {err.details()}")
    except threading.BrokenBarrierError:
        result.errors += 1


def _stream(index: int, stub: pb_grpc.EmbeddingTrainerStub, metadata: tuple, deadline: Deadline,
            batches: int | None, batch: int, dim: int, loss: str, sessions: bool, max_in_flight: int,
            result: ClientResult, ready: threading.Barrier) -> None:
    templates = _templates(batch, dim, max(2, batch // 8), seed=index)
    sid = None
    if sessions:
        cfg = pb.SessionConfig()
        cfg.loss.name = loss
        sid = stub.CreateSession(pb.CreateSessionRequest(config=cfg), metadata=metadata,
                                 timeout=60).session.session_id
    for t in templates:
        if sid:
            t.session_id = sid
        else:
            t.loss.name = loss
    window = threading.Semaphore(max_in_flight)
    sent: collections.deque[tuple[str, float]] = collections.deque()
    done = threading.Event()
    ready.wait(timeout=300)

    def requests() -> Iterator[pb.ComputeRequest]:
        k = 0
        while (batches is None or k < batches) and not deadline.passed():
            while not window.acquire(timeout=0.05):
                if done.is_set() or deadline.passed():
                    return
            req = pb.ComputeRequest()
            req.CopyFrom(templates[k % len(templates)])
            req.request_id = f"{index}-{k}"
            sent.append((req.request_id, time.perf_counter()))  # handed to gRPC now
            yield req
            k += 1

    expected_step = 1
    call = stub.ComputeStream(requests(), metadata=metadata, timeout=None)
    try:
        for resp in call:
            now = time.perf_counter()
            if not sent:  # an answer to nothing: counted, never matched
                result.out_of_order += 1
                continue
            rid, t0 = sent.popleft()
            window.release()
            result.latencies.append(now - t0)
            if resp.request_id != rid:
                result.out_of_order += 1
            if resp.HasField("error"):
                result.errors += 1
                if len(result.error_messages) < 5:
                    result.error_messages.append(resp.error.message)
                continue
            if sid:
                if resp.step != expected_step:
                    result.out_of_order += 1
                expected_step = resp.step + 1
            result.answered += 1
    except grpc.RpcError as err:
        result.errors += 1
        result.error_messages.append(f"{err.code().name}: {err.details()}")
    finally:
        done.set()
        call.cancel()
    result.missing = len(sent)
    if sid:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=metadata, timeout=60)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def run_load(target: str, clients: int, *, seconds: float | None = None, batches: int | None = None,
             batch: int = 128, dim: int = 64, loss: str = "batch_hard_triplet", sessions: bool = True,
             max_in_flight: int = 4, token: str | None = None, server_pid: int | None = None,
             sample_every: float = 1.0) -> LoadResult:
    """Drive ``clients`` concurrent streaming clients for ``seconds``, or ``batches`` batches each."""
    if (seconds is None) == (batches is None):
        raise ValueError("give seconds or batches")
    results = [ClientResult() for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    deadline = Deadline()
    threads = [threading.Thread(target=_client, args=(i, target), daemon=True, kwargs=dict(
        deadline=deadline, batches=batches, batch=batch, dim=dim, loss=loss, sessions=sessions,
        max_in_flight=max_in_flight, token=token, result=results[i], ready=ready)) for i in range(clients)]
    for th in threads:
        th.start()
    sampler = RssSampler(server_pid, sample_every) if server_pid else None
    if sampler:
        sampler.start()
    ready.wait(timeout=300)  # every session created, every client about to send
    started = time.monotonic()
    if seconds is not None:
        deadline.at = started + seconds
    for th in threads:
        th.join()
    elapsed = time.monotonic() - started
    rss = sampler.stop() if sampler else []
    lat = sorted(x for r in results for x in r.latencies)
    answered = sum(r.answered for r in results)
    return LoadResult(
        clients=clients, seconds=round(elapsed, 2), answered=answered, errors=sum(r.errors for r in results),
        out_of_order=sum(r.out_of_order for r in results), missing=sum(r.missing for r in results),
        batches_per_second=round(answered / elapsed, 1) if elapsed else 0.0,
        latency_p50_ms=round(1000 * _percentile(lat, 0.5), 2), latency_p99_ms=round(1000 * _percentile(lat, 0.99), 2),
        latency_max_ms=round(1000 * lat[-1], 2) if lat else float("nan"), per_client=[r.answered for r in results],
        error_messages=[m for r in results for m in r.error_messages][:10], rss=rss)


# ---- report ---------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, grpcio {grpc.__version__}"


def render(r: LoadResult, args: argparse.Namespace, command: str) -> str:
    rss = r.rss
    lines = [
        f"Load ({datetime.date.today().isoformat()}; {machine()}; server device `{args.device}`, "
        f"{args.workers} workers; clients and server on the same machine over loopback):",
        "",
        "```",
        command,
        "```",
        "",
        "| clients | seconds | batch | loss | batches/s | p50 ms | p99 ms | max ms | errors | out of order | unanswered |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.clients} | {r.seconds:.0f} | {args.batch} x {args.dim} float32 | `{args.loss}`"
        f"{'' if args.stateless else ', one session per client'} | {r.batches_per_second:.0f} | "
        f"{r.latency_p50_ms:.1f} | {r.latency_p99_ms:.1f} | {r.latency_max_ms:.1f} | {r.errors} | "
        f"{r.out_of_order} | {r.missing} |",
    ]
    waiting = r.clients * args.max_in_flight
    if r.batches_per_second:
        lines += ["", f"Each client keeps {args.max_in_flight} batches in flight, so about {waiting} batches are at the "
                      f"server at any moment; by Little's law that alone makes the latency about {waiting} / "
                      f"{r.batches_per_second:.0f} per s = {1000 * waiting / r.batches_per_second:.0f} ms. The p50 is "
                      "that queue: the server is saturated, and batches/s is its capacity for this batch size."]
    if rss:
        peak = max(b for _, b in rss)
        lines += ["", f"Server RSS (MiB) over time: start {rss[0][1] / MB:.0f}, peak {peak / MB:.0f}, "
                      f"end {rss[-1][1] / MB:.0f}; every {max(1, len(rss) // 12)} samples: "
                      + ", ".join(f"{t:.0f}s {b / MB:.0f}" for t, b in rss[::max(1, len(rss) // 12)]) + "."]
    return "\n".join(lines) + "\n"


def write_markdown(text: str, path: pathlib.Path = ROOT / "bench" / "README.md") -> None:
    begin, end = "<!-- load:begin -->", "<!-- load:end -->"
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + begin + "\n" + text + end + tail)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--batch", type=int, default=128, help="embedding rows per batch")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--loss", default="batch_hard_triplet")
    p.add_argument("--max-in-flight", type=int, default=4, help="batches each client sends ahead of the answers")
    p.add_argument("--stateless", action="store_true", help="stateless requests instead of one session per client")
    p.add_argument("--device", default="cpu", help="server device when this script starts the server")
    p.add_argument("--workers", type=int, default=0,
                   help="server worker threads when this script starts it (0: by device)")
    p.add_argument("--target", help="an already running server (default: start one)")
    p.add_argument("--server-pid", type=int, help="with --target: the server's pid, to sample its memory")
    p.add_argument("--token", default=os.environ.get("EMBTRAIN_TOKEN"))
    p.add_argument("--json", type=pathlib.Path, help="write the result as JSON")
    p.add_argument("--markdown", action="store_true", help="write the figures into bench/README.md")
    p.add_argument("--from-json", type=pathlib.Path, help="render a saved result (with its command) instead of running")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        command, markdown = saved.pop("command"), args.markdown
        run_args = p.parse_args(command.split()[2:])  # the settings of the run that was saved
        r = LoadResult(**{k: v for k, v in saved.items() if k in LoadResult.__dataclass_fields__})
        text = render(r, run_args, command)
        print(text)
        if markdown:
            write_markdown(text)
        return 0
    proc = None
    if args.target:
        target, pid = args.target, args.server_pid
    else:
        proc, target = start_server(args.device, args.workers)
        pid = proc.pid
    try:
        r = run_load(target, args.clients, seconds=args.seconds, batch=args.batch, dim=args.dim, loss=args.loss,
                     sessions=not args.stateless, max_in_flight=args.max_in_flight, token=args.token, server_pid=pid)
    finally:
        if proc is not None:
            stop_server(proc)
    command = "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(r, args, command.strip())
    print(text)
    if r.error_messages:
        print("errors:", *r.error_messages, sep="\n  ")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**asdict(r), "command": command.strip()}, indent=1))
    if args.markdown:
        write_markdown(text)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
