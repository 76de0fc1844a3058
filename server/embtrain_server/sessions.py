"""Sessions: a validated configuration (``SessionSpec``), a ``Session`` (owner, step, and the trainable state of
``training.TrainState`` once the first batch has fixed the width) and the ``SessionStore`` that holds them by id,
each visible only to its owner.

Nothing here knows gRPC. Callers serialise the batches of one session (``scheduler.Scheduler``); different
sessions run concurrently. Training is in ``training``; checkpoint files and their policy are in ``checkpoint``
and ``persistence``.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from embtrain.heads import HeadSpecError, normalize_spec

from . import groups, losses, optim
from .errors import InvalidArgument, NotFound, ResourceExhausted, invalid
from .memory import SCHEMA as MEMORY_SCHEMA
from .steps import Answer
from .training import TrainState

_SEED_BITS = 2**62
DEFAULT_GROUP_TIMEOUT = 60.0
MAX_GROUP_SIZE = 1024
MAX_GROUP_TIMEOUT = 3600.0


@dataclass(frozen=True)
class SessionSpec:
    """A validated session configuration (what CreateSession asked for, with defaults filled in)."""

    loss: str
    params: dict[str, Any]  # as the client gave them (the loss re-validates them on restore)
    head: list[dict[str, Any]]  # normalised (see embtrain.heads.normalize_spec)
    optimizer: dict[str, Any] | None  # as given; None: training.DEFAULT_OPTIMIZER for the head
    memory_size: int
    seed: int
    group_size: int = 1  # members sending one slice each of every step (see ``groups``)
    group_timeout: float = DEFAULT_GROUP_TIMEOUT  # seconds a step waits for its slices before it aborts
    replicated: bool = False  # exists on every replica; its steps are computed by the replicas together
    shard: bool = False  # replicated, each replica computing its share of the anchors (``sharding``)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "params": self.params, "head": self.head, "optimizer": self.optimizer,
                "memory": {"size": self.memory_size}, "seed": self.seed,
                "group": {"size": self.group_size, "timeout": self.group_timeout, "replicated": self.replicated,
                          "shard": self.shard}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionSpec:
        group = d.get("group", {"size": 1, "timeout": DEFAULT_GROUP_TIMEOUT})
        return cls(loss=d["loss"], params=dict(d["params"]), head=normalize_spec(d["head"], "head"),
                   optimizer=dict(d["optimizer"]) if d["optimizer"] else None,
                   memory_size=int(d["memory"]["size"]), seed=int(d["seed"]), group_size=int(group["size"]),
                   group_timeout=float(group["timeout"]), replicated=bool(group.get("replicated", False)),
                   shard=bool(group.get("shard", False)))


def parse_spec(loss_name: str, params: Mapping[str, Any] | None, head: Any, optimizer: Mapping[str, Any] | None,
               memory: Mapping[str, Any] | None, seed: int | None, group_size: int | None = None,
               group_timeout: float | None = None, replicated: bool = False, shard: bool = False,
               replicas: int = 1) -> SessionSpec:
    """Validate everything a session needs before any state exists. Raises ``InvalidArgument``."""
    cls = losses.get(loss_name, "config.loss.name")
    cls(params)  # validates the parameters
    try:
        head_spec = normalize_spec(head, "config.head")
    except HeadSpecError as exc:
        raise InvalidArgument(str(exc), field=exc.field) from None
    if optimizer:
        optim.parse_spec(optimizer, "config.optimizer")
    mem = MEMORY_SCHEMA.parse(memory, "config.memory")
    if mem["size"] and not cls.uses_memory:
        raise invalid("config.memory.size", f"loss {loss_name!r} does not use a cross-batch memory; leave the "
                      "memory out (size 0)")
    if seed is None:
        seed = secrets.randbelow(_SEED_BITS)
    elif not 0 <= seed < 2**63:
        raise invalid("config.seed", f"expected 0 <= seed < 2^63, got {seed}")
    group_size = 1 if group_size is None else group_size
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise invalid("config.group_size", f"expected 1 to {MAX_GROUP_SIZE} members, got {group_size}")
    if group_size > 1:
        groups.check_group_loss(cls)
    group_timeout = DEFAULT_GROUP_TIMEOUT if group_timeout is None else group_timeout
    if not 0 < group_timeout <= MAX_GROUP_TIMEOUT:
        raise invalid("config.group_timeout", f"expected seconds in (0, {MAX_GROUP_TIMEOUT:.0f}], got {group_timeout}")
    if (replicated or shard) and replicas < 2:
        raise invalid("config.replicated" if replicated else "config.shard", "this server runs alone (world_size "
                      "1): replicated sessions need a server started as one of several replicas (--world-size)")
    if shard:
        if not getattr(cls, "shardable", False):
            raise invalid("config.shard", f"loss {loss_name!r} cannot split its anchors between replicas; leave shard "
                          "off (every replica computes the whole step)")
        replicated = True
    return SessionSpec(loss=loss_name, params=dict(params or {}), head=head_spec,
                       optimizer=dict(optimizer) if optimizer else None, memory_size=mem["size"], seed=seed,
                       group_size=group_size, group_timeout=float(group_timeout), replicated=replicated, shard=shard)


@dataclass
class Session:
    """One session: its configuration, its owner, its step and, from the first batch on, its ``TrainState``
    (``None`` until then: a rejected first batch leaves nothing behind)."""

    id: str
    owner: str
    spec: SessionSpec
    device: torch.device
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    created_time: float = field(default_factory=time.time)
    state: TrainState | None = None
    last: Answer | None = None  # the answer of the last applied step, for a resend (see ``steps``)
    last_checkpoint_step: int = -1
    last_checkpoint_time: float = 0.0
    steps_since_checkpoint: int = 0
    closed: bool = False  # set by SessionStore.remove; a closed session is never written again

    @property
    def loss_cls(self) -> type[losses.Loss]:
        return losses.get(self.spec.loss)

    @property
    def in_dim(self) -> int | None:
        """The embedding width, fixed by the first batch (None before it)."""
        return self.state.in_dim if self.state is not None else None

    @property
    def memory_fill(self) -> int:
        """Rows in the cross-batch memory (candidates beyond the batch)."""
        return self.state.memory.fill if self.state is not None and self.state.memory is not None else 0

    def check_width(self, d: int, field_name: str = "inputs.embeddings") -> None:
        if self.state is not None and d != self.state.in_dim:
            raise invalid(field_name, f"width {d}, expected {self.state.in_dim} (the session's embedding width)")


@dataclass
class CorruptEntry:
    """A checkpoint that did not load: ``corrupt`` (moved aside) or ``unavailable`` (kept; e.g. a missing extra).
    It is shown to its owner only (never with a path); one whose owner cannot be read is for the operator (the log
    and ``embtrain_unloaded_checkpoints``)."""

    id: str
    owner: str | None
    path: str
    reason: str
    status: str = "corrupt"


class SessionStore:
    """All sessions of this server, by id; each visible only to its owner."""

    def __init__(self, device: torch.device, node_id: str = "", max_per_principal: int = 64) -> None:
        self.device = device
        self.node_id = node_id
        self.max_per_principal = max_per_principal
        self._sessions: dict[str, Session] = {}
        self._corrupt: dict[str, CorruptEntry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def new_id(self) -> str:
        token = secrets.token_hex(10)
        return f"{self.node_id}.{token}" if self.node_id else token

    def check_room(self, owner: str) -> None:
        mine = sum(1 for s in self._sessions.values() if s.owner == owner)
        if mine >= self.max_per_principal:
            raise ResourceExhausted(f"sessions: {owner!r} already has {mine} sessions, the limit per principal; "
                                    f"close one first", field="sessions")

    def create(self, spec: SessionSpec, owner: str, initial_state: Mapping[str, torch.Tensor],
               session_id: str | None = None) -> Session:
        """A new session (``session_id``: the id a replicated session has on every replica)."""
        with self._lock:
            self.check_room(owner)
            sess = Session(id=session_id or self.new_id(), owner=owner, spec=spec, device=self.device,
                           initial_state=dict(initial_state))
            self._sessions[sess.id] = sess
        return sess

    def get(self, session_id: str, owner: str, field_name: str = "session_id") -> Session:
        sess = self._sessions.get(session_id)
        if sess is None or sess.owner != owner:
            # Another principal's session is indistinguishable from a missing one.
            hint = " (its checkpoint is corrupt; see ListSessions)" if self._visible_corrupt(session_id, owner) else ""
            raise NotFound(f"{field_name}: no session {session_id!r}{hint}", field=field_name)
        return sess

    def peek(self, session_id: str) -> Session | None:
        """The session with this id whoever owns it (for the server's own bookkeeping, never for a caller)."""
        return self._sessions.get(session_id)

    def _visible_corrupt(self, session_id: str, owner: str) -> bool:
        c = self._corrupt.get(session_id)
        return c is not None and c.owner == owner

    def list(self, owner: str) -> tuple[list[Session], list[CorruptEntry]]:
        with self._lock:
            mine = [s for s in self._sessions.values() if s.owner == owner]
            bad = [c for c in self._corrupt.values() if c.owner == owner]
        return sorted(mine, key=lambda s: s.created_time), bad

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def remove(self, session_id: str, owner: str) -> Session:
        """Forget a session (its checkpoint file is the checkpointer's business)."""
        sess = self.get(session_id, owner)
        with self._lock:
            self._sessions.pop(session_id, None)
            sess.closed = True  # a periodic checkpoint still queued for it must not write the file back
        return sess

    def add_restored(self, sess: Session) -> None:
        with self._lock:
            self._sessions[sess.id] = sess

    def add_unavailable(self, entry: CorruptEntry) -> None:
        with self._lock:
            self._corrupt[entry.id] = entry
