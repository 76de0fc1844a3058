"""A session's trainable state and the training step.

``TrainState`` is everything a session trains (head, the loss instance with its state, optimiser, cross-batch
memory, dropout generator), built by ``build`` when the first batch fixes the embedding width. Building is a pure
function of (configuration, seed, initial state, width): initialisation runs on the CPU under generators seeded
from the session seed, so a retried or restored session builds the same state.

``prepare`` runs one batch without applying it (forward and backward in the compute layer, and every allocation the
commit needs); ``Pending.commit`` applies it: optimiser step, the loss's own state update and the memory enqueue,
all of it or none (a failure half-way restores the state bit for bit). ``Pending.result`` is only what goes on
the wire.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from embtrain.heads import build_head, set_generator

from . import compute, losses, optim
from .memory import MemoryBank
from .validation import IDS_INPUT

if TYPE_CHECKING:  # pragma: no cover
    from .sessions import Session, SessionSpec
    from .sharding import Shard

# Loss state that is initialised by foreign code from the process-wide generator (PML's learnable losses seed it
# inside a forked RNG) is built under one lock, so sessions do not re-seed each other.
_INIT_LOCK = threading.Lock()
DEFAULT_OPTIMIZER: dict[str, Any] = {"type": "adam", "lr": 1e-3}


@dataclass
class TrainState:
    loss: losses.Loss  # this session's instance, holding the loss state (island centres, PML weights)
    head: torch.nn.Sequential | None
    memory: MemoryBank | None
    generator: torch.Generator  # dropout masks (CPU, so the stream is the same on every device)
    in_dim: int
    out_dim: int
    # The float dtype the session computes in, fixed by its first batch (optimiser state and learnable loss
    # parameters keep it); later batches in another float dtype are cast to it, their gradient back.
    dtype: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    optimizer_spec: optim.OptimizerSpec | None = None
    # Parameters the session optimiser steps (head, then loss state where the optimiser owns it), in order.
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    # True when the session optimiser steps the loss's own parameters (the loss's ``update`` must not).
    state_external: bool = False

    def parameter_count(self) -> int:
        """Elements of the head's parameters plus the loss state (centres, learnable loss parameters)."""
        n = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return n + sum(t.numel() for t in self.loss.state_tensors().values())

    def build_optimizer(self, spec: SessionSpec) -> None:
        """(Re)build the optimiser over the current parameter objects (after loading state that replaced them)."""
        head = [p for p in self.head.parameters() if p.requires_grad] if self.head is not None else []
        state = [t for t in self.loss.state_tensors().values()
                 if isinstance(t, torch.nn.Parameter) and t.requires_grad]
        extra = state if (spec.optimizer is not None or not self.loss.has_update_rule) else []
        self.trainable = head + extra
        self.state_external = bool(extra)  # passed to the loss as ctx.state_optimized_externally
        self.optimizer = self.optimizer_spec = None
        if self.trainable:
            self.optimizer_spec = optim.parse_spec(spec.optimizer or DEFAULT_OPTIMIZER, "config.optimizer")
            self.optimizer = optim.build(self.optimizer_spec, self.trainable)


def build(spec: SessionSpec, initial: Mapping[str, torch.Tensor], in_dim: int, device: torch.device,
          optimizer: bool = True) -> TrainState:
    """The state of a session for embeddings of width ``in_dim`` (``optimizer=False``: leave the optimiser to
    the caller, which loads state that replaces parameter objects first)."""
    # The head draws from its own generator, so concurrent first batches of other sessions cannot change it.
    head, out_dim = build_head(spec.head, in_dim, torch.Generator().manual_seed(spec.seed))
    loss = losses.get(spec.loss)(spec.params)
    with _INIT_LOCK:
        loss.init_state(out_dim, torch.device("cpu"), torch.Generator().manual_seed(spec.seed + 1), initial)
    state = loss.state_tensors()
    if state:
        loss.load_state_tensors({k: v.detach().to(device) for k, v in state.items()})
    generator = torch.Generator(device="cpu").manual_seed(spec.seed + 2)
    module = head.to(device) if len(head) else None
    if module is not None:
        set_generator(module, generator)
    memory = MemoryBank(spec.memory_size, out_dim, device) if spec.memory_size else None
    ts = TrainState(loss=loss, head=module, memory=memory, generator=generator, in_dim=in_dim, out_dim=out_dim)
    if optimizer:
        ts.build_optimizer(spec)
    return ts


def _as_loss_sees_them(ts: TrainState, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with the embeddings' shape and dtype after the head (what the loss will receive), for the
    loss's checks before anything is computed. The stand-in is a zero-size-storage view, not real data."""
    if ts.head is None:
        return inputs
    n = inputs["embeddings"].shape[0]
    stand_in = torch.zeros((), dtype=compute.head_dtype(ts.head)).expand(n, ts.out_dim)
    return {**inputs, "embeddings": stand_in}


@dataclass
class Pending:
    """A batch computed on a session and not yet applied: ``result`` is its answer; ``commit`` applies it, and
    ``abandon`` (or dropping it) leaves the session exactly as it was."""

    session: Session
    state: TrainState
    result: compute.ComputeResult
    _pass: compute.Pass
    _inputs: dict[str, torch.Tensor]
    _rng: torch.Tensor  # the dropout generator's state before the batch
    _dtype: str

    def abandon(self) -> None:
        self.state.generator.set_state(self._rng)  # a batch not applied must not have consumed dropout randomness

    def commit(self) -> None:
        """Optimiser step, the loss's own state update, memory enqueue, step += 1: all of it or (on any failure,
        the state restored bit for bit and the error raised) none of it."""
        ts, p, session = self.state, self._pass, self.session
        saved = _Snapshot(ts)
        try:
            if ts.optimizer is not None and ts.optimizer_spec is not None:
                optim.apply_step(ts.optimizer_spec, ts.optimizer, p.param_grads, session.step)
            with torch.no_grad():
                ts.loss.update(p.loss_inputs, p.output, p.ctx)
            if ts.memory is not None:
                ts.memory.enqueue(p.loss_inputs["embeddings"], self._inputs["labels"], self._inputs.get(IDS_INPUT))
        except BaseException:
            saved.restore()
            self.abandon()
            raise
        ts.dtype = self._dtype
        session.state = ts
        session.step += 1
        session.steps_since_checkpoint += 1


class _Snapshot:
    """Copies of what a commit changes in place (trainable parameters, optimiser state, loss state, the memory's
    position), to put back if the commit fails half-way (an allocation failure in the optimiser, say)."""

    def __init__(self, ts: TrainState) -> None:
        self.ts = ts
        self.params = [p.detach().clone() for p in ts.trainable]
        self.optimizer = copy.deepcopy(ts.optimizer.state_dict()) if ts.optimizer is not None else None
        self.loss = {k: v.detach().clone() for k, v in ts.loss.state_tensors().items()}
        self.memory = ts.memory.position() if ts.memory is not None else None

    def restore(self) -> None:
        ts = self.ts
        with torch.no_grad():
            for p, v in zip(ts.trainable, self.params):
                p.copy_(v)
            for name, t in ts.loss.state_tensors().items():
                t.copy_(self.loss[name])
        if ts.optimizer is not None and self.optimizer is not None:
            ts.optimizer.load_state_dict(self.optimizer)
        if ts.memory is not None and self.memory is not None:
            ts.memory.set_position(*self.memory)


def prepare(session: Session, inputs: dict[str, torch.Tensor], options: compute.ComputeOptions,
            compute_dtype: str, shard: Shard | None = None) -> Pending:
    """Run one validated batch on ``session`` without applying it. A first batch builds the state, which the
    session keeps only if the batch is committed. Every allocation the commit needs happens here.

    ``shard``: this replica's share of a step that several replicas compute on the same global batch (passed to
    ``compute.forward_backward``)."""
    emb = inputs["embeddings"]
    ts = session.state if session.state is not None else build(session.spec, session.initial_state,
                                                               int(emb.shape[1]), session.device)
    # Runs after building: stateful losses check labels against their state (island's K centres).
    ts.loss.check_inputs(_as_loss_sees_them(ts, inputs))
    dtype = ts.dtype or (compute_dtype if compute_dtype != "input" else str(emb.dtype).removeprefix("torch."))
    if ts.head is not None:
        ts.head.train()
    rng = ts.generator.get_state()
    try:
        p = compute.forward_backward(
            ts.loss, inputs, device=session.device, compute_dtype=dtype, options=options, head=ts.head,
            memory=ts.memory.view() if ts.memory is not None and ts.memory.fill else None, trainable=ts.trainable,
            training=True, state_optimized_externally=ts.state_external, shard=shard)
        if ts.memory is not None:
            ts.memory.reserve(p.loss_inputs["embeddings"].dtype)
    except BaseException:
        ts.generator.set_state(rng)
        raise
    return Pending(session, ts, p.result, p, inputs, rng, dtype)


def embed(session: Session, x: torch.Tensor) -> torch.Tensor:
    """The head's output for validated ``x`` in eval mode (no dropout), without training; in ``x``'s dtype. A
    session that has seen no batch keeps the state this builds (the width is now fixed)."""
    ts = session.state if session.state is not None else build(session.spec, session.initial_state,
                                                               int(x.shape[1]), session.device)
    session.state = ts
    if ts.head is None:
        return x
    ts.head.eval()
    try:
        with torch.no_grad():
            return ts.head(x.to(session.device, compute.head_dtype(ts.head))).to("cpu", x.dtype)
    finally:
        ts.head.train()


def export(session: Session) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(configuration, head weights, loss state) on the CPU, for ExportModel / ``embtrain.torch.load_head``."""
    ts = session.state
    assert ts is not None, "the caller checks that the session has state"
    weights = {k: v.detach().cpu().contiguous() for k, v in ts.head.state_dict().items()} \
        if ts.head is not None else {}
    state = {k: v.detach().cpu().contiguous() for k, v in ts.loss.state_tensors().items()}
    config = {"head": session.spec.head, "in_dim": ts.in_dim, "out_dim": ts.out_dim,
              "loss": {"name": session.spec.loss, "params": session.spec.params}, "step": session.step}
    return config, weights, state
