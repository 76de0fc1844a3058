"""Prometheus metrics, on their own registry (one per server, so tests can run several servers in a process).
They observe the edges: the servicer records requests, latency and bytes; the service records compute; the
scheduler and the stream pump record what is queued."""

from __future__ import annotations

import os
import threading
from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from .devices import memory_total

# The *_created series double every counter and histogram without telling an operator anything.
disable_created_metrics()

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SAMPLES = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
_FRACTION = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    def __init__(self, device: torch.device) -> None:
        r = self.registry = CollectorRegistry()
        self.device = device
        self.requests = Counter("embtrain_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("embtrain_request_duration_seconds", "RPC latency (streams: per batch)",
                                         ["method"], buckets=_LATENCY, registry=r)
        self.compute_seconds = Histogram("embtrain_compute_duration_seconds",
                                         "Loss, gradient and mining time on the device, by loss",
                                         ["loss"], buckets=_LATENCY, registry=r)
        self.batch_samples = Histogram("embtrain_batch_samples", "Samples (embedding rows) per batch, by loss",
                                       ["loss"], buckets=_SAMPLES, registry=r)
        self.received_bytes = Counter("embtrain_received_bytes", "Request message bytes received, by method",
                                      ["method"], registry=r)
        self.sent_bytes = Counter("embtrain_sent_bytes", "Response message bytes sent, by method",
                                  ["method"], registry=r)
        self.mined_triplets = Counter("embtrain_mined_triplets", "Active (mined) triplets found, by loss",
                                      ["loss"], registry=r)
        self.active_fraction = Histogram("embtrain_active_triplet_fraction",
                                         "Active / selected triplets per batch, by loss",
                                         ["loss"], buckets=_FRACTION, registry=r)
        self.open_sessions = Gauge("embtrain_open_sessions", "Sessions held by this server", registry=r)
        self.open_streams = Gauge("embtrain_open_streams", "ComputeStream calls in progress", registry=r)
        self.stream_pending = Gauge("embtrain_stream_pending_batches",
                                    "Stream batches received and not yet answered, over all streams", registry=r)
        self.admitted_bytes = Gauge("embtrain_admitted_request_bytes", "Bytes of the requests admitted and not yet "
                                    "answered (against the memory budget)", registry=r)
        self.working_bytes = Gauge("embtrain_working_memory_bytes", "Estimated device memory of the batches "
                                   "computing now (against the memory budget)", registry=r)
        self.worker_calls = Gauge("embtrain_worker_calls", "Calls handed to the worker threads and not finished "
                                  "(queued or running)", registry=r)
        self.checkpoints = Counter("embtrain_checkpoints", "Checkpoint writes, by result", ["result"], registry=r)
        self.group_slices = Counter("embtrain_group_slices", "Slices of group steps received", registry=r)
        self.group_steps = Counter("embtrain_group_steps", "Group steps by outcome (committed, aborted, failed)",
                                   ["result"], registry=r)
        for result in ("committed", "aborted", "failed"):
            self.group_steps.labels(result)
        self.group_wait_seconds = Histogram("embtrain_group_wait_seconds", "How long the first slice of a group "
                                            "step waited for the last", buckets=_LATENCY, registry=r)
        self.replica_up = Gauge("embtrain_replica_group_up", "1 while this replica's process group is formed and "
                                "every replica answers (0 also on a server without replicas)", registry=r)
        self.replica_reforms = Counter("embtrain_replica_reforms", "Times the replicas' process group formed again "
                                       "after a replica was lost or came back", registry=r)
        self.replica_divergence = Counter("embtrain_replica_state_divergence", "Replicated sessions whose state "
                                          "digest differed between replicas (the log says which)", registry=r)
        self.unloaded_checkpoints = Gauge("embtrain_unloaded_checkpoints", "Checkpoints in state_dir that did not "
                                          "load at start (corrupt, or needing a missing extra); the log says which",
                                          registry=r)
        for result in ("ok", "error"):  # both series exist from the start, so increase() sees the first error
            self.checkpoints.labels(result)
        dev = str(device)
        self.device_memory = Gauge("embtrain_device_memory_bytes", "Device memory in use (CPU: process RSS)",
                                   ["device"], registry=r)
        self.device_memory_limit = Gauge("embtrain_device_memory_limit_bytes",
                                         "Device memory in total (CPU: physical RAM)", ["device"], registry=r)
        self.device_memory.labels(dev).set_function(self._memory_in_use)
        self.device_memory_limit.labels(dev).set_function(self._memory_total)
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def _memory_in_use(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.memory_allocated(self.device))
        try:
            with open("/proc/self/statm") as f:
                return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        except OSError:
            return 0.0

    def _memory_total(self) -> float:
        return float(memory_total(self.device))

    def observe_compute(self, loss: str, seconds: float, n: int, stats: dict[str, float], active: int) -> None:
        self.compute_seconds.labels(loss).observe(seconds)
        self.batch_samples.labels(loss).observe(n)
        self.mined_triplets.labels(loss).inc(active)
        selected = stats.get("selected_triplets", 0.0)
        if selected > 0:
            self.active_fraction.labels(loss).observe(stats.get("active_triplets", 0.0) / selected)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (``port`` 0 or -1 picks a free one)."""
        server, thread = start_http_server(max(port, 0), addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http[0].shutdown()
            self._http[0].server_close()
            self._http = None

    def render(self) -> bytes:
        return generate_latest(self.registry)
