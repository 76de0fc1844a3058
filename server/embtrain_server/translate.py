"""The one place where domain errors become gRPC statuses (with ``google.rpc.BadRequest`` field violations).
Anything that is not a ``ServiceError`` becomes INTERNAL with no internals in the message."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import ServiceError

INTERNAL_MESSAGE = "internal error; the server logged the details"


def grpc_code(err: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code_name, grpc.StatusCode.UNKNOWN)


def to_status_proto(err: BaseException) -> status_pb2.Status:
    """``google.rpc.Status`` for an error: used for in-band stream errors and for unary trailers."""
    if not isinstance(err, ServiceError):
        return status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE)
    status = status_pb2.Status(code=grpc_code(err).value[0], message=err.message)
    if err.violations:
        br = error_details_pb2.BadRequest()
        for field, desc in err.violations:
            br.field_violations.add(field=field, description=desc)
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


def code_name(err: BaseException) -> str:
    return err.code_name if isinstance(err, ServiceError) else "INTERNAL"
