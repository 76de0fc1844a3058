"""Server assembly: ``start(config) -> RunningServer`` (separate from the run loop, so tests bind port 0 and run
the server in-process) and ``serve(config)``, the run loop with signal handling and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pathlib
import signal
import socket
import stat
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from embtrain.v1 import embtrain_pb2 as pb

from . import allocator, devices, reflection
from .auth import Authenticator, load_tokens
from .config import ServerConfig
from .identity import IdentityInterceptor
from .metrics import Metrics
from .persistence import Checkpointer
from .scheduler import Scheduler
from .batches import Batches
from .service import Service
from .servicer import Servicer, add_to_server
from .replicas import Replicas
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
    mutual TLS) unless ``insecure`` says the network is trusted. A Unix socket (``unix_socket``) counts as local,
    like loopback: only processes on this host reach it, and its file mode (0600) limits them to this user."""
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


# The socket file's mode: only this user (and root) may connect. Authentication is the same as on TCP (a token
# is still required when tokens are configured); the mode keeps other local users off the socket altogether.
UNIX_SOCKET_MODE = 0o600


def clear_unix_socket(path: str) -> None:
    """Make room to bind ``path``: remove a stale socket left by a previous run. Refuse anything else: a regular
    file, a directory, a link (never deleted), or a socket that a running server still answers on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"unix_socket: {path!r} exists and is not a socket; refusing to replace it (remove it "
                         "or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as exc:
        raise ValueError(f"unix_socket: cannot tell whether {path!r} is still in use ({exc}); remove it if not")
    else:
        raise ValueError(f"unix_socket: {path!r} is in use by a running server")
    finally:
        probe.close()
    log.info("removing stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def bind_unix_socket(server: grpc.aio.Server, path: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind ``unix:path`` (TLS when ``creds``) with mode ``UNIX_SOCKET_MODE``; returns the socket file's inode."""
    clear_unix_socket(path)
    # The umask makes the file 0600 from the moment it exists (no window in which others could connect); it is
    # restored at once, and the chmod below states the mode whatever the umask did.
    umask = os.umask(0o177)
    try:
        address = f"unix:{path}"
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ValueError(f"unix_socket: could not bind {path!r}: {exc}") from None
    finally:
        os.umask(umask)
    if not bound:
        raise ValueError(f"unix_socket: could not bind {path!r}")
    os.chmod(path, UNIX_SOCKET_MODE)
    return os.stat(path).st_ino


def remove_unix_socket(path: str, inode: int) -> None:
    """Remove our socket file (gRPC usually has already), and only ours: not a file another server put there."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == inode:
            os.unlink(path)


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
    unix_path: str = ""  # the Unix socket's absolute path (what stop removes); empty: none
    _unix_inode: int = 0
    _periodic: asyncio.Task | None = None
    replicas: Replicas | None = None  # this server's place in a group of replicas (world_size > 1)
    _serving: asyncio.Task | None = None  # waits for the replicas' group before reporting SERVING

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def unix_address(self) -> str:
        """The gRPC target of the Unix socket as configured (``unix:///abs/path`` or ``unix:relative/path``);
        empty when there is none."""
        path = self.config.unix_socket
        if not path:
            return ""
        return f"unix://{path}" if os.path.isabs(path) else f"unix:{path}"

    async def stop(self, grace: float | None = None) -> int:
        """Graceful stop: NOT_SERVING, finish in-flight batches, checkpoint every session, close. Returns how many
        sessions could not be saved."""
        grace = self.config.drain_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        if self._periodic is not None:
            self._periodic.cancel()
        await self.server.stop(grace)
        if self.unix_path:
            remove_unix_socket(self.unix_path, self._unix_inode)
        failed = 0
        if self.checkpointer.enabled:
            saved, failed = await self.checkpointer.save_all(self.scheduler)
            if failed:
                log.error("checkpointed %d session(s); %d could not be saved and will restart from their last "
                          "checkpoint", saved, failed)
            else:
                log.info("checkpointed %d session(s)", saved)
        if self._serving is not None:
            self._serving.cancel()
        if self.replicas is not None:
            self.replicas.stop()
        self.scheduler.shutdown()
        self.metrics.stop()
        return failed


async def start(config: ServerConfig) -> RunningServer:
    """Build and start a server (port 0 picks a free port). Raises ``ValueError`` for unusable configuration."""
    device = devices.resolve(config.device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    log.info("host memory allocator: %s", allocator.retain_freed_memory(config.malloc_retain_bytes))
    auth = Authenticator(load_tokens(config.token_file, config.tokens))
    check_exposure(config, auth)
    if config.unix_socket:
        clear_unix_socket(config.unix_socket)  # refuse a file in the way before building anything
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
    replicas = None
    if config.world_size > 1:
        replicas = Replicas(config, store, scheduler, metrics, device, batches, checkpointer)
        service.replicas = servicer.replicas = replicas
    identity = IdentityInterceptor(auth, SERVICE_NAME, mtls=bool(config.tls_client_ca), metrics=metrics)
    server = grpc.aio.server(options=grpc_options(config), maximum_concurrent_rpcs=None, interceptors=(identity,))
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:  # grpc.reflection.v1 and v1alpha, each listing both
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    creds = server_credentials(config)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind {address}")
    unix_path, unix_inode = "", 0
    if config.unix_socket:  # same credentials, interceptors and options as TCP
        unix_path = os.path.abspath(config.unix_socket)  # bound as given: its length was checked, not this one's
        unix_inode = bind_unix_socket(server, config.unix_socket, creds)
    if replicas is not None:
        replicas.address = f"{config.node_id or config.host}:{port}"
        replicas.start(asyncio.get_running_loop())  # the group forms in the background
    await server.start()
    metrics_port = 0
    if config.metrics_port:
        metrics_port = metrics.serve(config.metrics_host or config.host, config.metrics_port)
    running = RunningServer(config, server, servicer, health_servicer, metrics, scheduler, checkpointer, port,
                            metrics_port, device, unix_path=unix_path, _unix_inode=unix_inode, replicas=replicas)
    if replicas is None:
        await _report_serving(health_servicer)
    else:  # SERVING once the group has formed (readiness must not wait on it: the pods start together)
        running._serving = asyncio.create_task(_serve_when_formed(health_servicer, replicas))
    if checkpointer.enabled and config.checkpoint_every_seconds > 0:
        running._periodic = asyncio.create_task(checkpointer.run_periodic(scheduler))
    return running


async def _report_serving(health_servicer: health.aio.HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def _serve_when_formed(health_servicer: health.aio.HealthServicer, replicas: Replicas) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    while not replicas.formed.is_set():
        await asyncio.sleep(0.05)
    await _report_serving(health_servicer)
    log.info("%s: the group has formed; serving", replicas.describe())


async def serve(config: ServerConfig, config_path: str | None = None) -> int:
    # Handlers first: a SIGTERM that arrives while the server starts still drains and checkpoints.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(config)
    metrics_text = (f"metrics on http://{config.metrics_host or config.host}:{running.metrics_port}/metrics"
                    if running.metrics_port else "metrics off")
    log.info("embtrain-server%s listening on %s%s (gRPC%s), %s, device %s, config %s, state_dir %s",
             f" {running.replicas.describe()}" if running.replicas else "",
             running.address, f" and {running.unix_address}" if running.unix_address else "",
             ", TLS" if config.tls_cert else "", metrics_text, running.device,
             config_path or "built-in defaults", config.state_dir if config.persist else "(not persisted)")
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", config.drain_seconds)
    failed = await running.stop()
    log.info("embtrain-server stopped")
    return 1 if failed else 0
