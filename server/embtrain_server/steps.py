"""Exactly-once session steps: which step a session batch is, its answer (``encode_result``), and the answers kept
for a resend.

A session batch may carry its step number. Step ``s`` is applied only when it is the session's next step
(``session.step + 1``); a resend of the last applied step with the same payload gets the kept answer again without
being applied twice; anything else is refused with FAILED_PRECONDITION naming the expected step. A client that lost
an answer (cancel, deadline, dropped connection, server restart) resends the same step and gets it. A batch without
a step number is applied as the next step, as before.

A step has one part per member: one for a plain session (rank 0), W for a group step (``groups``). The kept answer
is that of the last applied step only (it is replaced when the next step commits) and is part of the session's
checkpoint, so a restart does not lose it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embtrain import wire
from embtrain.v1 import embtrain_pb2 as pb

from .compute import ComputeOptions, ComputeResult
from .errors import FailedPrecondition


@dataclass
class Part:
    """One member's answer to an applied step: its result, or (restored from a checkpoint) its encoded response
    without a request id; ``digest`` identifies the payload that produced it (None: sent without a step number)."""

    digest: bytes | None
    result: ComputeResult | None = None
    encoded: bytes | None = None
    row_offset: int = 0

    def response(self, request_id: str, step: int) -> bytes:
        """The answer again, for a resend with ``request_id``."""
        if self.result is not None:
            return encode_result(request_id, self.result, step, self.row_offset)
        # Protobuf messages concatenate: the request id in front of the kept answer (which has none) is the answer
        # with that id.
        return pb.ComputeResponse(request_id=request_id).SerializeToString() + self.body(step)

    def body(self, step: int) -> bytes:
        """The response bytes without a request id (what a checkpoint keeps)."""
        if self.encoded is None:
            assert self.result is not None
            self.encoded = encode_result("", self.result, step, self.row_offset)
        return self.encoded


@dataclass
class Answer:
    """The answers of the last applied step, by rank."""

    step: int
    parts: dict[int, Part] = field(default_factory=dict)


def digest(inputs: Mapping[str, Any], options: ComputeOptions) -> bytes:
    """A fingerprint of a batch's payload: every input's name, dtype, shape and bytes, and the return options in
    effect (an option left unset and the same option set to its default are the same batch)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        t = inputs[name]
        h.update(name.encode() + b"\0" + str(int(t.dtype)).encode() + b"\0" + repr(tuple(t.shape)).encode())
        h.update(t.data)
    h.update(repr(options).encode())
    return h.digest()


def admit(step: int | None, rank: int, applied: int, last: Answer | None, payload: bytes | None) -> Part | None:
    """Decide what to do with a batch (``rank``'s part of ``step``, its payload's ``digest``) on a session at step
    ``applied``: None to apply it as (part of) the next step, or the kept ``Part`` to send again."""
    if step is None or step == applied + 1:
        return None
    kept = last.parts.get(rank) if last is not None and last.step == applied else None
    if step == applied and kept is not None:
        if kept.digest is None:
            raise FailedPrecondition(f"step: step {step} was applied from a batch sent without a step number, so a "
                                     f"resend cannot be matched to it; the next step is {applied + 1}", field="step")
        if kept.digest != payload:
            raise FailedPrecondition(f"step: step {step} was already applied with a different batch; the next step "
                                     f"is {applied + 1}", field="step")
        return kept
    expected = f"{applied + 1} (or {applied}, to get the last answer again)" if kept is not None else f"{applied + 1}"
    raise FailedPrecondition(f"step: expected {expected}, got {step}", field="step")


def encode_result(request_id: str, r: ComputeResult, step: int, row_offset: int = 0) -> bytes:
    """The ComputeResponse's bytes: the small fields through protobuf, the tensors framed by hand (one copy)."""
    head = pb.ComputeResponse(request_id=request_id, loss=r.loss, triplets_total=r.triplets_total, step=step,
                              row_offset=row_offset)
    head.triplets_truncated = r.truncated
    for k, v in r.stats.items():
        head.stats[k] = v
    return wire.encode_compute_response(head, r.gradients, {"triplets": r.triplets, "per_item_losses": r.per_item,
                                                            "triplet_ids": r.triplet_ids})
