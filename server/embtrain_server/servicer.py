"""The gRPC servicer: thin. It authenticates, orders the batches of each session, hands every request to a
worker thread running the transport-agnostic ``Service``, maps errors through ``translate`` and records the
edge metrics. Torch work never runs on the event loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from embtrain.v1 import embtrain_pb2 as pb
from embtrain.v1 import embtrain_pb2_grpc as pb_grpc

from .auth import Authenticator
from .config import ServerConfig
from .errors import NotFound, ResourceExhausted, ServiceError, Unauthenticated, Unavailable
from .metrics import Metrics
from .service import Service
from .translate import code_name, to_grpc_status, to_status_proto

log = logging.getLogger("embtrain.servicer")
T = TypeVar("T")


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
        self._streams = 0
        self.inflight = 0  # requests running on workers

    # ---- helpers -----------------------------------------------------------------------------------------
    def lock(self, session_id: str) -> asyncio.Lock:
        """The per-session order: batches of one session run one at a time, in arrival order (FIFO lock)."""
        lk = self._locks.get(session_id)
        if lk is None:
            lk = self._locks[session_id] = asyncio.Lock()
        return lk

    async def work(self, fn: Callable[..., T], *args: Any) -> T:
        self.inflight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
        finally:
            self.inflight -= 1

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        return self.auth.principal(context.invocation_metadata() or ())

    async def unary(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    handler: Callable[..., Any], session_id: str | None = None) -> Any:
        started = time.perf_counter()
        code = "OK"
        self.metrics.received_bytes.labels(method).inc(request.ByteSize())
        try:
            if self.draining.is_set():
                raise Unavailable("the server is shutting down; retry on another replica")
            principal = self.principal(context)
            if session_id:
                session = self.service.store.get(session_id, principal)
                async with self.lock(session_id):
                    if context.cancelled():
                        raise asyncio.CancelledError
                    resp = await self.work(handler, request, principal, session)
            else:
                resp = await self.work(handler, request, principal)
            self.metrics.sent_bytes.labels(method).inc(resp.ByteSize())
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
    async def Compute(self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext) -> pb.ComputeResponse:
        sid = request.session_id if request.WhichOneof("target") == "session_id" else None
        return await self.unary("Compute", request, context, self.service.compute, sid)

    async def ComputeStream(self, request_iterator: AsyncIterator[pb.ComputeRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ComputeResponse]:
        method = "ComputeStream"
        try:
            principal = self.principal(context)
            if self._streams >= self.config.max_concurrent_streams:
                raise ResourceExhausted(f"streams: {self._streams} open, the server's max_concurrent_streams; "
                                        "retry later", field="streams")
        except ServiceError as err:
            self.metrics.requests.labels(method, err.code_name).inc()
            await context.abort_with_status(to_grpc_status(err))
            return
        self._streams += 1
        self.metrics.open_streams.inc()
        queue: asyncio.Queue[pb.ComputeRequest | None] = asyncio.Queue(maxsize=self.config.max_inflight_per_stream)

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await queue.put(req)
            finally:
                await queue.put(None)

        reader_task = asyncio.create_task(reader())
        try:
            while True:
                req = await queue.get()
                if req is None:
                    break
                started = time.perf_counter()
                self.metrics.received_bytes.labels(method).inc(req.ByteSize())
                try:
                    session = self.service.session_for(req, principal)
                except NotFound as err:  # stream-level: the stream targets a session that is not there
                    self.metrics.requests.labels(method, err.code_name).inc()
                    await context.abort_with_status(to_grpc_status(err))
                    return
                except ServiceError as err:
                    session, resp = None, self.error_response(req, err)
                else:
                    resp = await self.stream_batch(req, principal, session)
                code = "OK" if not resp.HasField("error") else grpc.StatusCode(
                    next(c for c in grpc.StatusCode if c.value[0] == resp.error.code)).name
                self.metrics.requests.labels(method, code).inc()
                self.metrics.request_seconds.labels(method).observe(time.perf_counter() - started)
                self.metrics.sent_bytes.labels(method).inc(resp.ByteSize())
                yield resp
                if self.draining.is_set():
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        "the server is shutting down; the batches answered so far are applied")
                    return
        finally:
            reader_task.cancel()
            self._streams -= 1
            self.metrics.open_streams.dec()

    async def stream_batch(self, req: pb.ComputeRequest, principal: str, session: Any) -> pb.ComputeResponse:
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
    def error_response(req: pb.ComputeRequest, err: BaseException) -> pb.ComputeResponse:
        return pb.ComputeResponse(request_id=req.request_id, error=to_status_proto(err))

    async def CreateSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CreateSession", request, context, self.service.create_session)

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("GetSession", request, context, self.service.get_session)

    async def ListSessions(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ListSessions", request, context, self.service.list_sessions)

    async def CloseSession(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("CloseSession", request, context, self._close, request.session_id)

    def _close(self, request: pb.CloseSessionRequest, principal: str, session: Any) -> pb.CloseSessionResponse:
        resp = self.service.close_session(request, principal)
        self._locks.pop(request.session_id, None)
        return resp

    async def Embed(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("Embed", request, context, self.service.embed, request.session_id)

    async def ExportModel(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("ExportModel", request, context, self.service.export_model, request.session_id)

    async def SaveCheckpoint(self, request, context):  # type: ignore[no-untyped-def]
        return await self.unary("SaveCheckpoint", request, context, self.service.save_checkpoint, request.session_id)

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


__all__ = ["Servicer", "Unauthenticated", "code_name"]
