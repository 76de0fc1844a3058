"""Transport benchmark (``make bench-transport``): what embtrain's ``Compute`` costs on top of computing the same
loss in-process, measured against the transport ceiling of this machine, a bare gRPC echo of the same bytes.

Three things run side by side, each in its own arrangement:

* **in-process**: ``embtrain_server.compute.run`` on already-decoded tensors (the loss, its gradient and the
  copy back to the CPU; exactly what a local user of the loss pays);
* **Compute**: ``embtrain.Client.compute`` against an ``embtrain-server`` subprocess on loopback (encode, gRPC,
  decode, validate, compute, encode, gRPC, decode);
* **echo**: a grpc.aio server in another subprocess whose generic handlers answer a request of the same bytes as the
  ``ComputeRequest`` with a prebuilt response of the same size as the ``ComputeResponse``; no protobuf on either
  side (identity serialisers), same channel and server options as embtrain.

Unary rows time one call at a time (median of ``--repeats`` after ``--warmup``; the three are interleaved so that
noise from other processes hits them alike). Stream rows run 1, 4 and 16 concurrent streams (``compute_stream``,
4 batches in flight each) for ``--seconds`` per window and report the median rate over ``--stream-repeats``
windows, next to the echo at the same concurrency and to the in-process compute run by as many threads.
A profile section times each stage of one request on its own (client encode, server decode, validation, compute,
server encode, client decode) against a plain memory copy of the payload. A trace section times the same stages in
place: a server with probes on each stage (``--serve-traced``) and unary calls one at a time, so that the thread
hops, the gRPC legs and what the stages cost between them show (``--only trace`` runs just that).

A framing section times encoding and decoding of 2 MB and 8 MB Compute messages with ``embtrain.wire``'s hand
framing against plain protobuf objects (no server; ``--only framing`` runs just that, in seconds).

    python bench/transport.py [--device cpu|cuda] [--sizes 256,1024,4096] [--dims 128,512]
                              [--dtypes float32,float16] [--repeats 15] [--seconds 3] [--markdown]
    python bench/transport.py --only framing [--framing-sizes 2,8]
    python bench/transport.py --only unix [--sizes 256,4096] [--dims 128]     # or --unix with a full run
    python bench/transport.py --only trace [--trace-shapes 256x128:float32,1024x512:float32] [--repeats 25]

``--unix`` (or ``--only unix``, just this section) also serves embtrain and the echo on Unix domain sockets and
times ``Compute`` and the echo over the socket against TCP loopback, interleaved, same processes and bytes.

Targets (issues 7 and 14): Compute <= in-process + 1.25 x echo (unary; issue 14 judges it with the server's own
compute time of each call: Compute - server compute <= 1.25 x echo); stream rate >= 0.8 x min(in-process rate,
echo stream rate); decode and encode copy each tensor at most once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

# This process's in-process runs must not leave OpenMP threads spinning on the cores that the server under test
# needs next: they sleep after each parallel region. The server itself runs with the environment as it was.
SERVER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
if sys.argv[1:2] != ["--serve-traced"]:  # the traced server is a server: its environment as it was
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# torch, embtrain and the server package are imported where they are used, so that re-rendering a result
# (--from-json) needs none of them.
ROOT = pathlib.Path(__file__).resolve().parent.parent
ECHO_SERVICE = "embtrain.bench.Echo"
REFERENCE = "reference: one copy of the embeddings into new bytes (ndarray.tobytes)"
MB = 1024 * 1024


# ---- the echo server (run as a subprocess: ``transport.py --serve-echo``) -----------------------------------------


def serve_echo(unix_path: str = "") -> None:
    """A grpc.aio server with embtrain's server options and two generic handlers on raw bytes: ``Unary`` and
    ``Stream`` answer each request with a cached payload of the size named in the ``x-response-bytes`` metadata.
    Also listens on the Unix socket ``unix_path`` if given. Prints its port on stdout, then runs until SIGTERM."""
    from embtrain_server.config import ServerConfig
    from embtrain_server.server import grpc_options

    cache: dict[int, bytes] = {}

    def payload(context: grpc.aio.ServicerContext) -> bytes:
        size = int(dict(context.invocation_metadata() or ()).get("x-response-bytes", "0"))
        if size not in cache:
            cache[size] = os.urandom(size)  # incompressible, like float data
        return cache[size]

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload(context)

    async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        out = payload(context)
        async for _ in requests:
            yield out

    async def main() -> None:
        server = grpc.aio.server(options=grpc_options(ServerConfig()))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        if unix_path:
            server.add_insecure_port(f"unix:{unix_path}")
        await server.start()
        print(port, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


# ---- subprocesses --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server(unix_path: str = "") -> Iterator[tuple[str, int]]:
    """The echo server (``serve_echo``) in a subprocess; yields its TCP target and its pid."""
    from embtrain_server import process

    proc = subprocess.Popen([sys.executable, __file__, "--serve-echo", *([unix_path] if unix_path else [])],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.strip().isdigit():
            raise RuntimeError(f"echo server did not start (exit code {proc.poll()})")
        yield f"127.0.0.1:{int(line)}", proc.pid
    finally:
        process.stop(proc, grace=20.0)


@contextlib.contextmanager
def embtrain_server(device: str, workers: int, log_path: pathlib.Path, unix_socket: str = "",
                    torch_threads: int = 0) -> Iterator[tuple[str, str, int]]:
    """An ``embtrain-server`` subprocess (also on the Unix socket ``unix_socket`` if given); yields its TCP target,
    its metrics URL and its pid."""
    from embtrain_server import process

    metrics_port = process.free_port()
    args = ["--metrics-port", str(metrics_port), "--no-persist", "--device", device, "--drain-seconds", "2",
            "--workers", str(workers), "--torch-threads", str(torch_threads), "--log-level", "WARNING",
            *(["--unix-socket", unix_socket] if unix_socket else [])]
    with process.running(args, log_path=log_path, grace=20.0,
                         env={"OMP_WAIT_POLICY": SERVER_OMP_WAIT_POLICY}) as (target, proc):
        yield target, f"http://127.0.0.1:{metrics_port}/metrics", proc.pid


# ---- workload ------------------------------------------------------------------------------------------------


def make_batch(n: int, d: int, dtype: str, seed: int = 0) -> tuple[Any, Any]:
    """Embeddings (unit rows) and labels with 8 samples per class, as a P x K sampler would give."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(getattr(torch, dtype))
    y = torch.arange(n) % max(2, n // 8)
    return x, y


class InProcess:
    """The loss computed in this process, on the bench's device, the way the server computes it."""

    def __init__(self, loss: str, params: dict[str, Any], device: str) -> None:
        import torch

        from embtrain_server import allocator, compute, losses, validation
        from embtrain_server.config import ServerConfig

        # The server's allocator setting, so that the loss computes here as it does there (the bench's client,
        # in this process, gets it too).
        allocator.retain_freed_memory(ServerConfig().malloc_retain_bytes)
        losses.load_all()
        self.compute, self.validation = compute, validation
        self.loss = losses.get(loss)(params)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def inputs(self, x: Any, y: Any) -> dict[str, Any]:
        return self.validation.validate_inputs(type(self.loss), {"embeddings": x, "labels": y},
                                            max_batch_elements=1 << 40)

    def __call__(self, inputs: dict[str, Any]) -> Any:
        # ``run`` returns CPU tensors, so it has synchronised with the device when it returns.
        return self.compute.run(self.loss, inputs, device=self.device, options=self.compute.ComputeOptions())


def channel_options() -> list[tuple[str, Any]]:
    from embtrain.wire import DEFAULT_MAX_MESSAGE_BYTES

    return [("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]


def server_seconds(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's Compute handler time and compute time, from its Prometheus endpoint."""
    import urllib.request

    out: dict[str, tuple[float, float]] = {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for key, prefix in (("handler", 'embtrain_request_duration_seconds_{}{{method="Compute"}}'),
                        ("compute", "embtrain_compute_duration_seconds_{}{{loss=")):
        vals = {}
        for part in ("sum", "count"):
            head = prefix.format(part)
            vals[part] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(head))
        out[key] = (vals["sum"], vals["count"])
    return out


def _mean_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], key: str) -> float:
    ds, dc = after[key][0] - before[key][0], after[key][1] - before[key][1]
    return 1000.0 * ds / dc if dc else float("nan")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_ms(xs: Sequence[float]) -> float:
    return 1000.0 * statistics.median(xs)


# ---- unary ---------------------------------------------------------------------------------------------------


def bench_unary(client: Any, echo: grpc.Channel, metrics_url: str, loss: str, params: dict[str, Any], device: str,
                n: int, d: int, dtype: str, warmup: int, repeats: int) -> dict[str, Any]:
    from embtrain import _client as sdk

    x, y = make_batch(n, d, dtype)
    local = InProcess(loss, params, device)
    inputs = local.inputs(x, y)
    # The exact bytes embtrain sends and receives, for the echo.
    _, req_bytes = client._request(x, y, {}, loss=loss, params=params, session_id=None, gradient=True,
                                   triplets=True, max_triplets=0, per_item_losses=False)
    resp_bytes = client._stubs_for(client.target).compute(req_bytes, timeout=600)
    assert sdk._result(resp_bytes, lambda _: sdk._Decoder(x)).ok
    resp_size = len(resp_bytes)
    echo_call = echo.unary_unary(f"/{ECHO_SERVICE}/Unary")
    meta = (("x-response-bytes", str(resp_size)),)

    runs = {
        "inprocess": lambda: local(inputs),
        "compute": lambda: client.compute(x, y, loss=loss, params=params),
        "echo": lambda: echo_call(req_bytes, metadata=meta, timeout=600),
    }
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    # The server's own handler and compute time of each Compute call (its metrics, scraped after each call and
    # outside the timed region): RTT - server compute of the *same* call does not depend on how much the compute
    # itself varies between calls, which at large n is more than the whole echo.
    handler: list[float] = []
    served: list[float] = []
    first = last = server_seconds(metrics_url)
    for _ in range(repeats):
        for k, fn in runs.items():  # interleaved: background noise hits all three alike
            times[k].append(timed(fn))
            if k == "compute":
                now = server_seconds(metrics_url)
                handler.append(_mean_ms(last, now, "handler") / 1000)
                served.append(_mean_ms(last, now, "compute") / 1000)
                last = now
    med = {k: median_ms(v) for k, v in times.items()}
    transport = median_ms([t - c for t, c in zip(times["compute"], served)])
    budget = med["inprocess"] + 1.25 * med["echo"]
    return {
        "n": n, "d": d, "dtype": dtype, "request_bytes": len(req_bytes), "response_bytes": resp_size,
        "inprocess_ms": med["inprocess"], "compute_ms": med["compute"], "echo_ms": med["echo"],
        "overhead_ms": med["compute"] - med["inprocess"],
        # Medians from the server's own metrics: the handler (decode .. encode, after parsing, before
        # serialising) and the compute inside it; ``transport_ms`` = median over calls of RTT - that call's compute.
        "server_handler_ms": median_ms(handler), "server_compute_ms": median_ms(served),
        "transport_ms": transport, "meets_target_vs_server_compute": transport <= 1.25 * med["echo"],
        "server_mean_compute_ms": _mean_ms(first, last, "compute"),
        "overhead_over_echo": (med["compute"] - med["inprocess"]) / med["echo"],
        "target_ms": budget, "meets_target": med["compute"] <= budget,
        "samples_ms": {k: [round(1000 * t, 3) for t in v] for k, v in times.items()},
    }


# ---- Unix socket vs TCP loopback ------------------------------------------------------------------------------


def bench_unix(tcp: Any, uds: Any, tcp_echo: grpc.Channel, uds_echo: grpc.Channel, loss: str,
               params: dict[str, Any], n: int, d: int, dtype: str, warmup: int, repeats: int) -> dict[str, Any]:
    """Unary Compute and echo round trips of the same bytes to the same two server processes, over TCP loopback
    and over their Unix sockets, interleaved: median ms and the ratios Unix / TCP."""
    x, y = make_batch(n, d, dtype)
    _, req_bytes = tcp._request(x, y, {}, loss=loss, params=params, session_id=None, gradient=True,
                                triplets=True, max_triplets=0, per_item_losses=False)
    resp_size = len(tcp._stubs_for(tcp.target).compute(req_bytes, timeout=600))
    meta = (("x-response-bytes", str(resp_size)),)
    echo_tcp, echo_uds = (ch.unary_unary(f"/{ECHO_SERVICE}/Unary") for ch in (tcp_echo, uds_echo))
    runs = {
        "compute_tcp": lambda: tcp.compute(x, y, loss=loss, params=params),
        "compute_unix": lambda: uds.compute(x, y, loss=loss, params=params),
        "echo_tcp": lambda: echo_tcp(req_bytes, metadata=meta, timeout=600),
        "echo_unix": lambda: echo_uds(req_bytes, metadata=meta, timeout=600),
    }
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():  # interleaved: background noise hits all four alike
            times[k].append(timed(fn))
    med = {k: median_ms(v) for k, v in times.items()}
    return {
        "n": n, "d": d, "dtype": dtype, "request_bytes": len(req_bytes), "response_bytes": resp_size,
        **{f"{k}_ms": v for k, v in med.items()},
        "compute_ratio": med["compute_unix"] / med["compute_tcp"], "echo_ratio": med["echo_unix"] / med["echo_tcp"],
        "samples_ms": {k: [round(1000 * t, 3) for t in v] for k, v in times.items()},
    }


def render_unix(result: dict[str, Any]) -> list[str]:
    lines = [
        f"**Unix socket vs TCP loopback** (unary round trips to the same server processes, interleaved; median ms of "
        f"{result['repeats']} after {result['warmup']} warm-up calls). Compute includes the loss's compute; the "
        "echo is the transport alone. Ratio = Unix / TCP.",
        "",
        "| n | d | dtype | request | response | Compute TCP | Compute Unix | ratio | echo TCP | echo Unix | ratio |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["unix"]:
        lines.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {_size(r['request_bytes'])} | "
                     f"{_size(r['response_bytes'])} | {r['compute_tcp_ms']:.2f} | {r['compute_unix_ms']:.2f} | "
                     f"{r['compute_ratio']:.2f} | {r['echo_tcp_ms']:.3f} | {r['echo_unix_ms']:.3f} | "
                     f"{r['echo_ratio']:.2f} |")
    return lines


# ---- streams -------------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.count += 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, every thread included (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _windows(counter: _Counter, warmup_s: float, seconds: float, repeats: int,
             pids: Mapping[str, int]) -> list[dict[str, Any]]:
    """Over ``repeats`` consecutive windows after a warm-up: the rate (per second) of ``counter`` and the CPU
    milliseconds per counted item of each process in ``pids``."""
    time.sleep(warmup_s)
    windows = []
    for _ in range(repeats):
        c0, t0 = counter.count, time.perf_counter()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(seconds)
        count, elapsed = counter.count - c0, time.perf_counter() - t0
        windows.append({"rate": count / elapsed, "cpu_ms": {
            name: 1000 * (cpu_seconds(pid) - cpu0[name]) / max(count, 1) for name, pid in pids.items()}})
    return windows


def _run_threads(workers: list[Callable[[threading.Event], None]], counter: _Counter, warmup_s: float,
                 seconds: float, repeats: int, pids: Mapping[str, int]) -> list[dict[str, Any]]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[threading.Event], None]) -> None:
        try:
            fn(stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guard, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        windows = _windows(counter, warmup_s, seconds, repeats, pids)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    if errors:
        raise RuntimeError(f"stream worker failed: {errors[0]!r}") from errors[0]
    return windows


def bench_streams(client: Any, echo: grpc.Channel, pids: Mapping[str, int], loss: str, params: dict[str, Any],
                  device: str, n: int, d: int, dtype: str, concurrency: Sequence[int], seconds: float, repeats: int,
                  in_flight: int = 4) -> list[dict[str, Any]]:
    """Rates of c concurrent streams against the in-process compute on c threads and the echo, and the CPU time
    per batch that each spends (``pids``: the embtrain server's and the echo server's; the client and the
    in-process compute are this process, which runs nothing else meanwhile)."""
    x, y = make_batch(n, d, dtype)
    _, req_bytes = client._request(x, y, {}, loss=loss, params=params, session_id=None, gradient=True,
                                   triplets=True, max_triplets=0, per_item_losses=False)
    resp_size = len(client._stubs_for(client.target).compute(req_bytes, timeout=600))
    meta = (("x-response-bytes", str(resp_size)),)
    echo_stream = echo.stream_stream(f"/{ECHO_SERVICE}/Stream")
    rows = []
    for c in concurrency:
        local = [InProcess(loss, params, device) for _ in range(c)]
        inputs = local[0].inputs(x, y)

        # In-process: c threads computing back to back (torch releases the GIL while it computes).
        counter = _Counter()

        def inproc_worker(i: int) -> Callable[[threading.Event], None]:
            def run(stop: threading.Event) -> None:
                while not stop.is_set():
                    local[i](inputs)
                    counter.add()
            return run

        me = os.getpid()
        inproc = _run_threads([inproc_worker(i) for i in range(c)], counter, 0.5, seconds, repeats,
                              {"process": me})

        # embtrain: c concurrent ComputeStream calls on the one client, ``in_flight`` batches ahead each.
        counter = _Counter()

        def stream_worker(stop: threading.Event) -> None:
            def batches() -> Iterator[tuple[Any, Any]]:
                while not stop.is_set():
                    yield x, y
            for r in client.compute_stream(batches(), loss=loss, params=params, max_in_flight=in_flight):
                r.raise_for_error()
                counter.add()

        remote = _run_threads([stream_worker] * c, counter, 1.0, seconds, repeats,
                              {"server": pids["server"], "client": me})

        # Echo: the same bytes both ways on c streams, with the same window.
        counter = _Counter()

        def echo_worker(stop: threading.Event) -> None:
            window = threading.Semaphore(in_flight)

            def requests() -> Iterator[bytes]:
                while not stop.is_set():
                    if window.acquire(timeout=0.1):
                        yield req_bytes

            call = echo_stream(requests(), metadata=meta)
            try:
                for _ in call:
                    window.release()
                    counter.add()
            finally:
                call.cancel()

        echo_rates = _run_threads([echo_worker] * c, counter, 1.0, seconds, repeats,
                                  {"server": pids["echo"], "client": me})
        runs = {"inprocess": inproc, "compute": remote, "echo": echo_rates}
        med = {k: statistics.median(w["rate"] for w in v) for k, v in runs.items()}
        cpu = {f"{k}_{name}": statistics.median(w["cpu_ms"][name] for w in v)
               for k, v in runs.items() for name in v[0]["cpu_ms"]}
        ceiling = min(med["inprocess"], med["echo"])
        cores = machine_cores()
        # The most batches/s the embtrain path's CPU time per batch allows with every core busy all the time.
        cpu_limit = 1000 * cores / (cpu["compute_server"] + cpu["compute_client"])
        rows.append({
            "n": n, "d": d, "dtype": dtype, "streams": c, "request_bytes": len(req_bytes),
            "response_bytes": resp_size,
            "inprocess_batches_per_s": med["inprocess"], "compute_batches_per_s": med["compute"],
            "echo_batches_per_s": med["echo"], "compute_embeddings_per_s": med["compute"] * n,
            "fraction_of_ceiling": med["compute"] / ceiling, "meets_target": med["compute"] >= 0.8 * ceiling,
            "cpu_ms_per_batch": cpu, "cores": cores, "cpu_limit_batches_per_s": cpu_limit,
            "samples": runs,
        })
        print(f"  streams={c:2d} {n}x{d} {dtype}: compute {med['compute']:.1f}/s, echo {med['echo']:.1f}/s, "
              f"in-process {med['inprocess']:.1f}/s -> {100 * rows[-1]['fraction_of_ceiling']:.0f}% of the ceiling; "
              f"CPU ms/batch: in-process {cpu['inprocess_process']:.2f}, embtrain server {cpu['compute_server']:.2f} + "
              f"client {cpu['compute_client']:.2f} (limit {cpu_limit:.0f}/s on {cores} cores)",
              flush=True)
    return rows


# ---- trace: where a unary Compute's time goes, in place ----------------------------------------------------------
# The embtrain server runs with probes (``transport.py --serve-traced OUT -- <server flags>``): each stage of a
# request records time.perf_counter() (CLOCK_MONOTONIC: the same clock in every process) on entry and exit, and the
# records are written to OUT when the server stops. The client records around its own stages; calls are one at a
# time, so each stage is found by time. Unlike ``profile`` (each stage alone, hot, in one process), this shows
# what the stages cost in their real place: between thread hops, on cores shared with the client and gRPC.

TRACE_STAGES = [  # (label, from event, to event); "c0".."c3" are the client's own stamps
    ("client: build the request (_request)", "c0", "c1"),
    ("gRPC: client send -> server parser", "c1", "deser>"),
    ("server: parser (head walk, event loop)", "deser>", "deser<"),
    ("server: interceptor -> handler", "deser<", "unary>"),
    ("server: handler -> handed to a worker (inline: to parse)", "unary>", "work>"),
    ("hop: event loop -> worker thread", "work>", "parse>"),
    ("server: parse (worker, or inline on the event loop)", "parse>", "parse<"),
    ("server: target, options, loss", "parse<", "decode>"),
    ("server: decode_inputs (aligned copies)", "decode>", "decode<"),
    ("server: validation (check_compute)", "validate>", "validate<"),
    ("server: validated -> compute", "validate<", "compute>"),
    ("server: compute.run", "compute>", "compute<"),
    ("server: compute -> encode (metrics)", "compute<", "encode>"),
    ("server: encode_result", "encode>", "encode<"),
    ("hop: worker -> event loop", "encode<", "work<"),
    ("server: handler ends (metrics, admission)", "work<", "unary<"),
    ("server: -> serializer", "unary<", "ser>"),
    ("gRPC: server send -> client has the answer", "ser<", "c2"),
    ("client: decode the answer (_result)", "c2", "c3"),
]


def serve_traced(out: str, server_args: Sequence[str]) -> int:
    """``embtrain-server`` with probes on each stage of a request (see above); the records go to ``out`` at exit."""
    import atexit
    import functools

    from embtrain_server import main as server_main  # first: it settles the OpenMP environment before torch loads
    from embtrain import wire
    from embtrain_server import batches, compute, scheduler, servicer, steps, validation

    records: list[tuple[str, float]] = []
    stamp = time.perf_counter

    def probe(owner: Any, attr: str, name: str) -> None:
        f = getattr(owner, attr)
        if asyncio.iscoroutinefunction(f):
            @functools.wraps(f)
            async def traced_async(*a: Any, **k: Any) -> Any:
                records.append((name + ">", stamp()))
                try:
                    return await f(*a, **k)
                finally:
                    records.append((name + "<", stamp()))
            setattr(owner, attr, traced_async)
        else:
            @functools.wraps(f)
            def traced(*a: Any, **k: Any) -> Any:
                records.append((name + ">", stamp()))
                try:
                    return f(*a, **k)
                finally:
                    records.append((name + "<", stamp()))
            setattr(owner, attr, traced)

    for owner, attr, name in ((servicer, "_parse_compute", "deser"), (servicer, "_serialize", "ser"),
                              (servicer.Servicer, "unary", "unary"), (scheduler.Scheduler, "_work", "work"),
                              (wire, "parse_compute_request", "parse"), (batches, "decode_inputs", "decode"),
                              (validation, "check_compute", "validate"), (compute, "run", "compute"),
                              (steps, "encode_result", "encode")):
        probe(owner, attr, name)
    atexit.register(lambda: pathlib.Path(out).write_text(json.dumps(records)))
    return server_main.main(list(server_args))


def bench_trace(loss: str, params: dict[str, Any], device: str, workers: int, shapes: Sequence[tuple[int, int, str]],
                warmup: int, repeats: int, log_path: pathlib.Path) -> dict[str, Any]:
    """One traced embtrain server and the echo; ``repeats`` unary calls per shape, one at a time, each followed by
    an echo of the same bytes: the median of each stage, of the round trip and of the echo."""
    from embtrain import _client as sdk
    from embtrain_server import process

    trace_file = tempfile.NamedTemporaryFile(prefix="embtrain-trace-", suffix=".json", delete=False)
    trace_file.close()
    port = process.free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--no-persist", "--device", device,
            "--drain-seconds", "2", "--workers", str(workers), "--log-level", "WARNING"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if SERVER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = SERVER_OMP_WAIT_POLICY
    calls: list[dict[str, Any]] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--serve-traced", trace_file.name, "--", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            target = f"127.0.0.1:{port}"
            process.wait_serving(target, lambda: proc.poll() is None)
            with echo_server() as (echo_target, _), grpc.insecure_channel(echo_target, options=channel_options()) as echo, \
                    sdk.Client(target, timeout=600.0) as client:
                echo_call = echo.unary_unary(f"/{ECHO_SERVICE}/Unary")
                stubs = client._stubs_for(client.target)
                for n, d, dtype in shapes:
                    x, y = make_batch(n, d, dtype)
                    dec = sdk._Decoder(x)

                    def build() -> bytes:
                        return client._request(x, y, {}, loss=loss, params=params, session_id=None, gradient=True,
                                               triplets=True, max_triplets=0, per_item_losses=False)[1]

                    req = build()
                    meta = (("x-response-bytes", str(len(stubs.compute(req, timeout=600)))),)
                    for i in range(warmup + repeats):
                        c0 = time.perf_counter()
                        data = build()
                        c1 = time.perf_counter()
                        answer = client._call(stubs.compute, data, None)
                        c2 = time.perf_counter()
                        sdk._result(answer, lambda _: dec)
                        c3 = time.perf_counter()
                        e0 = time.perf_counter()
                        echo_call(req, metadata=meta, timeout=600)
                        e1 = time.perf_counter()
                        if i >= warmup:
                            calls.append({"shape": (n, d, dtype), "c0": c0, "c1": c1, "c2": c2, "c3": c3,
                                          "echo": e1 - e0})
        finally:
            process.stop(proc, grace=20.0)
    records = sorted(json.loads(pathlib.Path(trace_file.name).read_text()), key=lambda r: r[1])
    os.unlink(trace_file.name)
    rows = []
    for n, d, dtype in shapes:
        stages: dict[str, list[float]] = {label: [] for label, _, _ in TRACE_STAGES}
        extra: dict[str, list[float]] = {"round trip": [], "round trip - compute.run": [],
                                         "server: parser .. serializer - compute.run": [], "echo": []}
        for c in (c for c in calls if c["shape"] == (n, d, dtype)):
            ev: dict[str, float] = {k: c[k] for k in ("c0", "c1", "c2", "c3")}
            for name, t in records:
                if c["c1"] <= t <= c["c2"]:
                    ev.setdefault(name, t)
            if "work>" not in ev and "parse>" in ev and "encode<" in ev:
                # Computed on the event loop (inline_compute_seconds): no hand-over, both hops are zero.
                ev["work>"], ev["work<"] = ev["parse>"], ev["encode<"]
            if not all(k in ev for _, a, b in TRACE_STAGES for k in (a, b)):
                continue  # a stage that did not run (a different path): left out
            for label, a, b in TRACE_STAGES:
                stages[label].append(ev[b] - ev[a])
            comp = ev["compute<"] - ev["compute>"]
            extra["round trip"].append(c["c3"] - c["c0"])
            extra["round trip - compute.run"].append(c["c3"] - c["c0"] - comp)
            extra["server: parser .. serializer - compute.run"].append(ev["ser<"] - ev["deser>"] - comp)
            extra["echo"].append(c["echo"])
        rows.append({"n": n, "d": d, "dtype": dtype, "calls": len(extra["echo"]),
                     "stages_ms": {k: median_ms(v) if v else float("nan") for k, v in stages.items()},
                     **{f"{k}_ms": median_ms(v) if v else float("nan") for k, v in extra.items()}})
        r = rows[-1]
        print(f"  trace {n}x{d} {dtype}: round trip - compute {r['round trip - compute.run_ms']:.2f} ms, server "
              f"{r['server: parser .. serializer - compute.run_ms']:.2f} ms of it, echo {r['echo_ms']:.2f} ms",
              flush=True)
    return {"warmup": warmup, "repeats": repeats, "rows": rows}


def render_trace(trace: dict[str, Any]) -> list[str]:
    rows = trace["rows"]
    head = " | ".join(f"{r['n']} x {r['d']} {r['dtype']}" for r in rows)
    lines = [
        f"**Where a unary `Compute`'s time goes, in place** (one traced server: each stage stamped on entry and "
        f"exit with a clock shared by the processes; median ms of {trace['repeats']} calls after {trace['warmup']}, "
        "each followed by an echo of the same bytes). The probes themselves add a few µs per stage.",
        "",
        f"| stage | {head} |",
        "|---|" + "---:|" * len(rows),
    ]
    for label, _, _ in TRACE_STAGES:
        lines.append(f"| {label} | " + " | ".join(f"{r['stages_ms'][label]:.3f}" for r in rows) + " |")
    for key in ("round trip", "round trip - compute.run", "server: parser .. serializer - compute.run", "echo"):
        lines.append(f"| **{key}** | " + " | ".join(f"{r[key + '_ms']:.3f}" for r in rows) + " |")
    lines.append("| **(round trip - compute.run) / echo** | "
                 + " | ".join(f"{r['round trip - compute.run_ms'] / r['echo_ms']:.2f}x" for r in rows) + " |")
    return lines


# ---- profile: where one request's time goes --------------------------------------------------------------------


def profile(loss: str, params: dict[str, Any], device: str, n: int, d: int, dtype: str, repeats: int) -> dict[str, Any]:
    """Each stage of one Compute on its own, in this process (no gRPC): median ms, and the equivalent number of
    memory copies of the embeddings' bytes (stage time / time of one plain copy of that many bytes)."""
    import torch

    from embtrain import _client as sdk
    from embtrain.wire import parse_compute_request as parse_compute
    from embtrain_server import validation
    from embtrain_server.config import ServerConfig
    from embtrain_server.metrics import Metrics
    from embtrain_server.persistence import Checkpointer
    from embtrain_server.batches import Batches, decode_inputs
    from embtrain_server.steps import encode_result
    from embtrain_server.sessions import SessionStore

    x, y = make_batch(n, d, dtype)
    client = sdk.Client.__new__(sdk.Client)  # only _request is used: no channel
    config, dev = ServerConfig(persist=False, device=device), torch.device(device)
    store, metrics = SessionStore(dev), Metrics(dev)
    service = Batches(config, dev, store, Checkpointer(config, store, metrics), metrics)
    build = lambda: client._request(x, y, {}, loss=loss, params=params, session_id=None, gradient=True,  # noqa: E731
                                    triplets=True, max_triplets=0, per_item_losses=False)[1]
    wire_req = build()
    parsed = parse_compute(wire_req)
    wire_resp = service.compute(parsed, "bench")
    local = InProcess(loss, params, device)
    raw = decode_inputs(parsed.inputs)
    inputs = validation.validate_inputs(type(local.loss), raw, max_batch_elements=1 << 40)
    result = local(inputs)
    arr = x.numpy() if dtype != "bfloat16" else x.view(torch.int16).numpy()
    dec = sdk._Decoder(x)

    stages: dict[str, Callable[[], Any]] = {
        REFERENCE: lambda: arr.tobytes(),
        "client: whole request build (_request, tensors framed by hand)": build,
        "server: parse_compute_request (tensors stay in the request bytes)": lambda: parse_compute(wire_req),
        "server: decode_inputs (views)": lambda: decode_inputs(parsed.inputs),
        "server: validate_inputs (dtype, finite, shapes)": lambda: validation.validate_inputs(
            type(local.loss), raw, max_batch_elements=1 << 40),
        "server: compute.run (= in-process)": lambda: local(inputs),
        "server: encode_result (tensors framed by hand)": lambda: encode_result("id", result, 0),
        "client: _result (views; torch results copied once)": lambda: sdk._result(wire_resp, lambda _: dec),
        "server: whole Batches.compute": lambda: service.compute(parsed, "bench"),
    }
    for fn in stages.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(repeats):
        for k, fn in stages.items():
            times[k].append(timed(fn))
    ms = {k: median_ms(v) for k, v in times.items()}
    copy_ms = ms[REFERENCE]
    # Copy counts by identity, not timing: does decoding hand out views of one buffer, or new bytes each time?
    t = parsed.inputs["embeddings"]
    data_access_copies = t.data is not t.data
    return {
        "n": n, "d": d, "dtype": dtype, "embedding_bytes": arr.nbytes, "request_bytes": len(wire_req),
        "response_bytes": len(wire_resp),
        "stages_ms": ms, "copies_equivalent": {k: v / copy_ms for k, v in ms.items()},
        "tensor_data_access_makes_new_bytes": bool(data_access_copies),
    }


# ---- hand framing vs plain protobuf ----------------------------------------------------------------------------
# What embtrain.wire's hand framing saves over building and parsing the same messages with protobuf objects, on the
# SDK and server alike. Needs only the SDK (numpy, torch, protobuf): no server, no gRPC.

FRAMING_SIZES_MB = (2, 8)
FRAMING_D = 128


def _framing_request(size_mb: int) -> dict[str, Any]:
    """A ComputeRequest of about ``size_mb``: float32 embeddings n x 128 and int64 labels, both ways."""
    import torch

    from embtrain import codec, wire
    from embtrain.v1 import embtrain_pb2 as pb

    n = size_mb * MB // (FRAMING_D * 4 + 8)
    x, y = make_batch(n, FRAMING_D, "float32")
    head = pb.ComputeRequest(request_id="bench", loss=pb.LossSpec(name="batch_hard_triplet"))
    head.options.gradient = True
    named = {"embeddings": x, "labels": y}

    def hand_encode() -> bytes:
        return wire.encode_compute_request(head, named)

    def protobuf_encode() -> bytes:
        msg = pb.ComputeRequest()
        msg.CopyFrom(head)
        for k, v in named.items():
            msg.inputs[k].CopyFrom(codec.encode(v, f"inputs.{k}"))
        return msg.SerializeToString()

    def hand_decode(data: bytes) -> dict[str, torch.Tensor]:
        req = wire.parse_compute_request(data)
        return {k: codec.decode_torch(t, f"inputs.{k}") for k, t in req.inputs.items()}

    def protobuf_decode(data: bytes) -> dict[str, torch.Tensor]:
        msg = pb.ComputeRequest.FromString(data)
        return {k: codec.decode_torch(t, f"inputs.{k}") for k, t in msg.inputs.items()}

    return {"message": "ComputeRequest", "n": n, "tensors": f"float32 embeddings {n} x {FRAMING_D}, int64 labels {n}",
            "parse": pb.ComputeRequest.FromString, "expected": named,
            "hand": (hand_encode, hand_decode), "protobuf": (protobuf_encode, protobuf_decode)}


def _framing_response(size_mb: int) -> dict[str, Any]:
    """A ComputeResponse of about ``size_mb``: float32 gradients n x 128 and int64 triplets n x 3, both ways."""
    import torch

    from embtrain import codec, wire
    from embtrain.v1 import embtrain_pb2 as pb

    n = size_mb * MB // (FRAMING_D * 4 + 3 * 8)
    grad, _ = make_batch(n, FRAMING_D, "float32", seed=1)
    triplets = torch.randint(0, n, (n, 3), generator=torch.Generator().manual_seed(1))
    head = pb.ComputeResponse(request_id="bench", loss=0.25, triplets_total=n, step=1)

    def hand_encode() -> bytes:
        return wire.encode_compute_response(head, {"embeddings": grad}, {"triplets": triplets})

    def protobuf_encode() -> bytes:
        msg = pb.ComputeResponse()
        msg.CopyFrom(head)
        msg.gradients["embeddings"].CopyFrom(codec.encode(grad, "gradients.embeddings"))
        msg.triplets.CopyFrom(codec.encode(triplets, "triplets"))
        return msg.SerializeToString()

    def hand_decode(data: bytes) -> dict[str, torch.Tensor]:
        _, gradients, tensors = wire.decode_compute_response(data)
        return {"embeddings": codec.decode_torch(gradients["embeddings"], "gradients.embeddings"),
                "triplets": codec.decode_torch(tensors["triplets"], "triplets")}

    def protobuf_decode(data: bytes) -> dict[str, torch.Tensor]:
        msg = pb.ComputeResponse.FromString(data)
        return {"embeddings": codec.decode_torch(msg.gradients["embeddings"], "gradients.embeddings"),
                "triplets": codec.decode_torch(msg.triplets, "triplets")}

    return {"message": "ComputeResponse", "n": n,
            "tensors": f"float32 gradients {n} x {FRAMING_D}, int64 triplets {n} x 3",
            "parse": pb.ComputeResponse.FromString, "expected": {"embeddings": grad, "triplets": triplets},
            "hand": (hand_encode, hand_decode), "protobuf": (protobuf_encode, protobuf_decode)}


def bench_framing(sizes_mb: Sequence[int], warmup: int, repeats: int) -> dict[str, Any]:
    """Encode (message with its tensors -> bytes) and decode (bytes -> CPU torch tensors) of ComputeRequest and
    ComputeResponse payloads, hand framing against plain protobuf: median ms, and the ratio protobuf / hand."""
    import torch

    rows = []
    for size_mb in sizes_mb:
        for case in (_framing_request(size_mb), _framing_response(size_mb)):
            (hand_enc, hand_dec), (pb_enc, pb_dec) = case["hand"], case["protobuf"]
            hand_bytes, pb_bytes = hand_enc(), pb_enc()
            # Both sides carry the same message and tensors, or the comparison means nothing.
            assert case["parse"](hand_bytes) == case["parse"](pb_bytes), "hand framing and protobuf disagree"
            for dec in (hand_dec, pb_dec):
                for data in (hand_bytes, pb_bytes):
                    out = dec(data)
                    assert all(torch.equal(out[k], v) for k, v in case["expected"].items())
            runs: dict[str, Callable[[], Any]] = {
                "hand_encode": hand_enc, "protobuf_encode": pb_enc,
                "hand_decode": lambda: hand_dec(hand_bytes), "protobuf_decode": lambda: pb_dec(pb_bytes),
                # the scale: one plain copy of the payload's bytes
                "copy": lambda: bytearray(hand_bytes),
            }
            for _ in range(warmup):
                for fn in runs.values():
                    fn()
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(repeats):
                for k, fn in runs.items():  # interleaved: background noise hits both alike
                    times[k].append(timed(fn))
            ms = {k: median_ms(v) for k, v in times.items()}
            rows.append({
                "message": case["message"], "target_mb": size_mb, "bytes": len(hand_bytes), "n": case["n"],
                "tensors": case["tensors"], **{f"{k}_ms": v for k, v in ms.items()},
                "encode_ratio": ms["protobuf_encode"] / ms["hand_encode"],
                "decode_ratio": ms["protobuf_decode"] / ms["hand_decode"],
            })
            r = rows[-1]
            print(f"  framing {r['message']} {_size(r['bytes'])}: encode hand {r['hand_encode_ms']:.2f} ms, protobuf "
                  f"{r['protobuf_encode_ms']:.2f} ms ({r['encode_ratio']:.1f}x); decode hand "
                  f"{r['hand_decode_ms']:.3f} ms, protobuf {r['protobuf_decode_ms']:.2f} ms "
                  f"({r['decode_ratio']:.1f}x)", flush=True)
    return {"warmup": warmup, "repeats": repeats, "rows": rows}


def render_framing(framing: dict[str, Any]) -> list[str]:
    lines = [
        f"**Hand framing vs plain protobuf** (`embtrain.wire` against building / parsing the same message with "
        f"protobuf objects; no gRPC; median ms of {framing['repeats']} after {framing['warmup']} warm-up runs). "
        "Encode: the message with its tensors -> bytes. Decode: bytes -> CPU torch tensors (views of the bytes by "
        "hand; protobuf's accessor copies each tensor's bytes out of the message first). Ratio = protobuf / hand.",
        "",
        "| message | size | tensors | encode hand | encode protobuf | ratio | decode hand | decode protobuf | ratio "
        "| one copy of the bytes |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in framing["rows"]:
        lines.append(f"| {r['message']} | {_size(r['bytes'])} | {r['tensors']} | {r['hand_encode_ms']:.2f} | "
                     f"{r['protobuf_encode_ms']:.2f} | {r['encode_ratio']:.1f}x | {r['hand_decode_ms']:.3f} | "
                     f"{r['protobuf_decode_ms']:.2f} | {r['decode_ratio']:.1f}x | {r['copy_ms']:.2f} |")
    return lines


# ---- report --------------------------------------------------------------------------------------------------


def machine_cores() -> int:
    """The cores this process may use (taskset), not what the host has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine(device: str) -> dict[str, Any]:
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": machine_cores(), "host_cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__, "numpy": np.__version__, "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with contextlib.suppress(Exception):
        import google.protobuf

        info["protobuf"] = google.protobuf.__version__
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _transport(r: dict[str, Any]) -> float:
    """RTT minus the server's compute time: per call when recorded, else from the medians (older results)."""
    return r.get("transport_ms", r["compute_ms"] - r.get("server_compute_ms", float("nan")))


def _cores(m: dict[str, Any]) -> str:
    host = m.get("host_cores")
    return f"{m['cores']} cores" + (f" (pinned; the host has {host})" if host and host != m["cores"] else "")


def _size(b: int) -> str:
    return f"{b / MB:.2f} MB" if b >= MB / 10 else f"{b / 1024:.0f} KB"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = f"{m['gpu']} (CUDA)" if "gpu" in m else "CPU"
    lines = [
        f"### Transport on {where}",
        "",
        f"Machine: {m['cpu']}, {_cores(m)}; device `{m['device']}`{' = ' + m['gpu'] if 'gpu' in m else ''}; "
        f"Python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, protobuf {m.get('protobuf', '?')}; "
        f"{m['date']}; load average at start {', '.join(f'{v:.1f}' for v in m.get('load_average', ()))}. "
        f"Loss `{result['loss']}` {json.dumps(result['params'])}; medians of {result['repeats']} after "
        f"{result['warmup']} warm-up calls"
        + (f"; the server with --torch-threads {result['server_torch_threads']}"
           if result.get("server_torch_threads") else "") + ".",
        "",
        "**Unary `Compute` round trip** (ms). Target: Compute <= in-process + 1.25 x echo. 'server handler' and "
        "'server compute' come from the server's own metrics for the same calls; the last three columns judge the "
        "target with the server's compute time of each call in place of the separately measured in-process time, "
        "which removes the call-to-call variation of the compute (at large n larger than the whole echo).",
        "",
        "| n | d | dtype | request | response | in-process | Compute | server handler | server compute | echo "
        "| overhead (Compute - in-process) | overhead / echo | target | met | Compute - server compute | / echo "
        "| met |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|:-:|",
    ]
    for r in result["unary"]:
        lines.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {_size(r['request_bytes'])} | "
                     f"{_size(r['response_bytes'])} | {r['inprocess_ms']:.2f} | {r['compute_ms']:.2f} | "
                     f"{r.get('server_handler_ms', float('nan')):.2f} | "
                     f"{r.get('server_compute_ms', float('nan')):.2f} | "
                     f"{r['echo_ms']:.2f} | {r['overhead_ms']:.2f} | {r['overhead_over_echo']:.2f}x | "
                     f"{r['target_ms']:.2f} | {'yes' if r['meets_target'] else '**no**'} | "
                     f"{_transport(r):.2f} | {_transport(r) / r['echo_ms']:.2f}x | "
                     f"{'yes' if _transport(r) <= 1.25 * r['echo_ms'] else '**no**'} |")
    if result.get("streams"):
        lines += [
            "",
            f"**Streams** ({result['in_flight']} batches in flight per stream; median of "
            f"{result['stream_repeats']} windows of {result['seconds']:.0f} s). Target: Compute >= 0.8 x "
            "min(in-process, echo).",
            "",
            "| n | d | dtype | streams | in-process batches/s | echo batches/s | Compute batches/s | "
            "Compute embeddings/s | of ceiling | met |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|:-:|",
        ]
        for r in result["streams"]:
            lines.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['streams']} | "
                         f"{r['inprocess_batches_per_s']:.1f} | {r['echo_batches_per_s']:.1f} | "
                         f"{r['compute_batches_per_s']:.1f} | {r['compute_embeddings_per_s']:,.0f} | "
                         f"{100 * r['fraction_of_ceiling']:.0f}% | {'yes' if r['meets_target'] else '**no**'} |")
        if all("cpu_ms_per_batch" in r for r in result["streams"]):
            lines += render_stream_cpu(result["streams"])
    prof = result.get("profile")
    if prof:
        lines += [
            "",
            f"**Where one request's time goes** (n={prof['n']}, d={prof['d']}, {prof['dtype']}, "
            f"{_size(prof['embedding_bytes'])} of embeddings; each stage alone in one process, median ms; "
            "'copies' = stage time / one plain copy of the embeddings' bytes).",
            "",
            "| stage | ms | copies |",
            "|---|---:|---:|",
        ]
        for k, v in prof["stages_ms"].items():
            lines.append(f"| {k} | {v:.3f} | {prof['copies_equivalent'][k]:.1f} |")
        lines.append("")
        lines.append("Reading a decoded request tensor's data makes new bytes on every access: "
                     f"{'yes' if prof['tensor_data_access_makes_new_bytes'] else 'no (it views the received bytes)'}.")
    if result.get("trace"):
        lines += ["", *render_trace(result["trace"])]
    if result.get("unix"):
        lines += ["", *render_unix(result)]
    if result.get("framing"):
        lines += ["", *render_framing(result["framing"])]
    return "\n".join(lines)


def render_stream_cpu(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where the streams' CPU goes: CPU time per batch of each process (all its threads, user + system), and the
    rate that CPU time allows at most with every core busy all the time."""
    lines = [
        "",
        "**CPU per streamed batch** (ms of CPU time, user + system, all threads of the process, per batch; medians "
        "of the same windows). 'CPU limit' = cores x 1000 / (server + client): the most batches/s the embtrain path "
        "could reach with every core busy all the time; 'limit / ceiling' below 80% means the target is out of "
        "reach on this host before any scheduling loss.",
        "",
        "| n | d | dtype | streams | in-process | embtrain server | SDK client | echo server | echo client | "
        "CPU limit batches/s | limit / ceiling |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r["cpu_ms_per_batch"]
        ceiling = min(r["inprocess_batches_per_s"], r["echo_batches_per_s"])
        lines.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['streams']} | {cpu['inprocess_process']:.2f} | "
                     f"{cpu['compute_server']:.2f} | {cpu['compute_client']:.2f} | {cpu['echo_server']:.2f} | "
                     f"{cpu['echo_client']:.2f} | {r['cpu_limit_batches_per_s']:.0f} | "
                     f"{100 * r['cpu_limit_batches_per_s'] / ceiling:.0f}% |")
    return lines


def render_framing_only(result: dict[str, Any]) -> str:
    """The report of ``--only framing``: the machine, then the framing table."""
    m = result["machine"]
    return "\n".join([
        "### Hand framing vs plain protobuf",
        "",
        f"Machine: {m['cpu']}, {_cores(m)}; Python {m['python']}, torch {m['torch']}, protobuf "
        f"{m.get('protobuf', '?')}, numpy {m['numpy']}; {m['date']}.",
        "",
        *render_framing(result["framing"]),
    ])


def render_unix_only(result: dict[str, Any], heading: bool = True) -> str:
    """The report of ``--only unix``: the machine, then the Unix socket vs TCP table (in bench/README.md under
    a heading of its own: ``heading=False``)."""
    m = result["machine"]
    return "\n".join([
        *(["### Unix socket vs TCP loopback", ""] if heading else []),
        f"Machine: {m['cpu']}, {_cores(m)}; device `{m['device']}`; Python {m['python']}, torch {m['torch']}, "
        f"grpcio {m['grpcio']}; {m['date']}; load average at start "
        f"{', '.join(f'{v:.1f}' for v in m.get('load_average', ()))}. Loss `{result['loss']}` "
        f"{json.dumps(result['params'])}.",
        "",
        *render_unix(result),
    ])


def write_markdown(path: pathlib.Path, key: str, text: str) -> None:
    """Replace the section between ``<!-- {key}:begin -->`` and ``<!-- {key}:end -->`` (appended if missing)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    old = path.read_text() if path.exists() else "# embtrain benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


# ---- main ----------------------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _shape(s: str) -> tuple[int, int, str]:
    n, rest = s.split("x", 1)
    d, _, dtype = rest.partition(":")
    return int(n), int(d), dtype or "float32"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--serve-echo"]:
        serve_echo(sys.argv[2] if len(sys.argv) > 2 else "")
        return 0
    if argv is None and sys.argv[1:2] == ["--serve-traced"]:
        return serve_traced(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the server's and the in-process device")
    p.add_argument("--loss", default="batch_hard_triplet", help="loss to time (falls back to contrastive if the "
                   "server lacks it)")
    p.add_argument("--sizes", default="256,1024,4096", help="batch sizes n")
    p.add_argument("--dims", default="128,512", help="embedding widths d")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--streams", default="1,4,16", help="concurrent stream counts ('' to skip)")
    p.add_argument("--stream-shapes", default="1024x512:float32,256x128:float32",
                   help="nxd:dtype payloads of the stream rows")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one stream measurement window")
    p.add_argument("--stream-repeats", type=int, default=3)
    p.add_argument("--in-flight", type=int, default=4, help="batches in flight per stream")
    p.add_argument("--workers", type=int, default=0, help="the embtrain server's --workers (0: by device)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="the embtrain server's --torch-threads (0: torch's default); the in-process runs keep torch's "
                        "default, so the ceiling stays what computing the loss locally costs")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-trace", action="store_true", help="skip the in-place trace of unary calls")
    p.add_argument("--trace-shapes", default="256x128:float32,1024x128:float32,1024x512:float32",
                   help="nxd:dtype payloads of the trace")
    p.add_argument("--framing-sizes", default=",".join(map(str, FRAMING_SIZES_MB)),
                   help="payload sizes (MB) of the hand framing vs protobuf rows")
    p.add_argument("--no-framing", action="store_true", help="skip the hand framing vs protobuf rows")
    p.add_argument("--unix", action="store_true", help="also time Compute and the echo over Unix domain sockets "
                   "against TCP loopback (--sizes x --dims x --dtypes, unary)")
    p.add_argument("--only", choices=["framing", "unix", "trace"], help="measure only this section (framing: no "
                   "server, a few seconds; JSON to --out, default bench/results/transport-framing.json; unix: the "
                   "--unix rows, default bench/results/transport-unix-<device>.json; trace: the in-place trace, "
                   "printed, JSON to --out, default bench/results/transport-trace-<device>.json)")
    p.add_argument("--from-json", help="measure nothing: render this earlier result (with --markdown to store it)")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/transport-<device>.json)")
    p.add_argument("--markdown", nargs="?", const=str(ROOT / "bench" / "README.md"), default=None,
                   help="write the tables into this markdown file (default bench/README.md) between markers")
    args = p.parse_args(argv)

    if args.from_json:
        result = json.loads(pathlib.Path(args.from_json).read_text())
        tag = "cuda" if "gpu" in result["machine"] else "cpu"
        if "unary" in result:
            text, key = render(result), f"transport-{tag}"
        elif "unix" in result:  # written by --only unix
            text, key = render_unix_only(result), f"transport-unix-{tag}"
        else:  # written by --only framing
            text, key = render_framing_only(result), "transport-framing"
        print(text)
        if args.markdown:
            write_markdown(pathlib.Path(args.markdown), key,
                           render_unix_only(result, heading=False) if key.startswith("transport-unix") else text)
            print(f"\nupdated {args.markdown}")
        return 0

    if args.only == "framing":
        # Host-side serialisation only: no server, no device. A file and a markdown section of its own, so that a
        # quick run never overwrites the full report.
        result = {"machine": machine("cpu"),
                  "framing": bench_framing(_ints(args.framing_sizes), args.warmup, args.repeats)}
        out = pathlib.Path(args.out or ROOT / "bench" / "results" / "transport-framing.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        text = render_framing_only(result)
        print()
        print(text)
        if args.markdown:
            write_markdown(pathlib.Path(args.markdown), "transport-framing", text)
            print(f"\nupdated {args.markdown}")
        print(f"wrote {out}")
        return 0

    import torch

    import embtrain

    dev_tag = "cuda" if args.device.startswith("cuda") else "cpu"
    trace_shapes = [_shape(s) for s in args.trace_shapes.split(",") if s]
    if args.only == "trace":
        out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"transport-trace-{dev_tag}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine(args.device), "loss": args.loss, "params": {},
                  "trace": bench_trace(args.loss, {}, args.device, args.workers, trace_shapes, args.warmup,
                                       args.repeats, out.parent / f"transport-trace-{dev_tag}-server.log")}
        out.write_text(json.dumps(result, indent=1))
        print()
        print("\n".join(render_trace(result["trace"])))
        print(f"wrote {out}")
        return 0
    only_unix = args.only == "unix"
    name = f"transport-unix-{dev_tag}" if only_unix else f"transport-{dev_tag}"
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"{name}.json")
    result: dict[str, Any] = {"machine": machine(args.device), "warmup": args.warmup, "repeats": args.repeats,
                              "server_torch_threads": args.torch_threads}
    if not only_unix:
        result.update({"seconds": args.seconds, "stream_repeats": args.stream_repeats, "in_flight": args.in_flight,
                       "unary": [], "streams": []})
    if args.unix or only_unix:
        result["unix"] = []
    # Short socket paths (a Unix socket address holds 107 bytes), removed at the end.
    sock_dir = tempfile.mkdtemp(prefix="embtrain-bench-", dir="/tmp") if "unix" in result else ""
    server_sock, echo_sock = ((os.path.join(sock_dir, "embtrain.sock"), os.path.join(sock_dir, "echo.sock"))
                              if sock_dir else ("", ""))
    print(f"machine: {result['machine']}", flush=True)
    # Entered first, so it exits last: the socket directory goes after both servers stopped.
    cleanup = contextlib.ExitStack()
    if sock_dir:
        cleanup.callback(shutil.rmtree, sock_dir, True)
    server_log = out.parent / f"{name}-server.log"
    with cleanup, embtrain_server(args.device, args.workers, server_log, server_sock,
                                  args.torch_threads) as (target, murl, server_pid), \
            echo_server(echo_sock) as (echo_target, echo_pid), embtrain.Client(target, timeout=600.0) as client, \
            grpc.insecure_channel(echo_target, options=channel_options()) as echo:
        names = {li.name for li in client.losses()}
        loss = args.loss if args.loss in names else "contrastive"
        params: dict[str, Any] = {}
        result["loss"], result["params"] = loss, params
        print(f"loss {loss}; embtrain at {target}, echo at {echo_target}", flush=True)
        for dtype in [t for t in args.dtypes.split(",") if t] if not only_unix else ():  # '': no unary rows
            for d in _ints(args.dims):
                for n in _ints(args.sizes):
                    r = bench_unary(client, echo, murl, loss, params, args.device, n, d, dtype, args.warmup,
                                    args.repeats)
                    result["unary"].append(r)
                    print(f"  unary {n}x{d} {dtype}: in-process {r['inprocess_ms']:.2f} ms, Compute "
                          f"{r['compute_ms']:.2f} ms (server handler {r['server_handler_ms']:.2f}, compute "
                          f"{r['server_compute_ms']:.2f}), echo {r['echo_ms']:.2f} ms -> overhead "
                          f"{r['overhead_over_echo']:.2f} x echo ({'met' if r['meets_target'] else 'MISSED'})",
                          flush=True)
        if args.streams and not only_unix:
            for shape in args.stream_shapes.split(","):
                n, d, dtype = _shape(shape)
                result["streams"] += bench_streams(client, echo, {"server": server_pid, "echo": echo_pid}, loss,
                                                   params, args.device, n, d, dtype, _ints(args.streams),
                                                   args.seconds, args.stream_repeats, args.in_flight)
        if "unix" in result:
            with embtrain.Client(f"unix://{server_sock}", timeout=600.0) as uds, \
                    grpc.insecure_channel(f"unix://{echo_sock}", options=channel_options()) as uds_echo:
                for dtype in args.dtypes.split(","):
                    for d in _ints(args.dims):
                        for n in _ints(args.sizes):
                            r = bench_unix(client, uds, echo, uds_echo, loss, params, n, d, dtype, args.warmup,
                                           args.repeats)
                            result["unix"].append(r)
                            print(f"  unix {n}x{d} {dtype}: Compute TCP {r['compute_tcp_ms']:.2f} ms, Unix "
                                  f"{r['compute_unix_ms']:.2f} ms ({r['compute_ratio']:.2f}x); echo TCP "
                                  f"{r['echo_tcp_ms']:.3f} ms, Unix {r['echo_unix_ms']:.3f} ms "
                                  f"({r['echo_ratio']:.2f}x)", flush=True)
    if only_unix:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        text = render_unix_only(result)
        print()
        print(text)
        if args.markdown:
            write_markdown(pathlib.Path(args.markdown), f"transport-unix-{dev_tag}",
                           render_unix_only(result, heading=False))
            print(f"\nupdated {args.markdown}")
        print(f"wrote {out}")
        return 0
    if not args.no_trace:
        result["trace"] = bench_trace(loss, params, args.device, args.workers, trace_shapes, args.warmup,
                                      max(args.repeats, 15), out.parent / f"{name}-trace-server.log")
    if not args.no_profile:
        result["profile"] = profile(loss, params, args.device, 1024, 512, "float32", max(args.repeats, 15))
    if not args.no_framing:
        result["framing"] = bench_framing(_ints(args.framing_sizes), args.warmup, args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    text = render(result)
    print()
    print(text)
    if args.markdown:
        write_markdown(pathlib.Path(args.markdown), f"transport-{dev_tag}", text)
        print(f"\nupdated {args.markdown}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
