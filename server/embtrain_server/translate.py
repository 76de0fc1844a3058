"""The one place where domain errors become gRPC statuses (with ``google.rpc.BadRequest`` field violations, and
``google.rpc.ErrorInfo`` for an aborted group step; docs/protocol.md documents both for clients). Anything that is
not a ``ServiceError`` becomes INTERNAL with no internals in the message.

Messages and field names can echo what a client sent (an unknown parameter's name), so they are cut to a bounded
length: the status travels in HTTP/2 trailers, and a client refuses trailers over its metadata limit (8 KiB by
default), which would turn a clear INVALID_ARGUMENT into an opaque transport error."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import Aborted, ServiceError, violation_description

INTERNAL_MESSAGE = "internal error; the server logged the details"
MAX_MESSAGE_CHARS = 1024  # the message is sent twice (grpc-message and inside the details)
MAX_FIELD_CHARS = 200


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code_name, grpc.StatusCode.UNKNOWN)


def to_status_proto(err: BaseException) -> status_pb2.Status:
    """``google.rpc.Status`` for an error: used for in-band stream errors and for unary trailers."""
    if not isinstance(err, ServiceError):
        return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE)
    message = _cut(err.message, MAX_MESSAGE_CHARS)
    status = status_pb2.Status(code=grpc_code(err).value[0], message=message)
    if isinstance(err, Aborted):
        info = error_details_pb2.ErrorInfo(reason="GROUP_STEP_ABORTED", domain="embtrain",
                                           metadata={"missing_ranks": ",".join(map(str, err.missing_ranks))})
        detail = any_pb2.Any()
        detail.Pack(info)
        status.details.append(detail)
    if err.violations:
        br = error_details_pb2.BadRequest()
        for field, desc in err.violations[:8]:
            # The description says what is wrong with the field without naming it again (``field: description``
            # is how clients print a violation); violations set by hand may still carry the prefix.
            br.field_violations.add(field=_cut(field, MAX_FIELD_CHARS),
                                    description=_cut(violation_description(field, desc), MAX_MESSAGE_CHARS))
        detail = any_pb2.Any()
        detail.Pack(br)
        status.details.append(detail)
    return status


class _RpcStatus(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def to_grpc_status(err: BaseException) -> grpc.Status:
    proto = to_status_proto(err)
    code = grpc_code(err) if isinstance(err, ServiceError) else grpc.StatusCode.INTERNAL
    return _RpcStatus(code, proto.message, (("grpc-status-details-bin", proto.SerializeToString()),))
