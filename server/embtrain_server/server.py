"""Server assembly: ``start(config) -> RunningServer`` (separate from the run loop, so tests bind port 0 and run
the server in-process) and ``serve(config)``, the run loop with signal handling and graceful drain."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import pathlib
import signal
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embtrain.v1 import embtrain_pb2 as pb

from . import devices
from .auth import Authenticator, load_tokens
from .config import ServerConfig
from .identity import IdentityInterceptor
from .metrics import Metrics
from .persistence import Checkpointer
from .scheduler import Scheduler
from .batches import Batches
from .service import Service
from .servicer import Servicer, add_to_server
from .sessions import SessionStore

log = logging.getLogger("embtrain.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingTrainer"].full_name


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServerConfig, auth: Authenticator) -> None:
    """Refuse a non-loopback address without authentication (bearer tokens, or client certificates under
    mutual TLS) unless ``insecure`` says the network is trusted."""
    authenticated = auth.enabled or bool(config.tls_client_ca)
    if not is_loopback(config.host) and not authenticated and not config.insecure:
        raise ValueError(
            f"refusing to listen on {config.host or 'every address'} without authentication: anyone who can reach "
            "this address could use and read every session. Configure --token-file (or EMBTRAIN_TOKENS) or mutual "
            "TLS (--tls-client-ca), or pass --insecure if the network is trusted.")


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_connection_age_ms", ms(config.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(config.max_connection_age_grace_seconds)),
        ("grpc.keepalive_time_ms", ms(config.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    key = pathlib.Path(config.tls_key).read_bytes()
    cert = pathlib.Path(config.tls_cert).read_bytes()
    ca = pathlib.Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class RunningServer:
    config: ServerConfig
    server: grpc.aio.Server
    servicer: Servicer
    health: health.aio.HealthServicer
    metrics: Metrics
    scheduler: Scheduler
    checkpointer: Checkpointer
    port: int
    metrics_port: int
    device: torch.device
    _periodic: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> int:
        """Graceful stop: NOT_SERVING, finish in-flight batches, checkpoint every session, close. Returns how many
        sessions could not be saved."""
        grace = self.config.drain_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        if self._periodic is not None:
            self._periodic.cancel()
        await self.server.stop(grace)
        failed = 0
        if self.checkpointer.enabled:
            saved, failed = await self.checkpointer.save_all(self.scheduler)
            if failed:
                log.error("checkpointed %d session(s); %d could not be saved and will restart from their last "
                          "checkpoint", saved, failed)
            else:
                log.info("checkpointed %d session(s)", saved)
        self.scheduler.shutdown()
        self.metrics.stop()
        return failed


async def start(config: ServerConfig) -> RunningServer:
    """Build and start a server (port 0 picks a free port). Raises ``ValueError`` for unusable configuration."""
    device = devices.resolve(config.device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    auth = Authenticator(load_tokens(config.token_file, config.tokens))
    check_exposure(config, auth)
    metrics = Metrics(device)
    store = SessionStore(device, config.node_id, config.max_sessions_per_principal)
    checkpointer = Checkpointer(config, store, metrics)
    checkpointer.check_state_dir()
    loaded, corrupt = checkpointer.restore_all(device)
    if loaded or corrupt:
        log.info("restored %d session(s) from %s (%d corrupt, moved aside)", loaded, config.state_dir, corrupt)
    metrics.open_sessions.set(len(store))
    scheduler = Scheduler(config.worker_threads(device.type), metrics)
    service = Service(config, device, store, checkpointer, metrics)
    batches = Batches(config, device, store, checkpointer, metrics)
    servicer = Servicer(service, batches, scheduler, config, metrics)
    identity = IdentityInterceptor(auth, SERVICE_NAME, mtls=bool(config.tls_client_ca), metrics=metrics)
    server = grpc.aio.server(options=grpc_options(config), maximum_concurrent_rpcs=None, interceptors=(identity,))
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    creds = server_credentials(config)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind {address}")
    await server.start()
    metrics_port = 0
    if config.metrics_port:
        metrics_port = metrics.serve(config.metrics_host or config.host, config.metrics_port)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(config, server, servicer, health_servicer, metrics, scheduler, checkpointer, port,
                            metrics_port, device)
    if checkpointer.enabled and config.checkpoint_every_seconds > 0:
        running._periodic = asyncio.create_task(checkpointer.run_periodic(scheduler))
    return running


async def serve(config: ServerConfig, config_path: str | None = None) -> int:
    # Handlers first: a SIGTERM that arrives while the server starts still drains and checkpoints.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(config)
    metrics_text = (f"metrics on http://{config.metrics_host or config.host}:{running.metrics_port}/metrics"
                    if running.metrics_port else "metrics off")
    log.info("embtrain-server listening on %s (gRPC%s), %s, device %s, config %s, state_dir %s",
             running.address, ", TLS" if config.tls_cert else "", metrics_text, running.device,
             config_path or "built-in defaults", config.state_dir if config.persist else "(not persisted)")
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", config.drain_seconds)
    failed = await running.stop()
    log.info("embtrain-server stopped")
    return 1 if failed else 0
