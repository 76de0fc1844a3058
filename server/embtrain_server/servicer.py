"""The gRPC servicer: transport only. Each RPC parses (garbage becomes INVALID_ARGUMENT), reads the caller that the
identity interceptor settled, hands the request to the service through the scheduler (a session's calls one at a
time, on worker threads), translates errors (``translate``) and records the edge metrics. Torch work never runs on
the event loop; stream reading is ``streams.StreamPump``.

A message that is not valid protobuf becomes INVALID_ARGUMENT (grpc's own deserialiser would answer UNKNOWN with a
Python exception in the text): ``add_to_server`` registers every method with a parser that never raises.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from embtrain import wire
from embtrain.errors import status_code
from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc

from .config import ServerConfig
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from .groups import GroupSteps
from .identity import current_principal
from .metrics import Metrics
from .scheduler import Admission, Scheduler
from . import cancellation
from .batches import Batches
from .service import Service, replicas_of
from .streams import Draining, StreamPump
from .translate import to_grpc_status, to_status_proto

log = logging.getLogger("embtrain.servicer")
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingTrainer"]
DRAINING_MESSAGE = "the server is shutting down; retry on another replica"
DRAINED_STREAM_MESSAGE = "the server is shutting down; the batches answered so far are applied"


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes are not a valid message of the method's type (what the parser hands on)."""

    type_name: str
    size: int

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf spelling, so metrics treat both alike
        return self.size

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"request: not a valid {self.type_name} message ({self.size} bytes that do not "
                               "parse as protobuf)", field="request")


def _parser(cls: type[Message]) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return Malformed(name, len(data))

    return parse


@dataclass(frozen=True)
class Unparsed:
    """Request bytes whose parsing waits for a worker: a message that may carry an arbitrarily large parameter
    Struct (a stateless Compute's loss spec, a CreateSession's configuration) is not parsed on the event loop."""

    data: bytes
    type_name: str

    def ByteSize(self) -> int:  # noqa: N802 - the protobuf spelling, so metrics treat both alike
        return len(self.data)

    def parse(self) -> Any:
        try:
            if self.type_name == pb.ComputeRequest.DESCRIPTOR.full_name:
                return wire.parse_compute_request(self.data)
            return pb.CreateSessionRequest.FromString(self.data)
        except (wire.WireError, DecodeError, ValueError, RuntimeError):
            raise Malformed(self.type_name, len(self.data)).error() from None


def _parse_compute(data: bytes) -> wire.WireRequest | Unparsed | Malformed:
    """ComputeRequest with its tensors left in the received bytes (the service decodes them as views). A stateless
    one needs no session order, so it is parsed on its worker."""
    name = pb.ComputeRequest.DESCRIPTOR.full_name
    try:
        if wire.compute_request_head(data)[0] == "loss":
            return Unparsed(data, name)
        return wire.parse_compute_request(data)
    except wire.WireError:
        return Malformed(name, len(data))


def _parse_later(data: bytes) -> Unparsed:
    return Unparsed(data, pb.CreateSessionRequest.DESCRIPTOR.full_name)


def _serialize(resp: Message | bytes) -> bytes:
    """Compute answers arrive already encoded (tensors framed by hand); the in-band errors are messages."""
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


def _size(resp: Message | bytes) -> int:
    return len(resp) if isinstance(resp, bytes) else resp.ByteSize()


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the service with request parsers that turn garbage into ``Malformed`` (in place of the generated
    ``add_EmbeddingTrainerServicer_to_server``, whose parsers raise), and the Compute methods on the fast path
    (tensors read and written without copies through protobuf objects)."""
    handlers = {}
    for m in SERVICE.methods:
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        fast = req_cls is pb.ComputeRequest
        parse = _parse_compute if fast else _parse_later if req_cls is pb.CreateSessionRequest else _parser(req_cls)
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=parse,
                                response_serializer=_serialize if fast else resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _ended(context: grpc.aio.ServicerContext) -> threading.Event:
    """An event set when the call ends (answered, cancelled, deadline passed): work still running for it stops at
    its next block (``cancellation``)."""
    ended = threading.Event()
    context.add_done_callback(lambda _: ended.set())
    return ended


def _request_id(req: Any) -> str:
    """The request id to echo in an in-band error (an unparsed request's, read from its bytes)."""
    if isinstance(req, Unparsed):
        return wire.compute_request_head(req.data)[1]  # checked when it arrived: the walk cannot fail
    return str(getattr(req, "request_id", ""))


def _parsed_first(handler: Callable[[Any, str], T]) -> Callable[[Any, str], T]:
    """``handler`` taking a request that may still be ``Unparsed`` (parsed here, on the worker)."""
    def run(request: Any, principal: str) -> T:
        return handler(request.parse() if isinstance(request, Unparsed) else request, principal)
    return run


def _session_id(request: Any) -> str | None:
    """The session whose order a request joins (None: it needs none)."""
    if isinstance(request, (Malformed, Unparsed)):
        return None
    if isinstance(request, (pb.ComputeRequest, wire.WireRequest)):
        return request.session_id if request.WhichOneof("target") == "session_id" else None
    return getattr(request, "session_id", None) or None


class Servicer(pb_grpc.EmbeddingTrainerServicer):
    def __init__(self, service: Service, batches: Batches, scheduler: Scheduler, config: ServerConfig,
                 metrics: Metrics) -> None:
        self.service = service
        self.batches = batches
        self.scheduler = scheduler
        # A queue as long as the streams' read-ahead allows: beyond it a request is refused, not held.
        self.admission = Admission(batches.limits.memory_budget, config.max_concurrent_streams * 2, metrics)
        self.groups = GroupSteps(scheduler, metrics)
        self.replicas: Any = None  # ``replicas.Replicas`` on a server that is one of several replicas
        self.config = config
        self.metrics = metrics
        self.draining = asyncio.Event()
        self.open_streams = 0
        # The labelled series of the edge metrics, looked up once per method (not on every request).
        methods = [m.name for m in SERVICE.methods]
        self._received = {m: metrics.received_bytes.labels(m) for m in methods}
        self._sent = {m: metrics.sent_bytes.labels(m) for m in methods}
        self._seconds = {m: metrics.request_seconds.labels(m) for m in methods}
        self._requests: dict[tuple[str, str], Any] = {}

    def _count(self, method: str, code: str) -> None:
        child = self._requests.get((method, code))
        if child is None:
            child = self._requests[(method, code)] = self.metrics.requests.labels(method, code)
        child.inc()

    def on_worker(self, handler: Callable[[Any, str], Any]) -> Callable[..., Awaitable[Any]]:
        """A service handler run by the scheduler (under the session's order when the request names one)."""
        async def call(request: Any, principal: str, cancelled: Callable[[], bool], stop: threading.Event) -> Any:
            return await self.scheduler.run(_parsed_first(handler), request, principal,
                                            session_id=_session_id(request), cancelled=cancelled, stop=stop)
        return call

    async def unary(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    call: Callable[[Any, str, Callable[[], bool], threading.Event], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        code = "OK"
        self._received[method].inc(request.ByteSize())
        try:
            if self.draining.is_set():
                raise Unavailable(DRAINING_MESSAGE)
            if isinstance(request, Malformed):
                raise request.error()
            async with self.admission.hold(request.ByteSize()):
                resp = await call(request, current_principal(), context.cancelled, _ended(context))
            self._sent[method].inc(_size(resp))
            return resp
        except ServiceError as err:
            code = err.code_name
            await context.abort_with_status(to_grpc_status(err))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as err:  # noqa: BLE001 - never crash on a request
            if isinstance(err, grpc.aio.AbortError):
                raise
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort_with_status(to_grpc_status(err))
        finally:
            self._count(method, code)
            self._seconds[method].observe(time.perf_counter() - started)

    async def compute(self, req: Any, principal: str, cancelled: Callable[[], bool] = lambda: False,
                      stop: threading.Event | None = None, withdrawn: Callable[[], bool] | None = None) -> bytes:
        """One Compute batch: a whole step on a worker, or a member's slice of a group step, which waits for the
        other members' slices (``groups``) without holding a worker. ``stop`` is set when the call ends. A session
        batch is decoded and checked as far as it can be without the session's state (``Batches.prepare``) as soon
        as it arrives, on a worker, while the session's earlier batches still run. ``withdrawn`` (a stream's
        whole-step batches): checked on the worker as the batch would start; if it holds, ``Withdrawn``."""
        if isinstance(req, Unparsed):  # stateless: parsed, decoded and checked, computed and answered off the loop
            run = self.batches.run_stateless
            if withdrawn is None and self._inline(req):
                # A small batch while the workers are idle: here, without a hand-over to a worker and back.
                prepared = self._stateless_batch(req, principal)
                if self.batches.runs_inline(prepared):
                    with cancellation.scope(stop):
                        return run(prepared)
                return await self.scheduler.run(run, prepared, stop=stop)
            return await self.scheduler.run(run if withdrawn is None else _unless(withdrawn, run), stop=stop,
                                            prepare=functools.partial(self._stateless_batch, req, principal))
        session = self.batches.session_for(req, principal)
        if session is not None and session.spec.replicated:  # computed by the replicas together
            replicas_of(self.replicas, session).require_up()
            try:
                part = await self.scheduler.run(self.batches.slice_of, req, session, session_id=session.id,
                                                cancelled=cancelled)
            except FailedPrecondition:
                # The next step after one the group committed, before this replica has applied that one: soon.
                if req.HasField("step") and req.step == session.step + 2 and await self.replicas.committed(
                        session.id, session.step + 1):
                    raise Unavailable(f"step: this replica is still applying step {session.step + 1}; resend step "
                                      f"{req.step} (the SDK does so by itself)") from None
                raise
            if isinstance(part, bytes):
                return part
            return await self.replicas.submit(session, part, functools.partial(self.batches.check_slices, session))
        if session is None or session.spec.group_size == 1:
            fn = self.batches.compute
            return await self.scheduler.run(
                fn if withdrawn is None else _unless(withdrawn, fn), req, principal, session_id=_session_id(req),
                cancelled=cancelled, stop=stop,
                prepare=None if session is None else functools.partial(self.batches.prepare, req, session))
        part = await self.scheduler.run(self.batches.slice_of, req, session, session_id=session.id,
                                        cancelled=cancelled,
                                        prepare=functools.partial(self.batches.prepare, req, session))
        if isinstance(part, bytes):  # the kept answer of the last step
            return part
        return await self.groups.submit(session, part, functools.partial(self.batches.check_slices, session),
                                        self.batches.commit_step)

    def _inline(self, req: Unparsed) -> bool:
        # Idle: no work on the workers or queued, and no step holding device memory (a replicated step computes on
        # its own thread), so the batch never waits on the event loop.
        return (self.batches.inline and len(req.data) <= self.config.inline_max_bytes and self.scheduler.idle()
                and not self.batches.working.in_use)

    def _stateless_batch(self, req: Unparsed, principal: str) -> Any:
        return self.batches.stateless_batch(req.parse(), principal)

    # ---- RPCs --------------------------------------------------------------------------------------------
    async def Compute(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("Compute", request, context, self.compute)

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CreateSession", request, context, self.on_worker(self.service.create_session))

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("GetSession", request, context, self.on_worker(self.service.get_session))

    async def ListSessions(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ListSessions", request, context, self.on_worker(self.service.list_sessions))

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CloseSession", request, context, self.on_worker(self.service.close_session))

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("Embed", request, context, self.on_worker(self.service.embed))

    async def ExportModel(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ExportModel", request, context, self.on_worker(self.service.export_model))

    async def SaveCheckpoint(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("SaveCheckpoint", request, context, self.on_worker(self.service.save_checkpoint))

    async def ListLosses(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ListLosses", request, context, self.on_worker(self.service.list_losses))

    async def ComputeStream(self, request_iterator: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[bytes | pb.ComputeResponse]:
        method = "ComputeStream"
        try:
            if self.draining.is_set():
                raise Unavailable(DRAINING_MESSAGE)
            if self.open_streams >= self.config.max_concurrent_streams:
                raise ResourceExhausted(f"streams: {self.open_streams} open, the server's max_concurrent_streams; "
                                        "retry later", field="streams")
        except ServiceError as err:
            self._count(method, err.code_name)
            await context.abort_with_status(to_grpc_status(err))
            return
        chain = _StreamChain(self, current_principal(), _ended(context))
        self.open_streams += 1
        self.metrics.open_streams.inc()
        try:
            async with StreamPump(request_iterator, self.config.max_inflight_per_stream, self.draining,
                                  self.metrics.stream_pending, chain.start) as pump:
                while (resp := await pump.next()) is not None:
                    if isinstance(resp, NotFound):  # stream-level: the stream targets a session that is not there
                        self._count(method, resp.code_name)
                        await context.abort_with_status(to_grpc_status(resp))
                    yield resp
                    pump.answered()
        except Draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINED_STREAM_MESSAGE)
        finally:
            self.open_streams -= 1
            self.metrics.open_streams.dec()

    async def stream_batch(self, req: Any, chain: _StreamChain, previous: asyncio.Future[Any] | None,
                           admitted_before: asyncio.Event | None, admitted: asyncio.Event
                           ) -> bytes | pb.ComputeResponse | NotFound:
        """One batch of a ComputeStream, started when it is read (``StreamPump``), while the batches before it
        may still run. What must stay in arrival order does: admission (each batch enters it after the one before
        it), a session's order (taken right after admission, with no wait in between, so in arrival order too;
        kept by the scheduler, which also runs the decoding and checks of the batch early: ``Batches.prepare``),
        and a group or replicated session's slices, whose batch starts only once the one before it has finished.
        A batch that has not started when the server drains raises ``Draining`` (never applied). Returns the
        answer (in-band errors included) or the ``NotFound`` that ends the stream."""
        method = "ComputeStream"
        started = time.perf_counter()
        self._received[method].inc(req.ByteSize())
        try:
            try:
                session = None
                if not isinstance(req, (Malformed, Unparsed)):
                    session = self.batches.session_for(req, chain.principal)
                serial = session is not None and (session.spec.group_size > 1 or session.spec.replicated)
                if serial and previous is not None:
                    await asyncio.wait((previous,))
                if admitted_before is not None:
                    await admitted_before.wait()
                if isinstance(req, Malformed):
                    raise req.error()
                if self.draining.is_set():
                    raise Draining
                async with self.admission.hold(req.ByteSize()):
                    admitted.set()
                    resp = await self.compute(req, chain.principal, stop=chain.stop,
                                              withdrawn=None if serial else self.draining.is_set)
            finally:
                admitted.set()
        except Draining:  # not started (``Withdrawn`` too): the stream ends here
            raise
        except NotFound as err:
            return err
        except Exception as err:  # noqa: BLE001 - a bad batch must not end the stream or the server
            if not isinstance(err, ServiceError):
                log.exception("ComputeStream batch %r failed", _request_id(req))
            resp = pb.ComputeResponse(request_id=_request_id(req), error=to_status_proto(err))
        self._count(method, "OK" if isinstance(resp, bytes) else status_code(resp.error.code).name)
        self._seconds[method].observe(time.perf_counter() - started)
        self._sent[method].inc(_size(resp))
        return resp


class Withdrawn(Draining):
    """A stream batch whose turn came while the server drains: not started, never applied."""


def _unless(withdrawn: Callable[[], bool], fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, refused with ``Withdrawn`` when ``withdrawn()`` holds as it would start (checked on the worker)."""
    def run(*args: Any, **kwargs: Any) -> T:
        if withdrawn():
            raise Withdrawn
        return fn(*args, **kwargs)
    return run


class _StreamChain:
    """The batches of one ComputeStream, linked in arrival order (``Servicer.stream_batch``)."""

    def __init__(self, servicer: Servicer, principal: str, stop: threading.Event) -> None:
        self.servicer, self.principal, self.stop = servicer, principal, stop
        self.last: asyncio.Future[Any] | None = None
        self.last_admitted: asyncio.Event | None = None

    def start(self, req: Any) -> asyncio.Future[Any]:
        admitted = asyncio.Event()
        task = asyncio.ensure_future(self.servicer.stream_batch(req, self, self.last, self.last_admitted, admitted))
        self.last, self.last_admitted = task, admitted
        return task


__all__ = ["Malformed", "Servicer", "add_to_server"]
