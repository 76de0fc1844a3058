"""Who is calling, settled once per call by a server interceptor: the bearer token's principal; without tokens,
under mutual TLS, the client certificate's common name (so certificate holders do not share sessions); otherwise
anonymous. The interceptor leaves the principal in a context variable that the handlers read
(``current_principal``), and refuses a call whose credentials do not check out before any handler runs. Only the
EmbeddingTrainer service is guarded: the health service answers without a token."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .auth import Authenticator
from .errors import ServiceError
from .metrics import Metrics
from .translate import to_grpc_status

_PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("embtrain_principal")


def current_principal() -> str:
    """The principal of the call being handled (set by ``IdentityInterceptor``)."""
    return _PRINCIPAL.get()


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, service_name: str, mtls: bool, metrics: Metrics) -> None:
        self.auth = auth
        self.prefix = f"/{service_name}/"
        self.mtls = mtls
        self.metrics = metrics

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        if self.auth.enabled or not self.mtls:
            return self.auth.principal(context.invocation_metadata() or ())
        props = context.auth_context() or {}
        for key in ("x509_common_name", "x509_subject_alternative_name"):
            if props.get(key):
                return props[key][0].decode("utf-8", "replace")
        return self.auth.principal(())

    async def _identify(self, method: str, context: grpc.aio.ServicerContext) -> None:
        try:
            _PRINCIPAL.set(self.principal(context))
        except ServiceError as err:
            self.metrics.requests.labels(method, err.code_name).inc()
            await context.abort_with_status(to_grpc_status(err))

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method[len(self.prefix):]
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._identify(method, context)
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        inner_stream = handler.stream_stream

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._identify(method, context)
            async for response in inner_stream(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
