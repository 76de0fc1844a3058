"""Sessions: a loss configuration plus the trainable state a client trains batch by batch (head, loss state such
as island centres or learnable PML parameters, optimiser, cross-batch memory, step), owned by one principal,
persisted to ``state_dir`` and restored on start.

Nothing here knows gRPC. Callers serialise the batches of one session (the servicer holds a per-session lock);
different sessions run concurrently.

A session is *materialised* (head, loss state, optimiser and memory built) by its first batch, because only then
is the embedding width known. Materialisation is a pure function of (configuration, seed, width), so a first
batch that is rejected simply undoes it, and a restored session rebuilds the same modules before loading the
checkpointed tensors into them.
"""

from __future__ import annotations

import logging
import pathlib
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from embtrain.heads import HeadSpecError, build_head, normalize_spec, set_generator

from . import checkpoint, compute, losses, optim, validation
from .errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, invalid
from .memory import SCHEMA as MEMORY_SCHEMA
from .memory import MemoryBank

log = logging.getLogger("embtrain.sessions")

_SEED_BITS = 2**62
_INIT_LOCK = threading.Lock()
DEFAULT_OPTIMIZER: dict[str, Any] = {"type": "adam", "lr": 1e-3}
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class SessionSpec:
    """A validated session configuration (what CreateSession asked for, with defaults filled in)."""

    loss: str
    params: dict[str, Any]  # as the client gave them (the loss re-validates them on restore)
    head: list[dict[str, Any]]  # normalised (see embtrain.heads.normalize_spec)
    optimizer: dict[str, Any] | None  # as given; None: DEFAULT_OPTIMIZER for the head (see Session.trainable)
    memory_size: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "params": self.params, "head": self.head, "optimizer": self.optimizer,
                "memory": {"size": self.memory_size}, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionSpec:
        return cls(loss=d["loss"], params=dict(d["params"]), head=normalize_spec(d["head"], "head"),
                   optimizer=dict(d["optimizer"]) if d["optimizer"] else None,
                   memory_size=int(d["memory"]["size"]), seed=int(d["seed"]))


def parse_spec(loss_name: str, params: Mapping[str, Any] | None, head: Any, optimizer: Mapping[str, Any] | None,
               memory: Mapping[str, Any] | None, seed: int | None) -> SessionSpec:
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
    return SessionSpec(loss=loss_name, params=dict(params or {}), head=head_spec,
                       optimizer=dict(optimizer) if optimizer else None, memory_size=mem["size"], seed=seed)


@dataclass
class Session:
    id: str
    owner: str
    spec: SessionSpec
    device: torch.device
    loss: losses.Loss
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    created_time: float = field(default_factory=time.time)
    in_dim: int | None = None
    out_dim: int | None = None
    # The float dtype the session computes in, fixed by its first batch (optimiser state and learnable loss
    # parameters keep it); later batches in another float dtype are cast to it, their gradient back.
    dtype: str | None = None
    head: torch.nn.Sequential | None = None
    optimizer: torch.optim.Optimizer | None = None
    optimizer_spec: optim.OptimizerSpec | None = None
    memory: MemoryBank | None = None
    generator: torch.Generator | None = None
    last_checkpoint_step: int = -1
    last_checkpoint_time: float = 0.0
    steps_since_checkpoint: int = 0
    closed: bool = False  # set by SessionStore.remove; a closed session is never written again
    # Parameters the session optimiser steps (head, then loss state where the optimiser owns it), in order.
    _trainable: list[torch.nn.Parameter] = field(default_factory=list)
    # True when the session optimiser steps the loss's own parameters (the loss's ``update`` must not).
    state_external: bool = False

    # ---- model materialisation --------------------------------------------------------------------------
    @property
    def materialized(self) -> bool:
        return self.in_dim is not None

    def materialize(self, in_dim: int) -> None:
        """Build the head, the loss state, the optimiser and the memory for embeddings of width ``in_dim``.

        Deterministic in (spec, seed, in_dim): initialisation runs on the CPU under a forked RNG seeded from the
        session seed, then moves to the device, so a retried or restored session builds the same state.
        """
        self._build_model(in_dim)
        self._build_optimizer()

    def _build_model(self, in_dim: int) -> None:
        # The head draws from its own generator, so concurrent first batches of other sessions cannot change it.
        # Loss state that is initialised by foreign code from the process-wide generator (PML's learnable
        # losses seed it inside a forked RNG) is built under one lock, so sessions do not re-seed each other.
        head, out_dim = build_head(self.spec.head, in_dim, torch.Generator().manual_seed(self.spec.seed))
        with _INIT_LOCK:
            state_gen = torch.Generator().manual_seed(self.spec.seed + 1)
            self.loss.init_state(out_dim, torch.device("cpu"), state_gen, self.initial_state)
        state = self.loss.state_tensors()
        if state:
            self.loss.load_state_tensors({k: v.detach().to(self.device) for k, v in state.items()})
        self.head = head.to(self.device) if len(head) else None
        # Dropout masks come from this generator (CPU, so the stream is the same on every device); its state is
        # checkpointed, so a restored session draws the masks an uninterrupted one would.
        self.generator = torch.Generator(device="cpu").manual_seed(self.spec.seed + 2)
        if self.head is not None:
            set_generator(self.head, self.generator)
        self.memory = MemoryBank(self.spec.memory_size, out_dim, self.device) if self.spec.memory_size else None
        self.in_dim, self.out_dim = in_dim, out_dim

    def _build_optimizer(self) -> None:
        """(Re)build the optimiser over the current parameter objects (after loading state that replaced them)."""
        head = [p for p in self.head.parameters() if p.requires_grad] if self.head is not None else []
        state = self.loss_state_params()
        # Loss state parameters are stepped by the session optimiser when the client configured one, or when the
        # loss has no update rule of its own (PML's learnable losses); otherwise the loss applies its own rule
        # (island: center_lr / the paper's alpha rule) in ``update``.
        own_rule = self.loss.family != "pml"
        extra = state if (self.spec.optimizer is not None or not own_rule) else []
        self._trainable = head + extra
        self.state_external = bool(extra)  # passed to the loss as ctx.state_optimized_externally
        self.optimizer = self.optimizer_spec = None
        if self._trainable:
            self.optimizer_spec = optim.parse_spec(self.spec.optimizer or DEFAULT_OPTIMIZER, "config.optimizer")
            self.optimizer = optim.build(self.optimizer_spec, self._trainable)

    def _dematerialize(self) -> None:
        """Undo ``materialize`` (a rejected first batch must leave the session as it was, width not yet fixed)."""
        self.loss = losses.get(self.spec.loss)(self.spec.params)
        self.in_dim = self.out_dim = self.dtype = None
        self.head = self.optimizer = self.optimizer_spec = self.memory = self.generator = None
        self._trainable = []
        self.state_external = False

    def state_bytes(self, in_dim: int) -> int:
        """An upper estimate of the device memory the session's state takes for embeddings of width ``in_dim``:
        head parameters with their gradients and two optimiser slots each, and the memory bank."""
        params, dim = 0, in_dim
        for item in self.spec.head:
            widths = [*item.get("hidden", []), item["out_dim"]] if "out_dim" in item else []
            for width in widths:
                params += dim * width + width
                dim = width
        bank = self.spec.memory_size * (dim * 8 + 16)  # float64 rows at most, label and id
        return 4 * params * 8 + bank

    def loss_state_params(self) -> list[torch.nn.Parameter]:
        return [t for t in self.loss.state_tensors().values() if isinstance(t, torch.nn.Parameter) and t.requires_grad]

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def parameter_count(self) -> int:
        """Elements of the head's parameters plus the loss state (centres, learnable loss parameters)."""
        n = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return n + sum(t.numel() for t in self.loss.state_tensors().values())

    # ---- one batch ---------------------------------------------------------------------------------------
    def check_width(self, d: int, field_name: str = "inputs.embeddings") -> None:
        if self.in_dim is not None and d != self.in_dim:
            raise invalid(field_name, f"width {d}, expected {self.in_dim} (the session's embedding width)")

    def compute(self, inputs: dict[str, torch.Tensor], options: compute.ComputeOptions, compute_dtype: str,
                estimate_budget: int) -> compute.ComputeResult:
        """Run one batch (generic checks already done) and apply it: optimiser step, loss state update,
        memory, step += 1.

        Everything that can reject the batch (the loss's own input checks included) runs before any state
        changes; a rejected first batch also undoes the materialisation it caused.
        """
        emb = inputs.get("embeddings")
        if emb is None:
            raise invalid("inputs.embeddings", "required in a session (the head and the memory act on it)")
        self.check_width(int(emb.shape[1]))
        if self.spec.memory_size and "labels" not in inputs:
            raise invalid("inputs.labels", "required when the session has a cross-batch memory")
        m = emb.shape[0] + (self.memory.fill if self.memory is not None else 0)
        validation.require_budget(type(self.loss), emb, m, estimate_budget)
        fresh = not self.materialized
        if fresh:
            need = self.state_bytes(int(emb.shape[1]))
            if estimate_budget and need > estimate_budget:
                raise ResourceExhausted(
                    f"config: this session's head, optimiser state and memory for embeddings of width "
                    f"{emb.shape[1]} need about {need / 2**20:.0f} MiB, over the server's memory budget of "
                    f"{estimate_budget / 2**20:.0f} MiB; use a smaller head or memory", field="config")
            self.materialize(int(emb.shape[1]))
        try:
            # Runs after materialising: stateful losses check labels against their state (island's K centres).
            self.loss.check_inputs(self._as_loss_sees_them(inputs))
            if self.head is not None:
                self.head.train()
            gen_state = self.generator.get_state() if self.generator is not None else None
            if self.dtype is None:
                self.dtype = compute_dtype if compute_dtype != "input" else str(emb.dtype).removeprefix("torch.")
            try:
                result = compute.run(
                    self.loss, inputs, device=self.device, compute_dtype=self.dtype, options=options,
                    head=self.head, memory=self.memory.view() if self.memory is not None and self.memory.fill else None,
                    trainable=self._trainable, training=True, state_optimized_externally=self.state_external)
            except BaseException:
                if gen_state is not None:  # a rejected batch must not have consumed dropout randomness
                    self.generator.set_state(gen_state)
                raise
        except BaseException:
            if fresh:
                self._dematerialize()
            raise
        # ---- commit: nothing below rejects the batch ----
        if self.optimizer is not None and self.optimizer_spec is not None:
            optim.apply_step(self.optimizer_spec, self.optimizer, result.param_grads, self.step)
        loss_inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if result.head_output is not None:
            loss_inputs["embeddings"] = result.head_output
        ctx = losses.ComputeContext(device=self.device, max_triplets=options.max_triplets,
                                    state_optimized_externally=self.state_external)
        with torch.no_grad():
            self.loss.update(loss_inputs, result.output, ctx)
        if self.memory is not None:
            z = result.head_output if result.head_output is not None else inputs["embeddings"].to(self.device)
            self.memory.enqueue(z, inputs["labels"], inputs.get(compute.IDS_INPUT))
        self.step += 1
        self.steps_since_checkpoint += 1
        return result

    def _as_loss_sees_them(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inputs with the embeddings' shape and dtype after the head (what the loss will receive), for the
        loss's checks before anything is computed. The stand-in is a zero-size-storage view, not real data."""
        if self.head is None or self.out_dim is None:
            return inputs
        n = inputs["embeddings"].shape[0]
        stand_in = torch.zeros((), dtype=compute.head_dtype(self.head)).expand(n, self.out_dim)
        return {**inputs, "embeddings": stand_in}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output for ``x`` in eval mode (no dropout), without training; in ``x``'s dtype."""
        self.check_width(int(x.shape[1]))
        if not self.materialized:
            self.materialize(int(x.shape[1]))
        if self.head is None:
            return x
        self.head.eval()
        try:
            with torch.no_grad():
                return self.head(x.to(self.device, compute.head_dtype(self.head))).to("cpu", x.dtype)
        finally:
            self.head.train()

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(configuration, head weights, loss state) on the CPU, for ExportModel / ``embtrain.torch.load_head``."""
        if not self.materialized:
            raise FailedPrecondition("session_id: the session has seen no batch yet, so its head has no input "
                                     "width; send one Compute or Embed first", field="session_id")
        weights = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()} \
            if self.head is not None else {}
        state = {k: v.detach().cpu().contiguous() for k, v in self.loss.state_tensors().items()}
        config = {"head": self.spec.head, "in_dim": self.in_dim, "out_dim": self.out_dim,
                  "loss": {"name": self.spec.loss, "params": self.spec.params}, "step": self.step}
        return config, weights, state

    # ---- persistence -------------------------------------------------------------------------------------
    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON record, tensors): configuration, step, head, loss state, optimiser state (its tensors and its
        scalars), dropout generator state and memory bank. The schedule position is the step."""
        tensors: dict[str, torch.Tensor] = {}
        record: dict[str, Any] = {
            "version": CHECKPOINT_VERSION, "id": self.id, "owner": self.owner, "spec": self.spec.to_dict(),
            "step": self.step, "created_time": self.created_time, "in_dim": self.in_dim, "dtype": self.dtype,
            "saved_time": time.time(),
        }
        for k, v in self.initial_state.items():
            tensors[f"initial.{k}"] = v
        if self.materialized:
            if self.head is not None:
                tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
            tensors.update({f"loss.{k}": v for k, v in self.loss.state_tensors().items()})
            if self.generator is not None:
                tensors["rng.generator"] = self.generator.get_state()
            if self.optimizer is not None:
                sd = self.optimizer.state_dict()
                scalars: dict[str, Any] = {}
                for idx, st in sd["state"].items():
                    for key, val in st.items():
                        if torch.is_tensor(val):
                            tensors[f"optim.{idx}.{key}"] = val
                        else:
                            scalars[f"{idx}.{key}"] = val
                record["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars}
            if self.memory is not None:
                mt, mm = self.memory.state()
                tensors.update(mt)
                record["memory"] = mm
        return record, tensors

    @classmethod
    def from_checkpoint(cls, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                        device: torch.device) -> Session:
        """Rebuild a session exactly as it was saved. Raises on any inconsistency (the caller reports it)."""
        if record.get("version", CHECKPOINT_VERSION) != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {record.get('version')!r}, expected {CHECKPOINT_VERSION}")
        spec = SessionSpec.from_dict(record["spec"])
        loss = losses.get(spec.loss)(spec.params)
        initial = {k.removeprefix("initial."): v for k, v in tensors.items() if k.startswith("initial.")}
        sess = cls(id=record["id"], owner=record["owner"], spec=spec, device=device, loss=loss, initial_state=initial,
                   step=int(record["step"]), created_time=float(record["created_time"]))
        if record.get("in_dim") is None:
            return sess
        sess._build_model(int(record["in_dim"]))
        sess.dtype = record.get("dtype")
        if sess.head is not None:
            sess.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        state = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("loss.")}
        if state:
            sess.loss.load_state_tensors(state)
        sess._build_optimizer()  # over the parameter objects as loaded (a loss may have replaced its own)
        if sess.generator is not None:
            sess.generator.set_state(tensors["rng.generator"])
        if sess.optimizer is not None:
            saved = record["optimizer"]
            st: dict[int, dict[str, Any]] = {}
            for k, v in tensors.items():
                if k.startswith("optim."):
                    _, idx, key = k.split(".", 2)
                    st.setdefault(int(idx), {})[key] = v
            for k, v in saved["scalars"].items():
                idx, key = k.split(".", 1)
                st.setdefault(int(idx), {})[key] = v
            # load_state_dict moves the state tensors to each parameter's device (``step`` stays on the CPU).
            sess.optimizer.load_state_dict({"state": st, "param_groups": saved["param_groups"]})
        if sess.memory is not None:
            sess.memory.load(tensors, record["memory"])
        return sess


@dataclass
class CorruptEntry:
    """A checkpoint that did not load: ``corrupt`` (moved aside) or ``unavailable`` (kept; e.g. a missing extra)."""

    id: str
    owner: str | None
    path: str
    reason: str
    status: str = "corrupt"


class SessionStore:
    """All sessions of this server, by id; each visible only to its owner."""

    def __init__(self, device: torch.device, state_dir: str | None, node_id: str = "",
                 max_per_principal: int = 64) -> None:
        self.device = device
        self.state_dir = pathlib.Path(state_dir) if state_dir else None
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

    def create(self, spec: SessionSpec, owner: str, initial_state: Mapping[str, torch.Tensor]) -> Session:
        loss = losses.get(spec.loss, "config.loss.name")(spec.params)
        with self._lock:
            mine = sum(1 for s in self._sessions.values() if s.owner == owner)
            if mine >= self.max_per_principal:
                raise ResourceExhausted(f"sessions: {owner!r} already has {mine} sessions, the limit per principal; "
                                        f"close one first", field="sessions")
            sess = Session(id=self.new_id(), owner=owner, spec=spec, device=self.device, loss=loss,
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

    def _visible_corrupt(self, session_id: str, owner: str) -> bool:
        c = self._corrupt.get(session_id)
        return c is not None and c.owner in (None, owner)

    def list(self, owner: str) -> tuple[list[Session], list[CorruptEntry]]:
        with self._lock:
            mine = [s for s in self._sessions.values() if s.owner == owner]
            bad = [c for c in self._corrupt.values() if c.owner in (None, owner)]
        return sorted(mine, key=lambda s: s.created_time), bad

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def remove(self, session_id: str, owner: str, keep_checkpoint: bool) -> Session:
        """Forget a session; its checkpoint file is deleted unless ``keep_checkpoint`` (then the next start
        restores it)."""
        sess = self.get(session_id, owner)
        with self._lock:
            self._sessions.pop(session_id, None)
            sess.closed = True  # a periodic checkpoint still queued for it must not write the file back
        if not keep_checkpoint and self.state_dir is not None:
            self.path(session_id).unlink(missing_ok=True)
        return sess

    # ---- persistence -------------------------------------------------------------------------------------
    def path(self, session_id: str) -> pathlib.Path:
        assert self.state_dir is not None
        return self.state_dir / f"{session_id}{checkpoint.SUFFIX}"

    def save(self, sess: Session) -> int:
        """Write the session's checkpoint now (the caller holds the session's order). Returns its step."""
        if self.state_dir is None or sess.closed:
            return sess.step
        record, tensors = sess.to_checkpoint()
        checkpoint.write_atomic(self.path(sess.id), checkpoint.encode(record, tensors))
        sess.last_checkpoint_step = sess.step
        sess.last_checkpoint_time = float(record["saved_time"])
        sess.steps_since_checkpoint = 0
        return sess.step

    def restore_all(self) -> tuple[int, int]:
        """Load every checkpoint in ``state_dir``; damaged ones are reported and moved aside. (loaded, corrupt)."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return 0, 0
        losses.load_all()  # a checkpoint names its loss: the whole catalog must be registered first
        checkpoint.remove_stale_temporaries(self.state_dir)
        loaded = bad = 0
        for path in sorted(self.state_dir.glob(f"*{checkpoint.SUFFIX}")):
            sid = path.name[: -len(checkpoint.SUFFIX)]
            data = path.read_bytes()
            try:
                record, tensors = checkpoint.decode(data)
                if record.get("id") != sid:
                    raise checkpoint.CorruptCheckpoint(f"the record names session {record.get('id')!r}, the file "
                                                       f"{sid!r}")
                sess = Session.from_checkpoint(record, tensors, self.device)
                sess.last_checkpoint_step = sess.step
                sess.last_checkpoint_time = float(record.get("saved_time", 0.0))
            except FailedPrecondition as exc:
                # Intact, but its loss needs an extra this server lacks: keep the file so that it loads once the
                # extra is installed, and report it.
                log.error("checkpoint %s not loaded: %s", path, exc.message)
                self._corrupt[sid] = CorruptEntry(sid, checkpoint.peek_owner(data), str(path), exc.message,
                                                  status="unavailable")
                bad += 1
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                reason = str(exc) if isinstance(exc, checkpoint.CorruptCheckpoint) else f"{type(exc).__name__}: {exc}"
                moved = checkpoint.move_aside(path)
                log.error("checkpoint %s is corrupt (%s); moved to %s", path, reason, moved)
                self._corrupt[sid] = CorruptEntry(sid, checkpoint.peek_owner(data), str(moved), reason)
                bad += 1
                continue
            self._sessions[sess.id] = sess
            loaded += 1
        return loaded, bad
