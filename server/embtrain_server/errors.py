"""Typed domain errors. Domain code raises these; one translator (``embtrain_server.translate``) maps them
to gRPC status codes. Every message is public: it names the offending field and what was expected."""

from __future__ import annotations

import torch


class ServiceError(Exception):
    """Base class. ``field`` names the request field at fault (``inputs.labels``, ``params.margin``).

    ``violations`` are (field, description) pairs, sent as ``google.rpc.BadRequest`` field violations. A client
    prints a violation as ``field: description``, so the description never repeats the field: a message that
    starts with ``field: `` (every ``invalid(...)`` message does) gives the rest of it as the description, while
    the status message stays whole."""

    code_name = "UNKNOWN"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.violations: list[tuple[str, str]] = [(field, violation_description(field, message))] if field else []


class InvalidArgument(ServiceError):
    code_name = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code_name = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code_name = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    code_name = "UNAUTHENTICATED"


class Unavailable(ServiceError):
    code_name = "UNAVAILABLE"


class Aborted(ServiceError):
    """A group step that did not collect all of its slices in time; ``missing_ranks`` never sent theirs."""

    code_name = "ABORTED"

    def __init__(self, message: str, missing_ranks: list[int]) -> None:
        super().__init__(message)
        self.missing_ranks = list(missing_ranks)


def violation_description(field: str, message: str) -> str:
    """``message`` without a leading ``field: `` (what a field violation's description says about its field)."""
    prefix = f"{field}: "
    return message[len(prefix):] if message.startswith(prefix) and len(message) > len(prefix) else message


def invalid(field: str, expected: str) -> InvalidArgument:
    """``InvalidArgument`` whose message starts with the field: ``inputs.labels: length 31, expected 32``."""
    return InvalidArgument(f"{field}: {expected}", field=field)


_OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device or host allocation failure: ``torch.OutOfMemoryError`` (CUDA's caching allocator), and
    the plain ``RuntimeError`` that the CPU allocator and CUDA library calls raise (torch gives them no type)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MARKERS)
