"""The SDK: ``Client`` (one per process, safe to share between threads), ``Session`` and the result types.

Inputs may be numpy arrays or torch tensors; results come back as the same kind (torch tensors on the device of
the embeddings). Every ``grpc.RpcError`` becomes an ``EmbtrainError``; what the SDK itself cannot send (a dtype it
cannot encode, a ragged list, a missing loss name) raises ``InvalidArgument`` before anything is sent, with the
message and field violation the server would give.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2

from . import codec
from .structs import struct_to_dict, value_to_python
from . import wire
from .errors import EmbtrainError, InvalidArgument, Unavailable, from_rpc_error, from_status, invalid_argument
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .v1 import embtrain_pb2 as pb
from .v1 import embtrain_pb2_grpc as pb_grpc



@dataclass
class ComputeResult:
    """One batch's answer. ``gradient`` is d loss / d embeddings; ``gradients`` maps every differentiable input
    to its gradient. ``error`` is set (and the rest empty) for a stream batch the server rejected."""

    loss: float = float("nan")
    gradients: dict[str, Any] = field(default_factory=dict)
    triplets: Any = None
    triplets_total: int = 0
    triplets_truncated: bool = False
    triplet_ids: Any = None
    per_item_losses: Any = None
    stats: dict[str, float] = field(default_factory=dict)
    step: int = 0
    request_id: str = ""
    error: EmbtrainError | None = None
    row_offset: int = 0  # group steps: the global index of this member's first row

    @property
    def gradient(self) -> Any:
        return self.gradients.get("embeddings")

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> ComputeResult:
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True)
class LossInfo:
    name: str
    description: str
    family: str
    stateful: bool
    mines_triplets: bool
    inputs: list[dict[str, Any]]
    params: list[dict[str, Any]]


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    loss: str
    params: dict[str, Any]
    step: int
    parameter_count: int
    memory_fill: int
    memory_size: int
    last_checkpoint_step: int
    last_checkpoint_time: float
    optimizer_state: dict[str, Any]
    status: str
    status_message: str
    device: str
    config: dict[str, Any]


@dataclass(frozen=True)
class ExportedModel:
    """A session's head (configuration + safetensors weights) and loss state; see ``embtrain.torch.load_head``."""

    config: dict[str, Any]
    weights: bytes
    state: dict[str, Any]
    step: int


def _session_info(p: pb.SessionInfo) -> SessionInfo:
    c = p.config
    cfg: dict[str, Any] = {"loss": {"name": c.loss.name, "params": struct_to_dict(c.loss.params)}}
    if c.HasField("head"):
        cfg["head"] = value_to_python(c.head)
    if c.HasField("optimizer"):
        cfg["optimizer"] = struct_to_dict(c.optimizer)
    if c.HasField("memory"):
        cfg["memory"] = struct_to_dict(c.memory)
    if c.HasField("seed"):
        cfg["seed"] = int(c.seed)
    if c.HasField("group_size"):
        cfg["group_size"] = int(c.group_size)
        cfg["group_timeout"] = float(c.group_timeout)
    if c.HasField("replicated"):
        cfg["replicated"] = bool(c.replicated)
        cfg["shard"] = bool(c.shard)
    return SessionInfo(
        session_id=p.session_id, loss=c.loss.name, params=cfg["loss"]["params"], step=p.step,
        parameter_count=p.parameter_count, memory_fill=p.memory_fill, memory_size=p.memory_size,
        last_checkpoint_step=p.last_checkpoint_step, last_checkpoint_time=p.last_checkpoint_time,
        optimizer_state=struct_to_dict(p.optimizer_state), status=p.status,
        status_message=p.status_message, device=p.device, config=cfg)


def _is_torch(x: Any) -> bool:
    return codec._is_torch(x)


_NON_FINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _param_default(p: pb.ParamInfo) -> Any:
    """A ListLosses parameter's default as Python: a non-finite number as a float (``default_number``; a server
    older than that field sends the string "inf" in ``default``, read the same way)."""
    if p.HasField("default_number") and not math.isfinite(p.default_number):
        return p.default_number
    if not p.default.WhichOneof("kind"):
        return None
    if p.type == "float" and p.default.WhichOneof("kind") == "string_value" and p.default.string_value in _NON_FINITE:
        return _NON_FINITE[p.default.string_value]
    return json_format.MessageToDict(p.default)


def _struct(d: Mapping[str, Any] | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if d:
        s.update(_plain(d))
    return s


def _plain(x: Any) -> Any:
    """numpy / torch scalars and inf -> JSON-able values for a protobuf Struct."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def _unsendable(exc: codec.TensorError) -> InvalidArgument:
    """A tensor the SDK cannot encode, reported as the server reports a bad input (``codec.TensorError`` is
    internal and never leaves the SDK's public calls)."""
    return invalid_argument(exc.field, exc.expected)


def _malformed(what: str, exc: Exception) -> EmbtrainError:
    """A response the SDK cannot decode: the server's fault, not the caller's."""
    return EmbtrainError(grpc.StatusCode.INTERNAL, f"malformed {what} from the server: {exc}")


def _no_loss() -> InvalidArgument:
    return invalid_argument("loss", "expected a loss name (see `embtrain losses`) for a stateless call, or use a "
                            "Session")


def _batch_inputs(batch: Any, index: int) -> dict[str, Any]:
    """One ``compute_stream`` batch as named inputs (a copy: the caller's dict is left alone)."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return {"embeddings": batch[0], "labels": batch[1]}
    raise invalid_argument(f"batches[{index}]", f"expected (embeddings, labels) or a dict of named inputs, got "
                           f"{type(batch).__name__}")


class _Decoder:
    """Turns response tensors into the caller's kind: numpy (read-only views of the response bytes, no copy) or
    torch on the caller's device (one copy: a writable tensor on the CPU, or the transfer to the GPU)."""

    def __init__(self, like: Any) -> None:
        self.torch = _is_torch(like)
        self.device = like.device if self.torch else None

    def __call__(self, t: Any, name: str) -> Any:
        if not self.torch:
            if t.dtype == pb.DTYPE_BFLOAT16:
                raise EmbtrainError(grpc.StatusCode.INTERNAL, f"{name}: bfloat16 result needs torch inputs")
            return codec.decode_numpy(t, name)
        out = codec.decode_torch(t, name)
        return out.clone() if self.device.type == "cpu" else out.to(self.device)


_COMPUTE = "/embtrain.v1.EmbeddingTrainer/Compute"
_COMPUTE_STREAM = "/embtrain.v1.EmbeddingTrainer/ComputeStream"


def _result(data: bytes, decoder: Callable[[str], _Decoder]) -> ComputeResult:
    """A ComputeResponse's bytes -> result; ``decoder(request_id)`` says which kind of tensors to return."""
    try:
        resp, gradients, tensors = wire.decode_compute_response(data)
    except wire.WireError as exc:
        raise _malformed("ComputeResponse", exc) from None
    dec = decoder(resp.request_id)
    if resp.HasField("error"):
        return ComputeResult(request_id=resp.request_id, error=from_status(resp.error))
    try:
        out = {name: dec(tensors[name], name) if name in tensors else None
               for name in wire.RESPONSE_TENSORS.values()}
        grads = {k: dec(v, f"gradients.{k}") for k, v in gradients.items()}
    except codec.TensorError as exc:
        raise _malformed("ComputeResponse", exc) from None
    return ComputeResult(
        loss=resp.loss,
        gradients=grads,
        triplets=out["triplets"], triplets_total=resp.triplets_total, triplets_truncated=resp.triplets_truncated,
        triplet_ids=out["triplet_ids"], per_item_losses=out["per_item_losses"],
        stats=dict(resp.stats), step=resp.step, request_id=resp.request_id, row_offset=resp.row_offset)


class _Stubs:
    """The generated stub plus Compute / ComputeStream on raw bytes (tensors framed by ``embtrain.wire``)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = pb_grpc.EmbeddingTrainerStub(channel)
        self.compute = channel.unary_unary(_COMPUTE, request_serializer=None, response_deserializer=None)
        self.stream = channel.stream_stream(_COMPUTE_STREAM, request_serializer=None, response_deserializer=None)


UNIX_TLS_SERVER_NAME = "localhost"
_NAME_OVERRIDE = "grpc.ssl_target_name_override"


def is_unix_target(target: str) -> bool:
    """``unix:path``, ``unix:///abs/path`` or ``unix-abstract:name``: a server on this host."""
    return target.startswith(("unix:", "unix-abstract:"))


def replica_addresses(statefulset: str, service: str, replicas: int, port: int = 50051,
                      namespace: str | None = None) -> list[str]:
    """The addresses of a StatefulSet's replicas through its headless Service: ``<statefulset>-<i>.<service>
    [.<namespace>.svc]:<port>`` for i = 0..replicas-1 (what ``Client(replicas=...)`` takes)."""
    domain = f"{service}.{namespace}.svc" if namespace else service
    return [f"{statefulset}-{i}.{domain}:{port}" for i in range(replicas)]


class Client:
    """A connection to an embtrain server.

    ``target`` is ``host:port`` or any gRPC target (``dns:///embtrain-headless.ns.svc:50051`` with
    ``load_balancing="round_robin"`` balances stateless calls over every pod; ``unix:///abs/path`` or
    ``unix:relative/path`` reaches a server on this host through its ``--unix-socket``). ``routing_template`` (e.g.
    ``"{node}.embtrain-headless.ns.svc.cluster.local:50051"``) sends session calls to the pod named in the session
    id (``<node>.<token>``). TLS: ``tls=True`` with optional ``root_certificates`` (PEM bytes or a path) and, for
    mutual TLS, ``certificate_chain`` and ``private_key``; ``tls_server_name``: the name the server's certificate
    must carry when it is not the target's host (default for ``unix:`` targets: ``localhost``). The token travels
    as call metadata, over TLS, plaintext TCP and Unix sockets alike. ``retries``: how often a step-numbered
    session batch is resent while the server is unavailable (safe: the server applies a step once).
    """

    def __init__(self, target: str = "127.0.0.1:50051", token: str | None = None, timeout: float | None = 30.0, *,
                 tls: bool = False, root_certificates: bytes | str | None = None,
                 certificate_chain: bytes | str | None = None, private_key: bytes | str | None = None,
                 max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES, load_balancing: str | None = None,
                 routing_template: str | None = None, options: Iterable[tuple[str, Any]] = (),
                 retries: int = 5, tls_server_name: str | None = None,
                 replicas: Sequence[str] | None = None) -> None:
        if not isinstance(target, str):  # a list of replica addresses
            replicas, target = list(target), list(target)[0]
        self.target = target
        self.replicas = list(replicas) if replicas else []
        self.timeout = timeout
        self.retries = retries
        self._token = token if token is not None else os.environ.get("EMBTRAIN_TOKEN")
        self._tls = tls or any(x is not None for x in (root_certificates, certificate_chain, private_key))
        self._creds = grpc.ssl_channel_credentials(
            _pem(root_certificates), _pem(private_key), _pem(certificate_chain)) if self._tls else None
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes), *options]
        if load_balancing:
            opts.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
        self._options = opts
        self._tls_server_name = tls_server_name
        self._routing = routing_template
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, _Stubs] = {}
        self._stub = self._stubs_for(target).stub

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _channel(self, target: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(target)
            if ch is None:
                ch = (grpc.secure_channel(target, self._creds, options=self._tls_options(target))
                      if self._creds is not None else grpc.insecure_channel(target, options=self._options))
                self._channels[target] = ch
            return ch

    def _tls_options(self, target: str) -> list[tuple[str, Any]]:
        """A unix: target has no host name to check the certificate against (gRPC would use the socket's path):
        check ``tls_server_name``, by default ``localhost``, unless the caller's options name one."""
        name = self._tls_server_name or (UNIX_TLS_SERVER_NAME if is_unix_target(target) else None)
        if name is None or any(k == _NAME_OVERRIDE for k, _ in self._options):
            return self._options
        return [*self._options, (_NAME_OVERRIDE, name)]

    def _stubs_for(self, target: str) -> _Stubs:
        with self._lock:
            stubs = self._stubs.get(target)
        if stubs is None:
            stubs = _Stubs(self._channel(target))
            with self._lock:
                stubs = self._stubs.setdefault(target, stubs)
        return stubs

    def _session_stubs(self, session_id: str | None, rank: int | None = None) -> _Stubs:
        if rank is not None and self.replicas:  # member r of a replicated session: replica r mod R
            return self._stubs_for(self.replicas[rank % len(self.replicas)])
        if session_id and self._routing and "." in session_id:
            return self._stubs_for(self._routing.format(node=session_id.split(".", 1)[0]))
        return self._stubs_for(self.target)

    def _session_stub(self, session_id: str) -> pb_grpc.EmbeddingTrainerStub:
        return self._session_stubs(session_id).stub

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout,
                          metadata=self._metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._stubs.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- service -----------------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The health service's status: "SERVING", "NOT_SERVING", ... (needs no token)."""
        stub = health_pb2_grpc.HealthStub(self._channel(self.target))
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def losses(self) -> list[LossInfo]:
        resp = self._call(self._stub.ListLosses, pb.ListLossesRequest())
        out = []
        for li in resp.losses:
            params = [dict(name=p.name, type=p.type, default=_param_default(p), range=p.range,
                           choices=list(p.choices), description=p.description) for p in li.params]
            inputs = [dict(name=i.name, required=i.required, dtype=i.dtype, shape=i.shape,
                           differentiable=i.differentiable, description=i.description) for i in li.inputs]
            out.append(LossInfo(li.name, li.description, li.family, li.stateful, li.mines_triplets, inputs, params))
        return out

    # ---- compute -----------------------------------------------------------------------------------------
    def _request(self, embeddings: Any, labels: Any, inputs: Mapping[str, Any], *, loss: str | None,
                 params: Mapping[str, Any] | None, session_id: str | None, gradient: bool, triplets: bool,
                 max_triplets: int, per_item_losses: bool, step: int | None = None,
                 rank: int | None = None) -> tuple[str, bytes]:
        """(request id, the ComputeRequest's bytes), tensors framed by hand: one copy of each."""
        req = pb.ComputeRequest(request_id=uuid.uuid4().hex)
        if session_id is not None:
            req.session_id = session_id
            if step is not None:
                if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                    raise invalid_argument("step", f"expected an integer >= 1, got {step!r}")
                req.step = step
            if rank is not None:
                if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
                    raise invalid_argument("rank", f"expected an integer >= 0, got {rank!r}")
                req.rank = rank
        elif step is not None or rank is not None:
            raise invalid_argument("step" if step is not None else "rank", "only session batches have steps and "
                                   "ranks; leave them out for a stateless batch")
        else:
            if not loss:
                raise _no_loss()
            req.loss.name = loss
            req.loss.params.CopyFrom(_struct(params))
        named = {k: v for k, v in inputs.items() if v is not None}
        if embeddings is not None:
            named["embeddings"] = embeddings
        if labels is not None:
            named["labels"] = labels
        req.options.gradient = gradient
        req.options.triplets = triplets
        req.options.max_triplets = max_triplets
        req.options.per_item_losses = per_item_losses
        try:
            return req.request_id, wire.encode_compute_request(req, named)
        except codec.TensorError as exc:
            raise _unsendable(exc) from None

    def compute(self, embeddings: Any = None, labels: Any = None, *, loss: str | None = None,
                params: Mapping[str, Any] | None = None, session_id: str | None = None,
                return_gradient: bool = True, return_triplets: bool = True, max_triplets: int = 0,
                per_item_losses: bool = False, timeout: float | None = None, step: int | None = None,
                rank: int | None = None, **inputs: Any) -> ComputeResult:
        """One batch. Other named inputs are keyword arguments (``gt_distances=``, ``triplets=``, ``centers=``,
        ``ids=``, or a torch loss's own inputs such as ``input=``, ``target=``).

        ``step`` (session batches): the step this batch is. The server applies it only as the session's next step
        and answers a resend of the last applied step with the same answer, so a step-numbered batch is applied
        exactly once however often it is sent: when the server is unavailable (a dropped connection, a restart)
        the SDK resends it by itself, up to ``Client(retries=...)`` times."""
        _, req = self._request(embeddings, labels, inputs, loss=loss, params=params, session_id=session_id,
                               gradient=return_gradient, triplets=return_triplets, max_triplets=max_triplets,
                               per_item_losses=per_item_losses, step=step, rank=rank)
        like = embeddings if embeddings is not None else next(iter(inputs.values()), None)
        dec = _Decoder(like)
        method = self._session_stubs(session_id, rank).compute
        for attempt in range(self.retries + 1 if step is not None else 1):
            try:
                return _result(self._call(method, req, timeout), lambda _: dec)
            except Unavailable:
                if attempt >= self.retries or step is None:
                    raise
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def compute_stream(self, batches: Iterable[Any], *, loss: str | None = None,
                       params: Mapping[str, Any] | None = None, session_id: str | None = None,
                       max_in_flight: int = 4, return_gradient: bool = True, return_triplets: bool = True,
                       max_triplets: int = 0, per_item_losses: bool = False,
                       timeout: float | None = None, first_step: int | None = None,
                       rank: int | None = None) -> Iterator[ComputeResult]:
        """Stream batches (``(X, y)`` tuples or dicts of named inputs) and yield one result per batch, in order.

        At most ``max_in_flight`` batches are sent ahead of their answers. A batch the server rejects comes back
        as a result with ``error`` set; the stream goes on. A batch the SDK cannot send (a dtype it cannot encode,
        a ragged list, not a batch at all) ends the stream: the results of the batches before it are yielded, then
        it raises the ``InvalidArgument`` that ``compute`` raises for it, and nothing after it is read. An
        exception raised by ``batches`` itself is re-raised the same way. ``timeout`` bounds the whole stream
        (default none). ``max_in_flight`` and the loss are checked when this is called, not at the first result.

        ``first_step`` (session streams): number the batches ``first_step``, ``first_step + 1``, ... so that each
        is applied exactly once (see ``compute``); after a rejected batch the later ones are refused in-band with
        FAILED_PRECONDITION naming the expected step, and a new stream resends from there.
        """
        if max_in_flight < 1:
            raise invalid_argument("max_in_flight", f"expected >= 1, got {max_in_flight}")
        if session_id is None and not loss:
            raise _no_loss()
        window = threading.Semaphore(max_in_flight)
        decoders: dict[str, _Decoder] = {}
        stop = threading.Event()
        # What ended the request stream early. Raised inside the request iterator, an exception would reach gRPC,
        # whose consuming thread cancels the call as UNKNOWN "Exception iterating requests!" and loses the answers
        # to the batches already sent. Ending the request stream instead lets the server answer those first; the
        # response loop raises this once the server has ended the stream.
        failed: list[Exception] = []

        def requests() -> Iterator[bytes]:
            try:
                for index, batch in enumerate(batches):
                    named = _batch_inputs(batch, index)
                    emb, lab = named.pop("embeddings", None), named.pop("labels", None)
                    request_id, req = self._request(emb, lab, named, loss=loss, params=params,
                                                    session_id=session_id, gradient=return_gradient,
                                                    triplets=return_triplets, max_triplets=max_triplets,
                                                    per_item_losses=per_item_losses,
                                                    step=None if first_step is None else first_step + index,
                                                    rank=rank)
                    decoders[request_id] = _Decoder(emb)
                    while not window.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    yield req
            except Exception as exc:  # noqa: BLE001 - handed to the response loop, raised there
                failed.append(exc)

        def results() -> Iterator[ComputeResult]:
            call = self._session_stubs(session_id, rank).stream(requests(), timeout=timeout, metadata=self._metadata())
            try:
                for data in call:
                    window.release()
                    yield _result(data, lambda rid: decoders.pop(rid, None) or _Decoder(None))
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            finally:
                stop.set()
                call.cancel()
            if failed:
                raise failed[0]

        return results()

    # ---- sessions ----------------------------------------------------------------------------------------
    def create_session(self, loss: str, params: Mapping[str, Any] | None = None, *, head: Any = None,
                       optimizer: Mapping[str, Any] | None = None, memory: Mapping[str, Any] | None = None,
                       seed: int | None = None, initial_state: Mapping[str, Any] | None = None,
                       group_size: int | None = None, group_timeout: float | None = None,
                       replicated: bool = False, shard: bool = False) -> Session:
        """A server-side session. ``group_size=W``: W members (``session.member(rank)``) each send their slice of
        every step, and the server computes the step on the slices concatenated in rank order; a step waits at most
        ``group_timeout`` seconds (default 60) for all of them, then aborts (``embtrain.Aborted``).

        ``replicated=True`` (a server that is one of several replicas): the session exists on every replica and
        its steps are computed by all of them, bit for bit as one server would; ``shard=True`` (implies
        replicated) splits the anchors of each step between the replicas instead (memory per replica about 1/R,
        results within float round-off). Give the client the replicas' addresses (``Client([a0, a1, ...])`` or
        ``replicas=``, see ``replica_addresses``) and member r talks to replica ``r mod R`` by itself."""
        cfg = pb.SessionConfig()
        cfg.loss.name = loss
        cfg.loss.params.CopyFrom(_struct(params))
        if head is not None:
            cfg.head.CopyFrom(json_format.ParseDict(_plain(head), struct_pb2.Value()))
        if optimizer is not None:
            cfg.optimizer.CopyFrom(_struct(optimizer))
        if memory is not None:
            cfg.memory.CopyFrom(_struct(memory))
        if seed is not None:
            cfg.seed = seed
        if group_size is not None:
            cfg.group_size = group_size
        if group_timeout is not None:
            cfg.group_timeout = group_timeout
        if replicated or shard:
            cfg.replicated = True
            cfg.shard = bool(shard)
        for name, value in (initial_state or {}).items():
            try:
                cfg.initial_state[name].CopyFrom(codec.encode(value, f"initial_state.{name}"))
            except codec.TensorError as exc:
                raise _unsendable(exc) from None
        resp = self._call(self._stub.CreateSession, pb.CreateSessionRequest(config=cfg))
        return Session(self, resp.session.session_id)

    def get_session(self, session_id: str) -> Session:
        sess = Session(self, session_id)
        sess.info()  # raises NotFound
        return sess

    def list_sessions(self) -> list[SessionInfo]:
        return [_session_info(s) for s in self._call(self._stub.ListSessions, pb.ListSessionsRequest()).sessions]


class Session:
    """A server-side session: loss configuration, trainable state (head, centres, optimiser, memory), step."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.id = session_id

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def _stub(self) -> pb_grpc.EmbeddingTrainerStub:
        return self.client._session_stub(self.id)

    def compute(self, embeddings: Any, labels: Any = None, **kwargs: Any) -> ComputeResult:
        return self.client.compute(embeddings, labels, session_id=self.id, **kwargs)

    def stream(self, batches: Iterable[Any], **kwargs: Any) -> Iterator[ComputeResult]:
        return self.client.compute_stream(batches, session_id=self.id, **kwargs)

    def member(self, rank: int) -> Member:
        """Member ``rank`` of a group session: sends that rank's slice of each step."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise invalid_argument("rank", f"expected an integer >= 0, got {rank!r}")
        return Member(self, rank)

    def embed(self, embeddings: Any, batch_size: int = 65536) -> Any:
        """The head's output for ``embeddings`` (no training), in batches of ``batch_size`` rows."""
        dec = _Decoder(embeddings)
        parts = []
        for start in range(0, max(len(embeddings), 1), batch_size):
            chunk = embeddings[start:start + batch_size]
            try:
                req = pb.EmbedRequest(session_id=self.id, embeddings=codec.encode(chunk, "embeddings"))
            except codec.TensorError as exc:
                raise _unsendable(exc) from None
            resp = self.client._call(self._stub().Embed, req)
            try:
                parts.append(dec(resp.embeddings, "embeddings"))
            except codec.TensorError as exc:
                raise _malformed("EmbedResponse", exc) from None
        if len(parts) == 1:
            return parts[0]
        if dec.torch:
            import torch

            return torch.cat(parts)
        return np.concatenate(parts)

    def info(self) -> SessionInfo:
        req = pb.GetSessionRequest(session_id=self.id)
        return _session_info(self.client._call(self._stub().GetSession, req).session)

    def save_checkpoint(self) -> int:
        return self.client._call(self._stub().SaveCheckpoint, pb.SaveCheckpointRequest(session_id=self.id)).step

    def export_model(self) -> ExportedModel:
        resp = self.client._call(self._stub().ExportModel, pb.ExportModelRequest(session_id=self.id))
        try:
            state = {k: codec.decode_numpy(v, f"state.{k}") for k, v in resp.state.items()}
        except codec.TensorError as exc:
            raise _malformed("ExportModelResponse", exc) from None
        return ExportedModel(config=json.loads(resp.config_json), weights=resp.weights, state=state, step=resp.step)

    def close(self, keep_checkpoint: bool = False) -> SessionInfo:
        req = pb.CloseSessionRequest(session_id=self.id, keep_checkpoint=keep_checkpoint)
        return _session_info(self.client._call(self._stub().CloseSession, req).session)


class Member:
    """One member of a group session (``Session.member(rank)``). Every slice names its step; the answer carries
    the global loss and stats, this member's gradient rows, the triplets that touch its rows as global row indices
    (``triplet_ids`` as dataset ids where ``ids`` were sent) and ``row_offset``, its first row's global index."""

    def __init__(self, session: Session, rank: int) -> None:
        self.session = session
        self.rank = rank

    def __repr__(self) -> str:
        return f"Member({self.session.id!r}, rank={self.rank})"

    def compute(self, embeddings: Any, labels: Any = None, *, step: int, **kwargs: Any) -> ComputeResult:
        """This member's slice of ``step``; waits until every member's slice has arrived (or the step aborts)."""
        kwargs.setdefault("timeout", None)  # the server bounds the wait (the session's group_timeout)
        return self.session.client.compute(embeddings, labels, session_id=self.session.id, step=step,
                                           rank=self.rank, **kwargs)

    def stream(self, batches: Iterable[Any], *, first_step: int, **kwargs: Any) -> Iterator[ComputeResult]:
        """This member's slices of steps ``first_step``, ``first_step + 1``, ... over one stream."""
        return self.session.client.compute_stream(batches, session_id=self.session.id, first_step=first_step,
                                                  rank=self.rank, **kwargs)


def _pem(x: bytes | str | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    with open(x, "rb") as f:
        return f.read()
