"""One exception family for every failure the SDK reports: ``EmbtrainError`` keeps the gRPC code, the message
and the field violations (from ``google.rpc.BadRequest`` details). The SDK's own checks of what it is asked to send
raise the same ``InvalidArgument`` the server would (see ``invalid_argument``), so callers handle both alike."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class EmbtrainError(Exception):
    """An RPC failed. ``code`` is a ``grpc.StatusCode``; ``violations`` name the request fields at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.violations]


class InvalidArgument(EmbtrainError, ValueError):
    """The request is at fault: refused by the server, or by the SDK before sending (a dtype it cannot encode, a
    ragged list, a missing loss name). Also a ``ValueError``, which the SDK raised for its own checks before."""


class NotFound(EmbtrainError):
    pass


class FailedPrecondition(EmbtrainError):
    pass


class Unauthenticated(EmbtrainError):
    pass


class PermissionDenied(EmbtrainError):
    pass


class ResourceExhausted(EmbtrainError):
    pass


class Unavailable(EmbtrainError):
    pass


class DeadlineExceeded(EmbtrainError):
    pass


class Aborted(EmbtrainError):
    """A group step that did not collect every member's slice within the session's ``group_timeout``: nothing was
    applied. ``missing_ranks`` are the members that never sent theirs; resend the whole step."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: tuple[FieldViolation, ...] = (),
                 missing_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(code, message, violations)
        self.missing_ranks = list(missing_ranks)


_BY_CODE: dict[grpc.StatusCode, type[EmbtrainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.ABORTED: Aborted,
}
_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a ``google.rpc.Status.code`` number (UNKNOWN for a number gRPC does not define)."""
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def _violations(status: status_pb2.Status) -> tuple[FieldViolation, ...]:
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out.extend(FieldViolation(v.field, v.description) for v in br.field_violations)
    return tuple(out)


def _missing_ranks(status: status_pb2.Status) -> tuple[int, ...]:
    """The ranks an aborted group step lacked (``google.rpc.ErrorInfo`` metadata ``missing_ranks``)."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            text = info.metadata.get("missing_ranks", "")
            return tuple(int(r) for r in text.split(",") if r.strip().isdigit())
    return ()


def invalid_argument(field: str, expected: str) -> InvalidArgument:
    """An ``InvalidArgument`` found by the SDK itself, shaped like the server's: the message starts with the field
    (``inputs.embeddings: expected a numeric array, ...``) and one violation names it with ``expected`` alone."""
    return InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {expected}", (FieldViolation(field, expected),))


def make_error(code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None) -> EmbtrainError:
    violations = _violations(status) if status is not None else ()
    if code == grpc.StatusCode.ABORTED:
        return Aborted(code, message, violations, _missing_ranks(status) if status is not None else ())
    return _BY_CODE.get(code, EmbtrainError)(code, message, violations)


def from_status(status: status_pb2.Status) -> EmbtrainError:
    """An in-band error (a stream batch's ``error``) as an exception."""
    return make_error(status_code(status.code), status.message, status)


def from_rpc_error(err: grpc.RpcError) -> EmbtrainError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    status = None
    for key, value in (err.trailing_metadata() or ()) if hasattr(err, "trailing_metadata") else ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
    return make_error(code, message or "", status)
