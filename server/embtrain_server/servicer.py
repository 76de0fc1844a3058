"""The gRPC servicer: thin. It authenticates, orders the batches of each session, hands every request to a
worker thread running the transport-agnostic ``Service``, maps errors through ``translate`` and records the
edge metrics. Torch work never runs on the event loop.

Three guarantees live here because only the transport layer can give them:

* A message that is not valid protobuf becomes INVALID_ARGUMENT (grpc's own deserialiser would answer UNKNOWN
  with a Python exception in the text): ``add_to_server`` registers every method with a parser that never raises.
* A cancelled or expired request frees what it holds: it leaves the worker queue if it has not started; if it has,
  the session's order lock stays held until the worker finishes, so the next batch never overlaps it.
* A stream holds at most ``max_inflight_per_stream`` batches that are received and not yet answered (the reader
  stops reading, and HTTP/2 flow control pushes back on the client), and it ends promptly when the server drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from embtrain import wire
from embtrain.errors import status_code
from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc

from .auth import Authenticator
from .config import ServerConfig
from .errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from .metrics import Metrics
from .service import Service
from .translate import to_grpc_status, to_status_proto

log = logging.getLogger("embtrain.servicer")
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["EmbeddingTrainer"]
DRAINING_MESSAGE = "the server is shutting down; retry on another replica"
_END = object()  # end of a stream's requests


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


def _parse_compute(data: bytes) -> wire.WireRequest | Malformed:
    """ComputeRequest with its tensors left in the received bytes (the service decodes them as views)."""
    try:
        return wire.parse_compute_request(data)
    except wire.WireError:
        return Malformed(pb.ComputeRequest.DESCRIPTOR.full_name, len(data))


def _serialize(resp: Message | bytes) -> bytes:
    """Compute answers arrive already encoded (tensors framed by hand); the in-band errors are messages."""
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


def _size(resp: Message | bytes) -> int:
    return len(resp) if isinstance(resp, bytes) else resp.ByteSize()


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the service with request parsers that turn garbage into ``Malformed`` (in place of the generated
    ``add_EmbeddingTrainerServicer_to_server``, whose parsers raise), and the Compute methods on the fast path
    (tensors read and written without copies through protobuf objects; the bytes on the wire are unchanged)."""
    handlers = {}
    for m in SERVICE.methods:
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        fast = req_cls is pb.ComputeRequest
        handlers[m.name] = make(getattr(servicer, m.name),
                                request_deserializer=_parse_compute if fast else _parser(req_cls),
                                response_serializer=_serialize if fast else resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class Servicer(pb_grpc.EmbeddingTrainerServicer):
    def __init__(self, service: Service, auth: Authenticator, config: ServerConfig, metrics: Metrics,
                 executor: ThreadPoolExecutor) -> None:
        self.service = service
        self.auth = auth
        self.config = config
        self.metrics = metrics
        self.executor = executor
        self.draining = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        self.open_streams = 0
        self.inflight = 0  # requests submitted to the workers and not finished
        self.pending_batches = 0  # stream batches received and not yet answered, over all streams

    # ---- helpers -----------------------------------------------------------------------------------------
    def lock(self, session_id: str) -> asyncio.Lock:
        """The per-session order: batches of one session run one at a time, in arrival order (FIFO lock)."""
        lk = self._locks.get(session_id)
        if lk is None:
            lk = self._locks[session_id] = asyncio.Lock()
        return lk

    async def work(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a worker thread.

        If the caller is cancelled (client cancel, deadline) before the work starts, the work is dropped from
        the queue; once it runs it cannot be stopped, so the caller waits for it before letting the
        cancellation through: whatever lock the caller holds (the session's order) covers the whole run.
        """
        cf = self.executor.submit(fn, *args)
        fut = asyncio.wrap_future(cf)
        self.inflight += 1
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not cf.cancel():
                while not fut.done():
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        continue
                    except Exception:  # noqa: BLE001 - the caller is gone; the outcome has nowhere to go
                        break
            raise
        finally:
            self.inflight -= 1

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling: the bearer token's principal; without tokens, under mutual TLS, the client
        certificate's common name (so certificate holders do not share sessions); otherwise anonymous."""
        if self.auth.enabled or not self.config.tls_client_ca:
            return self.auth.principal(context.invocation_metadata() or ())
        props = context.auth_context() or {}
        for key in ("x509_common_name", "x509_subject_alternative_name"):
            if props.get(key):
                return props[key][0].decode("utf-8", "replace")
        return self.auth.principal(())

    async def unary(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    handler: Callable[..., Any], session_field: str | None = None) -> Any:
        started = time.perf_counter()
        code = "OK"
        self.metrics.received_bytes.labels(method).inc(request.ByteSize())
        try:
            if self.draining.is_set():
                raise Unavailable(DRAINING_MESSAGE)
            principal = self.principal(context)
            if isinstance(request, Malformed):
                raise request.error()
            session_id = getattr(request, session_field) if session_field else None
            if session_id:
                session = self.service.store.get(session_id, principal)
                async with self.lock(session_id):
                    if context.cancelled():
                        raise asyncio.CancelledError
                    resp = await self.work(handler, request, principal, session)
            else:
                resp = await self.work(handler, request, principal)
            self.metrics.sent_bytes.labels(method).inc(_size(resp))
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
            self.metrics.requests.labels(method, code).inc()
            self.metrics.request_seconds.labels(method).observe(time.perf_counter() - started)

    # ---- RPCs --------------------------------------------------------------------------------------------
    async def Compute(self, request: wire.WireRequest, context: grpc.aio.ServicerContext) -> bytes:
        field = "session_id" if not isinstance(request, Malformed) and \
            request.WhichOneof("target") == "session_id" else None
        return await self.unary("Compute", request, context, self.service.compute, field)

    async def ComputeStream(self, request_iterator: AsyncIterator[pb.ComputeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ComputeResponse]:
        method = "ComputeStream"
        try:
            if self.draining.is_set():
                raise Unavailable(DRAINING_MESSAGE)
            principal = self.principal(context)
            if self.open_streams >= self.config.max_concurrent_streams:
                raise ResourceExhausted(f"streams: {self.open_streams} open, the server's max_concurrent_streams; "
                                        "retry later", field="streams")
        except ServiceError as err:
            self.metrics.requests.labels(method, err.code_name).inc()
            await context.abort_with_status(to_grpc_status(err))
            return
        self.open_streams += 1
        self.metrics.open_streams.inc()
        # The window: the reader takes a permit before reading a batch; answering it gives the permit back.
        window = asyncio.Semaphore(self.config.max_inflight_per_stream)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pending = 0

        async def reader() -> None:
            nonlocal pending
            try:
                it = request_iterator.__aiter__()
                while True:
                    await window.acquire()
                    try:
                        req = await it.__anext__()
                    except StopAsyncIteration:
                        break
                    pending += 1
                    self.pending_batches += 1
                    queue.put_nowait(req)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the client went away mid-message; the stream ends below
                log.debug("ComputeStream reader ended", exc_info=True)
            finally:
                queue.put_nowait(_END)

        reader_task = asyncio.create_task(reader())
        drained = asyncio.create_task(self.draining.wait())
        get: asyncio.Future[Any] | None = None
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, drained), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # draining and no batch in flight: end the stream now
                    get.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        "the server is shutting down; the batches answered so far are applied")
                req = get.result()
                if req is _END:
                    break
                started = time.perf_counter()
                self.metrics.received_bytes.labels(method).inc(req.ByteSize())
                resp = None
                try:
                    if isinstance(req, Malformed):
                        raise req.error()
                    session = self.service.session_for(req, principal)
                except NotFound as err:  # stream-level: the stream targets a session that is not there
                    self.metrics.requests.labels(method, err.code_name).inc()
                    await context.abort_with_status(to_grpc_status(err))
                except ServiceError as err:
                    resp = self.error_response(req, err)
                if resp is None:
                    resp = await self.stream_batch(req, principal, session)
                code = "OK" if isinstance(resp, bytes) else \
                    status_code(resp.error.code).name
                self.metrics.requests.labels(method, code).inc()
                self.metrics.request_seconds.labels(method).observe(time.perf_counter() - started)
                self.metrics.sent_bytes.labels(method).inc(_size(resp))
                yield resp
                pending -= 1
                self.pending_batches -= 1
                window.release()
                if self.draining.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        "the server is shutting down; the batches answered so far are applied")
        finally:
            for task in (reader_task, drained, get):
                if task is not None:
                    task.cancel()
            self.pending_batches -= pending
            self.open_streams -= 1
            self.metrics.open_streams.dec()

    async def stream_batch(self, req: wire.WireRequest, principal: str, session: Any) -> bytes | pb.ComputeResponse:
        try:
            if session is not None:
                async with self.lock(session.id):
                    return await self.work(self.service.compute, req, principal, session)
            return await self.work(self.service.compute, req, principal)
        except ServiceError as err:
            return self.error_response(req, err)
        except Exception as err:  # noqa: BLE001 - a bad batch must not end the stream or the server
            log.exception("ComputeStream batch %r failed", req.request_id)
            return self.error_response(req, err)

    @staticmethod
    def error_response(req: wire.WireRequest | Malformed, err: BaseException) -> pb.ComputeResponse:
        request_id = "" if isinstance(req, Malformed) else req.request_id
        return pb.ComputeResponse(request_id=request_id, error=to_status_proto(err))

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CreateSession", request, context, self.service.create_session)

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("GetSession", request, context, self.service.get_session)

    async def ListSessions(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ListSessions", request, context, self.service.list_sessions)

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CloseSession", request, context, self._close, "session_id")

    def _close(self, request: pb.CloseSessionRequest, principal: str, session: Any = None) -> pb.CloseSessionResponse:
        resp = self.service.close_session(request, principal)
        self._locks.pop(request.session_id, None)
        return resp

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("Embed", request, context, self.service.embed, "session_id")

    async def ExportModel(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ExportModel", request, context, self.service.export_model, "session_id")

    async def SaveCheckpoint(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("SaveCheckpoint", request, context, self.service.save_checkpoint, "session_id")

    async def ListLosses(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ListLosses", request, context, self.service.list_losses)

    # ---- lifecycle ---------------------------------------------------------------------------------------
    async def checkpoint_all(self) -> int:
        """Checkpoint every session with unsaved steps, each under its own order lock."""
        saved = 0
        for session in self.service.store.all():
            if session.steps_since_checkpoint == 0 and session.last_checkpoint_step >= 0:
                continue
            async with self.lock(session.id):
                try:
                    await self.work(self.service.checkpoint, session)
                    saved += 1
                except OSError:
                    pass  # logged and counted by the service
        return saved

    async def checkpoint_due(self) -> None:
        every = self.config.checkpoint_every_seconds
        now = time.time()
        for session in self.service.store.all():
            if session.steps_since_checkpoint and now - max(session.last_checkpoint_time, session.created_time) >= every:
                async with self.lock(session.id):
                    try:
                        await self.work(self.service.checkpoint, session)
                    except OSError:
                        pass


__all__ = ["Malformed", "Servicer", "add_to_server"]
