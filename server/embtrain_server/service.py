"""Transport-agnostic request handlers: ``(request message, principal) -> response message``.

Each handler decodes (wire -> CPU tensors), validates (``validation``), finds the loss or session, computes
(``compute`` stateless, ``training`` for a session) and encodes the answer (``embtrain.wire``). Handlers are
synchronous and run on worker threads (``scheduler``), a session's one at a time; the servicer owns gRPC.
Nothing here imports ``grpc``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from google.protobuf import json_format, struct_pb2
from safetensors.torch import save as st_save

from embtrain import codec, wire
from embtrain.structs import struct_to_dict, value_to_python
from embtrain.v1 import embtrain_pb2 as pb

from . import compute, devices, groups, losses, optim, steps, training, validation
from .config import ServerConfig
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable, invalid, is_out_of_memory
from .losses.base import Loss
from .metrics import Metrics
from .persistence import Checkpointer
from .scheduler import WorkingMemory
from .sessions import Session, SessionStore, parse_spec


def to_value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.CopyFrom(json_format.ParseDict(_jsonable(x), struct_pb2.Value()))
    return v


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


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


def loss_info(cls: type[Loss]) -> pb.LossInfo:
    info = pb.LossInfo(name=cls.name, description=cls.description, mines_triplets=cls.mines_triplets,
                       stateful=cls.stateful, family=cls.family)
    for s in cls.inputs:
        info.inputs.add(name=s.name, required=s.required, dtype=s.dtype, shape=s.shape,
                        differentiable=s.differentiable, description=s.description)
    for p in cls.schema.params:
        pi = info.params.add(name=p.name, type=p.kind, range=p.range_text, choices=list(p.choices),
                             description=p.description)
        pi.default.CopyFrom(to_value(p.default))
    return info


class Service:
    def __init__(self, config: ServerConfig, device: torch.device, store: SessionStore, checkpointer: Checkpointer,
                 metrics: Metrics) -> None:
        self.config = config
        self.device = device
        self.store = store
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.limits = validation.Limits(
            config.max_batch_elements, config.memory_budget_bytes or int(0.8 * devices.memory_total(device)),
            config.max_compute_seconds, config.compute_rate or (2e9 if device.type == "cpu" else 2e12))
        self.working = WorkingMemory(self.limits.memory_budget, metrics)
        losses.load_all()

    # ---- Compute -----------------------------------------------------------------------------------------
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

    def compute(self, req: pb.ComputeRequest | wire.WireRequest, principal: str) -> bytes:
        """One batch that is a whole step (stateless, or a session of group size 1) -> the ComputeResponse's
        bytes. ``req`` is a parsed message or, on the server's fast path, a ``WireRequest`` whose tensors view the
        received bytes. A session batch runs under the session's order (the caller's scheduler)."""
        session = self.session_for(req, principal)
        if session is None:
            return self.compute_stateless(req, req.request_id or uuid.uuid4().hex, self.options(req))
        part = self.slice_of(req, session)
        if isinstance(part, bytes):
            return part
        return self.commit_step(session, [part])[part.rank]

    def slice_of(self, req: pb.ComputeRequest | wire.WireRequest, session: Session) -> bytes | groups.Slice:
        """A session batch checked as one member's slice of a step: the kept answer's bytes for a resend of the
        last applied step, or the validated slice."""
        request_id = req.request_id or uuid.uuid4().hex
        options = self.options(req)
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
        fingerprint = None if step is None else steps.digest(req.inputs, options)
        kept = steps.admit(step, rank, session.step, session.last, fingerprint)
        if kept is not None:
            return kept.response(request_id, session.step)
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
        memory = session.state.memory if session.state is not None else None
        validation.require_budget_rows(self.loss_of(session).memory_complexity(first), rows, int(emb.shape[1]),
                                       emb.element_size(), rows + (memory.fill if memory is not None else 0),
                                       self.limits.memory_budget)

    def commit_step(self, session: Session, slices: list[groups.Slice]) -> dict[int, bytes]:
        """Compute a step on its slices concatenated in rank order and apply it, entirely or not at all; each
        member's answer by rank. Runs under the session's order."""
        step = slices[0].step
        if step != session.step + 1:  # a step committed or aborted while this one was collected
            raise FailedPrecondition(f"step: expected {session.step + 1}, got {step}", field="step")
        options = groups.common_options(slices)
        inputs, offsets = groups.concatenate(slices)
        validation.check_step(session, self.loss_of(session), inputs, self.limits)
        started = time.perf_counter()
        memory = session.state.memory if session.state is not None else None
        need = validation.working_bytes(self.loss_of(session), inputs,
                                        len(inputs["embeddings"]) + (memory.fill if memory is not None else 0))
        with self.working.hold(need), \
                self._out_of_memory("inputs.embeddings", "the device ran out of memory computing this step"):
            pending = training.prepare(session, inputs, options, self.config.compute_dtype)
            try:
                results = groups.split(pending.result, slices, offsets)
                answers = {s.rank: self.encode_checked(s.request_id, results[s.rank], step, offsets[s.rank])
                           for s in slices}
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
        if not req.loss.name:
            raise invalid("loss.name", "expected a loss name (see ListLosses)")
        loss = losses.get(req.loss.name)(struct_to_dict(req.loss.params))
        inputs = validation.check_compute(loss, decode_inputs(req.inputs), self.limits)
        loss.check_inputs(inputs)
        if loss.stateful and "embeddings" in inputs:
            validation.require_loss_state_budget(loss, int(inputs["embeddings"].shape[1]), self.limits.memory_budget)
        started = time.perf_counter()
        rows = len(inputs["embeddings"]) if "embeddings" in inputs else 0
        with self.working.hold(validation.working_bytes(loss, inputs, rows)), \
                self._out_of_memory("inputs.embeddings", "the device ran out of memory computing this batch"):
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

    @contextlib.contextmanager
    def _out_of_memory(self, field: str, what: str) -> Iterator[None]:
        """An allocation failure is RESOURCE_EXHAUSTED naming ``field`` (torch.OutOfMemoryError on CUDA, the CPU
        allocator's RuntimeError)."""
        try:
            yield
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            devices.release_cached(self.device)
            raise ResourceExhausted(f"{field}: {what}; send smaller batches", field=field) from None

    # ---- sessions ----------------------------------------------------------------------------------------
    def create_session(self, req: pb.CreateSessionRequest, principal: str) -> pb.CreateSessionResponse:
        c = req.config
        if not c.loss.name:
            raise invalid("config.loss.name", "expected a loss name (see ListLosses)")
        spec = parse_spec(c.loss.name, struct_to_dict(c.loss.params),
                          value_to_python(c.head) if c.HasField("head") else None,
                          struct_to_dict(c.optimizer) if c.HasField("optimizer") else None,
                          struct_to_dict(c.memory) if c.HasField("memory") else None,
                          c.seed if c.HasField("seed") else None,
                          c.group_size if c.HasField("group_size") else None,
                          c.group_timeout if c.HasField("group_timeout") else None)
        initial = decode_inputs(c.initial_state, "config.initial_state")
        for name, t in initial.items():
            if t.is_floating_point():
                validation.require_finite(t, f"config.initial_state.{name}")
        losses.get(spec.loss)(spec.params).check_initial_state(initial)
        session = self.store.create(spec, principal, initial)
        try:
            self.checkpointer.save(session)
        except OSError:
            self.store.remove(session.id, principal)
            raise Unavailable("the server could not write the new session's checkpoint (its log says why); no "
                              "session was created; retry later or on another replica") from None
        self.metrics.open_sessions.set(len(self.store))
        return pb.CreateSessionResponse(session=self.session_info(session))

    def session_info(self, s: Session) -> pb.SessionInfo:
        ts = s.state
        info = pb.SessionInfo(
            session_id=s.id, step=s.step, parameter_count=ts.parameter_count() if ts is not None else 0,
            memory_fill=ts.memory.fill if ts is not None and ts.memory is not None else 0,
            memory_size=s.spec.memory_size, last_checkpoint_step=s.last_checkpoint_step,
            last_checkpoint_time=s.last_checkpoint_time, status="ready", device=str(s.device),
            created_time=s.created_time)
        info.config.loss.name = s.spec.loss
        info.config.loss.params.update(_jsonable(s.spec.params))
        if s.spec.head:
            info.config.head.CopyFrom(to_value(s.spec.head))
        if s.spec.optimizer:
            info.config.optimizer.update(_jsonable(s.spec.optimizer))
        info.config.memory.update({"size": s.spec.memory_size})
        info.config.seed = s.spec.seed
        info.config.group_size = s.spec.group_size
        info.config.group_timeout = s.spec.group_timeout
        if ts is not None and ts.optimizer_spec is not None:
            info.optimizer_state.update(_jsonable(optim.summary(ts.optimizer_spec, ts.optimizer, s.step)))
        return info

    def get_session(self, req: pb.GetSessionRequest, principal: str) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(session=self.session_info(self.store.get(req.session_id, principal)))

    def list_sessions(self, req: pb.ListSessionsRequest, principal: str) -> pb.ListSessionsResponse:
        mine, corrupt = self.store.list(principal)
        resp = pb.ListSessionsResponse(sessions=[self.session_info(s) for s in mine])
        for c in corrupt:
            where = "moved aside by the server" if c.status == "corrupt" else "kept by the server"
            resp.sessions.add(session_id=c.id, status=c.status, status_message=f"{c.reason}; {where}",
                              last_checkpoint_step=-1)
        return resp

    def close_session(self, req: pb.CloseSessionRequest, principal: str) -> pb.CloseSessionResponse:
        session = self.store.get(req.session_id, principal)
        self.checkpointer.on_close(session, keep=req.keep_checkpoint)
        info = self.session_info(session)
        self.store.remove(req.session_id, principal)
        self.metrics.open_sessions.set(len(self.store))
        return pb.CloseSessionResponse(session=info)

    def save_checkpoint(self, req: pb.SaveCheckpointRequest, principal: str) -> pb.SaveCheckpointResponse:
        return pb.SaveCheckpointResponse(step=self.checkpointer.on_request(self.store.get(req.session_id, principal)))

    # ---- model -------------------------------------------------------------------------------------------
    def embed(self, req: pb.EmbedRequest, principal: str) -> pb.EmbedResponse:
        """The session head's output (eval mode, no training, no step) for a batch of embeddings."""
        session = self.store.get(req.session_id, principal)
        x = validation.check_embed(session, decode_inputs({"embeddings": req.embeddings}, "")["embeddings"],
                                   self.limits)
        with self._out_of_memory("embeddings", "the device ran out of memory"):
            out = training.embed(session, x)
        return pb.EmbedResponse(embeddings=codec.encode(out, "embeddings"))

    def export_model(self, req: pb.ExportModelRequest, principal: str) -> pb.ExportModelResponse:
        """The head's configuration (JSON) and weights (safetensors), and the loss state (e.g. centres)."""
        session = self.store.get(req.session_id, principal)
        if session.state is None:
            raise FailedPrecondition("session_id: the session has seen no batch yet, so its head has no input "
                                     "width; send one Compute or Embed first", field="session_id")
        config, weights, state = training.export(session)
        resp = pb.ExportModelResponse(config_json=json.dumps(_jsonable(config)), weights=st_save(weights),
                                      step=session.step)
        for name, t in state.items():
            resp.state[name].CopyFrom(codec.encode(t, f"state.{name}"))
        return resp

    def list_losses(self, req: pb.ListLossesRequest, principal: str) -> pb.ListLossesResponse:
        return pb.ListLossesResponse(losses=[loss_info(cls) for cls in losses.all_losses()])
