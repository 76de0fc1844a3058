"""Compute handlers: one batch -> its answer. A stateless batch is computed by ``compute``; a session batch is one
member's slice of a step (``slice_of``), and a step, with one slice or a group's W, is computed and applied once,
entirely or not at all (``commit_step``). Decoding (wire -> CPU tensors), validation (``validation``), exactly-once
steps (``steps``) and the answer's encoding meet here. Synchronous, on worker threads (``scheduler``); nothing here
imports ``grpc``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from embtrain import codec, wire
from embtrain.structs import struct_to_dict
from embtrain.v1 import embtrain_pb2 as pb

from . import compute, devices, groups, losses, steps, training, validation
from .config import ServerConfig
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, invalid
from .losses.base import Loss
from .metrics import Metrics
from .persistence import Checkpointer
from .scheduler import WorkingMemory
from .sessions import Session, SessionStore


# Tensors viewed in the request bytes start wherever the framing put them. Kernels take different code paths (and
# summation orders) for differently aligned data, so a view that is not aligned like a fresh allocation is copied:
# the same batch gives the same bits whatever the length of the fields before it.
ALIGNMENT = 64


def decode_inputs(inputs: Mapping[str, Any], prefix: str = "inputs") -> dict[str, torch.Tensor]:
    """Tensor fields -> CPU tensors (views of the request bytes where they are aligned, aligned copies otherwise)."""
    out = {}
    for name in sorted(inputs):
        try:
            t = codec.decode_torch(inputs[name], f"{prefix}.{name}")
            out[name] = t.clone() if t.numel() and t.data_ptr() % ALIGNMENT else t
        except codec.TensorError as exc:
            raise InvalidArgument(str(exc), field=exc.field) from None
        except RuntimeError:  # a zero-size shape whose other dimensions overflow torch's size arithmetic
            shape = list(inputs[name].shape)
            raise invalid(f"{prefix}.{name}.shape", f"dimensions too large to address, got {shape}") from None
    return out


@dataclass
class Prepared:
    """A session batch decoded and checked as far as it can be without the session's state (``Batches.prepare``,
    off the session's order: batch k+1 is prepared while batch k computes). What went wrong is kept and raised when
    the batch's turn comes, at the point of the checks where the one-step path raises it, so the answer does not
    depend on which path ran."""

    request_id: str
    options: compute.ComputeOptions | None = None
    options_error: Exception | None = None
    fingerprint: bytes | None = None
    inputs: dict[str, torch.Tensor] | None = None  # decoded and through ``validation.validate_inputs``
    error: Exception | None = None


@dataclass
class StatelessBatch:
    """A stateless batch decoded and checked, ready for the device (``Batches.stateless_batch``)."""

    request_id: str
    options: compute.ComputeOptions
    loss: Loss
    inputs: dict[str, torch.Tensor]


class Batches:
    def __init__(self, config: ServerConfig, device: torch.device, store: SessionStore, checkpointer: Checkpointer,
                 metrics: Metrics) -> None:
        self.config = config
        self.device = device
        self.store = store
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.limits = validation.limits_for(config, device)
        self.working = WorkingMemory(self.limits.memory_budget, metrics)
        losses.load_all()

    def options(self, req: pb.ComputeRequest) -> compute.ComputeOptions:
        o = req.options
        limit = self.config.max_triplets_limit
        if o.max_triplets < 0 or o.max_triplets > limit:
            raise invalid("options.max_triplets", f"expected 0 (server default) to {limit}, got {o.max_triplets}")
        return compute.ComputeOptions(
            gradient=o.gradient if o.HasField("gradient") else True,
            triplets=o.triplets if o.HasField("triplets") else True,
            max_triplets=o.max_triplets or self.config.default_max_triplets,
            per_item=o.per_item_losses)

    def session_for(self, req: pb.ComputeRequest, principal: str) -> Session | None:
        """The session a request targets (None for stateless). Raises NotFound / InvalidArgument."""
        target = req.WhichOneof("target")
        if target == "session_id":
            return self.store.get(req.session_id, principal)
        if target is None:
            raise invalid("target", "set either session_id or loss (an inline loss spec)")
        return None

    def compute(self, req: pb.ComputeRequest | wire.WireRequest, principal: str,
                prepared: Prepared | None = None) -> bytes:
        """One batch that is a whole step (stateless, or a session of group size 1) -> the ComputeResponse's
        bytes. ``req`` is a parsed message or, on the server's fast path, a ``WireRequest`` whose tensors view the
        received bytes. A session batch runs under the session's order (the caller's scheduler); ``prepared``:
        its ``prepare`` done before its turn."""
        session = self.session_for(req, principal)
        if session is None:
            return self.compute_stateless(req, req.request_id or uuid.uuid4().hex, self.options(req))
        part = self.slice_of(req, session, prepared)
        if isinstance(part, bytes):
            return part
        return self.commit_step(session, [part])[part.rank]

    def prepare(self, req: pb.ComputeRequest | wire.WireRequest, session: Session) -> Prepared:
        """What ``slice_of`` does that needs no session state (it may run before the batch's turn, while the
        session's earlier batches compute): the options, the payload's fingerprint, decoding (the aligned copies)
        and the checks of the inputs against the loss's declared inputs (names, dtypes, shapes, finiteness).
        Never raises: what fails is raised in order by ``slice_of``."""
        p = Prepared(request_id=req.request_id or uuid.uuid4().hex)
        try:
            p.options = self.options(req)
        except Exception as exc:  # noqa: BLE001 - raised in order
            p.options_error = exc
            return p
        if req.HasField("step"):
            p.fingerprint = steps.digest(req.inputs, p.options)
        try:
            raw = decode_inputs(req.inputs)
            if session.spec.group_size > 1:
                groups.check_per_row(session.loss_cls, raw)
            p.inputs = validation.validate_inputs(session.loss_cls, raw,
                                                  max_batch_elements=self.limits.max_batch_elements,
                                                  min_rows=0 if session.spec.group_size > 1 else 1)
        except Exception as exc:  # noqa: BLE001 - raised in order
            p.error = exc
        return p

    def slice_of(self, req: pb.ComputeRequest | wire.WireRequest, session: Session,
                 prepared: Prepared | None = None) -> bytes | groups.Slice:
        """A session batch checked as one member's slice of a step: the kept answer's bytes for a resend of the
        last applied step, or the validated slice. ``prepared``: ``prepare(req, session)``, done already."""
        if prepared is not None and prepared.options_error is not None:
            raise prepared.options_error
        request_id = prepared.request_id if prepared is not None else req.request_id or uuid.uuid4().hex
        options = prepared.options if prepared is not None else self.options(req)
        size = session.spec.group_size
        step = req.step if req.HasField("step") else None
        rank = req.rank if req.HasField("rank") else None
        if size > 1:
            if rank is None or not 0 <= rank < size:
                raise invalid("rank", f"expected 0 <= rank < {size} (the session's group_size), got "
                              f"{'none' if rank is None else rank}")
            if step is None:
                raise invalid("step", "required in a group session: every slice names the step it belongs to")
        elif rank not in (None, 0):
            raise invalid("rank", f"expected 0 or unset: the session's group_size is 1, got {rank}")
        rank = rank or 0
        if prepared is not None:
            fingerprint = prepared.fingerprint
        else:
            fingerprint = None if step is None else steps.digest(req.inputs, options)
        kept = steps.admit(step, rank, session.step, session.last, fingerprint)
        if kept is not None:
            return kept.response(request_id, session.step)
        if prepared is not None:
            if prepared.error is not None:
                raise prepared.error
            assert prepared.inputs is not None
            inputs = validation.check_validated(self.loss_of(session), prepared.inputs, self.limits, session)
        else:
            raw = decode_inputs(req.inputs)
            if size > 1:
                groups.check_per_row(session.loss_cls, raw)
            inputs = validation.check_compute(self.loss_of(session), raw, self.limits, session,
                                              min_rows=0 if size > 1 else 1)
        return groups.Slice(rank=rank, step=session.step + 1 if step is None else step, request_id=request_id,
                            inputs=inputs, digest=fingerprint, options=options)

    @staticmethod
    def loss_of(session: Session) -> Loss:
        """The session's loss instance (its own once it has state; before that, one of its configuration)."""
        return session.state.loss if session.state is not None else session.loss_cls(session.spec.params)

    def check_slices(self, session: Session, slices: list[groups.Slice]) -> None:
        """Before a member waits: the device memory of the step so far (its slices together) fits the budget."""
        rows = sum(s.rows for s in slices)
        first = slices[0].inputs
        emb = first["embeddings"]
        validation.require_budget_rows(self.loss_of(session).memory_complexity(first), rows, int(emb.shape[1]),
                                       emb.element_size(), rows + session.memory_fill, self.limits.memory_budget)

    def commit_step(self, session: Session, slices: list[groups.Slice], vote: Callable[[], None] | None = None,
                    shard: Any = None) -> dict[int, bytes]:
        """Compute a step on its slices concatenated in rank order and apply it, entirely or not at all; each
        member's answer by rank. Runs under the session's order. ``vote`` (replicas) is called once the step is
        computed and its answers encoded, just before it is applied; raising there abandons it. ``shard``: this
        replica's share of the anchors (``sharding``)."""
        step = slices[0].step
        if step != session.step + 1:  # a step committed or aborted while this one was collected
            raise FailedPrecondition(f"step: expected {session.step + 1}, got {step}", field="step")
        options = groups.common_options(slices)
        inputs, offsets = groups.concatenate(slices)
        loss = self.loss_of(session)
        validation.check_step(session, loss, inputs, self.limits)
        started = time.perf_counter()
        need = validation.working_bytes(loss, inputs, len(inputs["embeddings"]) + session.memory_fill)
        with self.working.hold(need), devices.out_of_memory(self.device, "inputs.embeddings",
                                                            "the device ran out of memory computing this step"):
            extra = {} if shard is None else {"shard": shard}
            pending = training.prepare(session, inputs, options, self.config.compute_dtype, **extra)
            try:
                results = groups.split(pending.result, slices, offsets)
                answers = {s.rank: self.encode_checked(s.request_id, results[s.rank], step, offsets[s.rank])
                           for s in slices}
                if vote is not None:
                    vote()
            except BaseException:
                pending.abandon()
                raise
            pending.commit()
        session.last = steps.Answer(step, {s.rank: steps.Part(s.digest, results[s.rank], row_offset=offsets[s.rank])
                                           for s in slices})
        self.observe(session.spec.loss, started, pending.result)
        self.checkpointer.after_step(session)
        return answers

    def compute_stateless(self, req: pb.ComputeRequest | wire.WireRequest, request_id: str,
                          options: compute.ComputeOptions) -> bytes:
        return self.run_stateless(self._stateless(req, request_id, options))

    def stateless_batch(self, req: pb.ComputeRequest | wire.WireRequest, principal: str) -> StatelessBatch:
        """A stateless batch up to its device work (the loss and its parameters, decoding, every check): what may
        run while the workers compute other batches. ``run_stateless`` does the rest."""
        if self.session_for(req, principal) is not None:
            raise invalid("target", "expected a loss (an inline loss spec) for a stateless batch")
        return self._stateless(req, req.request_id or uuid.uuid4().hex, self.options(req))

    def _stateless(self, req: pb.ComputeRequest | wire.WireRequest, request_id: str,
                   options: compute.ComputeOptions) -> StatelessBatch:
        if not req.loss.name:
            raise invalid("loss.name", "expected a loss name (see ListLosses)")
        loss = losses.get(req.loss.name)(struct_to_dict(req.loss.params))
        inputs = validation.check_compute(loss, decode_inputs(req.inputs), self.limits)
        loss.check_inputs(inputs)
        return StatelessBatch(request_id, options, loss, inputs)

    @property
    def inline(self) -> bool:
        """Small stateless batches may run on the event loop: ``inline_compute_seconds`` > 0 on a CPU device (a
        GPU's work is asynchronous, and its per-thread device state stays on the workers)."""
        return self.config.inline_compute_seconds > 0 and self.device.type == "cpu"

    def runs_inline(self, prepared: StatelessBatch) -> bool:
        """Whether a checked stateless batch is small enough to compute on the event loop (no thread hand-over):
        a native loss (whose compute-time estimate is calibrated; a ``pml.*`` loss may enumerate triplets that its
        estimate does not see) with an estimated compute time of at most ``inline_compute_seconds``."""
        limit = self.config.inline_compute_seconds
        return (self.inline and prepared.loss.family == "native"
                and validation.estimated_seconds(prepared.loss, prepared.inputs, self.limits) <= limit)

    def run_stateless(self, prepared: StatelessBatch) -> bytes:
        """A checked stateless batch (``stateless_batch``) computed and encoded."""
        request_id, options, loss, inputs = prepared.request_id, prepared.options, prepared.loss, prepared.inputs
        started = time.perf_counter()
        rows = len(inputs["embeddings"]) if "embeddings" in inputs else 0
        with self.working.hold(validation.working_bytes(loss, inputs, rows)), devices.out_of_memory(
                self.device, "inputs.embeddings", "the device ran out of memory computing this batch"):
            self.prepare_stateless(loss, inputs)
            result = compute.run(loss, inputs, device=self.device, compute_dtype=self.config.compute_dtype,
                                 options=options)
        self.observe(loss.name, started, result)
        return self.encode_checked(request_id, result, 0)

    def observe(self, loss: str, started: float, result: compute.ComputeResult) -> None:
        self.metrics.observe_compute(loss, time.perf_counter() - started, result.n, result.stats,
                                     result.triplets_total)

    def encode_checked(self, request_id: str, result: compute.ComputeResult, step: int, row_offset: int = 0) -> bytes:
        """The answer's bytes, refused (before anything is applied) when gRPC could not send them."""
        answer = steps.encode_result(request_id, result, step, row_offset)
        if len(answer) > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"options.max_triplets: the answer would take {len(answer)} bytes, over the server's "
                f"max_message_bytes ({self.config.max_message_bytes}); ask for fewer triplets (options.max_triplets) "
                "or send smaller batches; nothing was applied", field="options.max_triplets")
        return answer

    def prepare_stateless(self, loss: Loss, inputs: Mapping[str, torch.Tensor]) -> None:
        """Stateful losses used without a session get fresh state (seed 0) unless the request carries it."""
        if loss.stateful and "embeddings" in inputs and not any(
                s.name in inputs for s in loss.inputs if s.differentiable and s.name != "embeddings"):
            loss.init_state(int(inputs["embeddings"].shape[1]), self.device, torch.Generator().manual_seed(0), {})
