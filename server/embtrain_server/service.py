"""Transport-agnostic handlers of the session and catalog RPCs: ``(request message, principal) -> response``:
CreateSession, GetSession, ListSessions, CloseSession, SaveCheckpoint, Embed, ExportModel, ListLosses. (Compute is
``batches``.) Synchronous, on worker threads (``scheduler``), a session's one at a time; the servicer owns gRPC.
Nothing here imports ``grpc``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from google.protobuf import json_format, struct_pb2
from safetensors.torch import save as st_save

from embtrain import codec
from embtrain.structs import struct_to_dict, value_to_python
from embtrain.v1 import embtrain_pb2 as pb

from . import devices, losses, optim, training, validation
from .batches import decode_inputs
from .config import ServerConfig
from .errors import FailedPrecondition, Unavailable, invalid
from .losses.base import InputSpec, Loss
from .metrics import Metrics
from .persistence import Checkpointer
from .sessions import Session, SessionStore, parse_spec


def to_value(x: Any) -> struct_pb2.Value:
    """``x`` as a ``google.protobuf.Value``. A non-finite float becomes the string "inf", "-inf" or "nan": Value's
    number_value must be finite (its JSON mapping has no infinity, and JSON encoders such as grpcurl's refuse the
    whole message otherwise); ``ParamInfo.default_number`` carries a non-finite default as a number."""
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


# The wire dtypes an input of each kind ("float", "int") accepts: what validation.validate_inputs lets through
# (tests/test_protocol.py sends each of them, and each other dtype, to hold the two together).
def _wire_dtypes(accepts: Any) -> list[int]:
    return [pb.DType.Value(f"DTYPE_{n.upper()}") for n in codec.DTYPE_NAMES if accepts(getattr(torch, n))]


INPUT_DTYPES = {
    "float": _wire_dtypes(lambda dt: dt.is_floating_point),
    "int": _wire_dtypes(lambda dt: dt in validation._INT_DTYPES),  # noqa: SLF001
}
# ``ids`` (validation.IDS_INPUT): accepted by every loss; listed where it has an effect.
IDS_INFO = InputSpec(validation.IDS_INPUT, "int", "[n]", False, False,
                     "the client's sample id per row: ComputeResponse.triplet_ids names the mined triplets by id, "
                     "and a session's cross-batch memory keeps them with its rows")


def loss_info(cls: type[Loss]) -> pb.LossInfo:
    info = pb.LossInfo(name=cls.name, description=cls.description, mines_triplets=cls.mines_triplets,
                       stateful=cls.stateful, family=cls.family)
    specs = list(cls.inputs)
    if (cls.mines_triplets or cls.uses_memory) and all(s.name != IDS_INFO.name for s in specs):
        specs.append(IDS_INFO)
    for s in specs:
        info.inputs.add(name=s.name, required=s.required, dtype=s.dtype, shape=s.shape,
                        differentiable=s.differentiable, description=s.description, dtypes=INPUT_DTYPES[s.dtype])
    for p in cls.schema.params:
        pi = info.params.add(name=p.name, type=p.kind, range=p.range_text, choices=list(p.choices),
                             description=p.description)
        pi.default.CopyFrom(to_value(p.default))
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
            pi.default_number = float(p.default)  # a number, infinity included (max_dist)
    return info


def replicas_of(replicas: Any, session: Session) -> Any:
    """The replicas that serve a replicated session; a server started alone cannot (a checkpoint of a replicated
    session restored by a single server)."""
    if replicas is None:
        raise FailedPrecondition(f"session_id: session {session.id!r} is replicated, and this server runs alone "
                                 "(world_size 1); start it as one of the replicas again", field="session_id")
    return replicas


class Service:
    def __init__(self, config: ServerConfig, device: torch.device, store: SessionStore, checkpointer: Checkpointer,
                 metrics: Metrics) -> None:
        self.config = config
        self.device = device
        self.store = store
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.limits = validation.limits_for(config, device)
        self.replicas: Any = None  # ``replicas.Replicas`` on a server that is one of several replicas
        losses.load_all()

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
                          c.group_timeout if c.HasField("group_timeout") else None,
                          replicated=c.replicated, shard=c.shard, replicas=self.config.world_size)
        initial = decode_inputs(c.initial_state, "config.initial_state")
        for name, t in initial.items():
            if t.is_floating_point():
                validation.require_finite(t, f"config.initial_state.{name}")
        losses.get(spec.loss)(spec.params).check_initial_state(initial)
        if spec.replicated:  # on every replica, or on none
            session = self.replicas.create(spec, principal, initial)
            return pb.CreateSessionResponse(session=self.session_info(session))
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
            memory_fill=s.memory_fill,
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
        if s.spec.replicated:
            info.config.replicated = True
            info.config.shard = s.spec.shard
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
        if session.spec.replicated:  # closed on every replica
            info = self.session_info(session)
            replicas_of(self.replicas, session).close(session, req.keep_checkpoint)
            return pb.CloseSessionResponse(session=info)
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
        with devices.out_of_memory(self.device, "embeddings", "the device ran out of memory"):
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
