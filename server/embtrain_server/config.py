"""Server configuration: one frozen dataclass, filled from defaults < YAML file < environment < flags, and
validated once at the edge. Every field has a flag ``--field-name`` and an environment variable
``EMBTRAIN_FIELD_NAME``; the YAML keys are the field names."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import yaml

from embtrain.wire import DEFAULT_MAX_MESSAGE_BYTES

from .allocator import MAX_RETAIN_BYTES


def _default_state_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "embtrain", "state")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # Also listen on this Unix domain socket (co-located clients: `unix:///path`); empty: none. The same
    # authentication as TCP applies; the socket file is made 0600 and removed on a graceful stop.
    unix_socket: str = ""
    metrics_host: str = ""  # empty: same as host
    metrics_port: int = 9400  # 0: no metrics endpoint; tests use -1 for "any free port"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compute_dtype: str = "input"  # input | float32 | float64
    state_dir: str = dataclasses.field(default_factory=_default_state_dir)
    persist: bool = True  # write checkpoints to state_dir and restore them on start
    checkpoint_every_steps: int = 100  # 0: off
    checkpoint_every_seconds: float = 300.0  # 0: off
    token_file: str = ""
    tokens: str = ""  # "principal:token,principal:token" (normally from EMBTRAIN_TOKENS)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False  # allow a non-loopback address without authentication
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connection_age_seconds: float = 300.0
    max_connection_age_grace_seconds: float = 30.0
    keepalive_time_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    drain_seconds: float = 30.0
    # Threads that run decode/compute/encode; 0: one on a CPU device (torch already uses every core, and more
    # calling threads only make their OpenMP teams compete), four on a GPU (CPU work overlaps the kernels).
    workers: int = 0
    torch_threads: int = 0  # torch's intra-op threads; 0: torch's default (all cores)
    # glibc keeps freed memory up to this many bytes for the next batch instead of unmapping it and faulting it in
    # again (allocator.py); 0: glibc's own thresholds. Resident memory stays at the batches' high-water mark.
    malloc_retain_bytes: int = 1024 * 1024 * 1024
    max_batch_elements: int = 64 * 1024 * 1024  # n x d of one request
    default_max_triplets: int = 100_000
    max_triplets_limit: int = 10_000_000
    memory_budget_bytes: int = 0  # estimate cap for one batch; 0: 80% of the device's memory (CPU: of RAM)
    # A batch whose estimated compute time exceeds this is refused up front (0: no limit); the estimate divides its
    # arithmetic by compute_rate (operations per second; 0: 2e9 on a CPU, 2e12 on a GPU).
    max_compute_seconds: float = 300.0
    compute_rate: float = 0.0
    # On a CPU device, a stateless Compute of a native loss of at most inline_max_bytes, arriving while the workers
    # are idle, whose estimated compute time is at most inline_compute_seconds, is parsed and runs on the event
    # loop: no hand-over to a worker and back (two thread hops, a large share of a small batch's round trip). Larger
    # requests (whose loss spec may be an arbitrarily large Struct) are parsed on a worker. 0: never.
    inline_compute_seconds: float = 0.05
    inline_max_bytes: int = 256 * 1024
    max_sessions_per_principal: int = 64
    max_concurrent_streams: int = 256
    max_inflight_per_stream: int = 8
    node_id: str = ""  # prefix of session ids (the pod name in Kubernetes); empty: none
    # Replicas (``replicas``): R server processes that compute replicated sessions together on torch.distributed.
    # Also the standard WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT variables (below EMBTRAIN_* in precedence).
    world_size: int = 1  # 1: a single server, no process group
    rank: int = 0  # this replica, 0..world_size-1
    master_addr: str = "127.0.0.1"  # where replica 0 keeps the group's store
    master_port: int = 29500
    replica_timeout: float = 10.0  # seconds without a heartbeat before a replica counts as lost
    collective_timeout: float = 60.0  # seconds a collective of the process group may take
    digest_every_steps: int = 10  # replicated sessions compare a digest of their state every N steps (0: off)
    reflection: bool = True
    log_level: str = "INFO"

    def validate(self) -> ServerConfig:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port: expected 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port: expected 0..65535 (0 disables), got {self.metrics_port}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            problems.append(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
        if self.compute_dtype not in ("input", "float32", "float64"):
            problems.append(f"compute_dtype: expected input, float32 or float64, got {self.compute_dtype!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca: needs tls_cert and tls_key (mutual TLS is on top of TLS)")
        if self.torch_threads < 0:
            problems.append(f"torch_threads: expected >= 0 (0: torch's default), got {self.torch_threads}")
        if not 0 <= self.malloc_retain_bytes <= MAX_RETAIN_BYTES:
            problems.append(f"malloc_retain_bytes: expected 0..{MAX_RETAIN_BYTES} (0: glibc's own thresholds), got "
                            f"{self.malloc_retain_bytes}")
        if self.max_compute_seconds < 0 or self.compute_rate < 0:
            problems.append("max_compute_seconds and compute_rate: expected >= 0 (0: no limit / by device)")
        if self.inline_compute_seconds < 0 or self.inline_max_bytes < 0:
            problems.append("inline_compute_seconds and inline_max_bytes: expected >= 0 (0: never inline)")
        if self.workers < 0:
            problems.append(f"workers: expected >= 0 (0: by device), got {self.workers}")
        for name in ("max_batch_elements", "default_max_triplets", "max_triplets_limit",
                     "max_sessions_per_principal", "max_concurrent_streams", "max_inflight_per_stream",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems.append(f"log_level: expected DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.unix_socket:
            problems.extend(_unix_socket_problems(self.unix_socket))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            problems.append(f"world_size and rank: expected world_size >= 1 and 0 <= rank < world_size, got "
                            f"world_size {self.world_size}, rank {self.rank}")
        if not 1 <= self.master_port <= 65535:
            problems.append(f"master_port: expected 1..65535, got {self.master_port}")
        if self.replica_timeout <= 0 or self.collective_timeout <= 0 or self.digest_every_steps < 0:
            problems.append("replica_timeout and collective_timeout: expected > 0; digest_every_steps: expected >= 0")
        if self.node_id and not all(c.isalnum() or c in "-_" for c in self.node_id):
            problems.append(f"node_id: letters, digits, '-' and '_' only, got {self.node_id!r}")
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))
        return self

    def worker_threads(self, device_type: str) -> int:
        return self.workers or (1 if device_type == "cpu" else 4)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The variables every torch.distributed launcher sets, read as the replica settings of the same meaning.
STANDARD_ENV = {"WORLD_SIZE": "world_size", "RANK": "rank", "MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port"}


# sun_path of struct sockaddr_un is 108 bytes on Linux, one of them the terminating NUL.
UNIX_PATH_MAX = 107


def _unix_socket_problems(path: str) -> list[str]:
    """What is wrong with ``unix_socket`` as a path to bind (absolute or relative to the working directory)."""
    if path.startswith("unix:"):
        return [f"unix_socket: expected a file path (the server binds unix:<path> itself), got {path!r}"]
    if "\0" in path:
        return ["unix_socket: the path contains a NUL character"]
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return [f"unix_socket: the path is {size} bytes, longer than the {UNIX_PATH_MAX} a Unix socket address "
                f"holds; choose a shorter one (e.g. under /run or /tmp): {path!r}"]
    name = os.path.basename(path)
    if name in ("", ".", ".."):
        return [f"unix_socket: expected a file path, got the directory {path!r}"]
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return [f"unix_socket: the directory {parent!r} does not exist"]
    return []


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: expected {typ}, got {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embtrain-server",
        description="embtrain: remote loss-and-mining service. Precedence: flags > EMBTRAIN_* env > --config file > defaults.")
    p.add_argument("--config", help="YAML configuration file (env EMBTRAIN_CONFIG)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration as YAML and exit")
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        if typ == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(env EMBTRAIN_{f.name.upper()})")
        else:
            p.add_argument(flag, dest=f.name, default=None, help=f"(env EMBTRAIN_{f.name.upper()})")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """Parse flags, environment and file into a validated ``ServerConfig``. Raises ``ValueError`` on bad values."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    values: dict[str, Any] = {}
    config_path = args.config or env.get("EMBTRAIN_CONFIG")
    by_name = {f.name: f for f in fields(ServerConfig)}
    if config_path:
        data = yaml.safe_load(pathlib.Path(config_path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_path}: expected a mapping of configuration keys")
        unknown = sorted(set(data) - set(by_name))
        if unknown:
            raise ValueError(f"{config_path}: unknown key {unknown[0]!r}; valid keys: {', '.join(by_name)}")
        values.update({k: _coerce(by_name[k], v, f"{config_path}: {k}") for k, v in data.items()})
    for key, name in STANDARD_ENV.items():  # torch.distributed's own variables, below EMBTRAIN_* ones
        if key in env:
            values[name] = _coerce(by_name[name], env[key], key)
    for name, f in by_name.items():
        key = f"EMBTRAIN_{name.upper()}"
        if key in env:
            values[name] = _coerce(f, env[key], key)
    for name, f in by_name.items():
        v = getattr(args, name)
        if v is not None:
            values[name] = _coerce(f, v, "--" + name.replace("_", "-"))
    cfg = ServerConfig(**values).validate()
    args.config_path = config_path
    return cfg, args


def dump_yaml(cfg: ServerConfig) -> str:
    data = cfg.to_dict()
    if data.get("tokens"):
        data["tokens"] = "<redacted>"
    return yaml.safe_dump(data, sort_keys=False)
