"""The compute layer: validated CPU tensors + a loss (+ optional head, memory) -> loss, gradients, triplets.

Knows tensors and loss objects only (no gRPC, no sessions), so it can be called and tested without a server.
``forward_backward`` moves the inputs to the device once, runs head and loss, takes the gradients of the client's
inputs and of the session parameters, and brings the wire results back to the CPU in the input's dtype; the
``Pass`` it returns keeps the device tensors the loss saw, so a training step applies its updates to exactly
those. ``run`` is the stateless form.

Shard mode (``shard``, see ``sharding``): every replica holds the whole batch, the loss computes only the terms of
the replica's anchors, and ``forward_backward`` sums the partial loss and gradients over the replicas and
concatenates the per-anchor results, so every replica returns one server's result (within round-off) and holds
the same parameter gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import FailedPrecondition, invalid
from .losses.base import ComputeContext, Loss, LossOutput, Memory
from .sharding import Shard
from .validation import IDS_INPUT, all_finite

ParamGrads = list[tuple[torch.nn.Parameter, "torch.Tensor | None"]]


@dataclass(frozen=True)
class ComputeOptions:
    gradient: bool = True
    triplets: bool = True
    max_triplets: int = 100_000
    per_item: bool = False


@dataclass
class ComputeResult:
    """What goes on the wire for one batch (CPU tensors, in the input's dtype)."""

    loss: float
    gradients: dict[str, torch.Tensor]
    triplets: torch.Tensor | None
    triplets_total: int
    triplet_ids: torch.Tensor | None
    per_item: torch.Tensor | None
    stats: dict[str, float]
    n: int
    truncated: bool = False  # more active triplets than ``max_triplets`` let through


@dataclass
class Pass:
    """One forward and backward: the wire result plus what a training step needs to apply it."""

    result: ComputeResult
    output: LossOutput
    # The loss's inputs on the device, as the loss saw them (embeddings after the head, detached).
    loss_inputs: dict[str, torch.Tensor]
    ctx: ComputeContext
    # Gradients of the trainable session parameters (head, loss state), for the session's optimiser.
    param_grads: ParamGrads
    # Shard mode: ``output`` is this replica's share (its anchors), ``result`` and ``param_grads`` are global.
    shard: Shard | None = None


def _check_finite(loss_name: str, what: str, t: torch.Tensor) -> None:
    """The native losses guard every division and root; a foreign loss (torch.*, pml.*) can still overflow or
    hit a singular point on some batch. Such a batch is refused before anything is applied."""
    if not all_finite(t.detach()):
        raise invalid("inputs.embeddings", f"loss {loss_name!r} gives a non-finite {what} for this batch (for "
                      "example at duplicate embeddings or overflow in the input's dtype); nothing was applied")


def head_dtype(head: torch.nn.Module) -> torch.dtype:
    """Heads keep float32 parameters; their input is cast to that dtype (the cast is differentiable, so the
    gradient still comes back in the input's dtype)."""
    return next((p.dtype for p in head.parameters()), torch.float32)


def _to_device(inputs: Mapping[str, torch.Tensor], device: torch.device, compute_dtype: str) -> dict[str, torch.Tensor]:
    target = None if compute_dtype == "input" else getattr(torch, compute_dtype)
    return {name: t.to(device=device, dtype=target or t.dtype) if t.is_floating_point() else t.to(device=device)
            for name, t in inputs.items()}


def _grads(loss: torch.Tensor, targets: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """d loss / d each target (None where a target needs no gradient or the loss does not depend on it)."""
    needs = [t.requires_grad for t in targets]
    if not loss.requires_grad or not any(needs):
        return [None] * len(targets)
    it = iter(torch.autograd.grad(loss, [t for t, r in zip(targets, needs) if r], allow_unused=True))
    return [next(it) if r else None for r in needs]


def run(loss: Loss, inputs: Mapping[str, torch.Tensor], *, device: torch.device, compute_dtype: str = "input",
        options: ComputeOptions = ComputeOptions()) -> ComputeResult:
    """One stateless batch: ``inputs`` are validated CPU tensors; the results come back on the CPU."""
    return forward_backward(loss, inputs, device=device, compute_dtype=compute_dtype, options=options,
                            training=False).result


def forward_backward(loss: Loss, inputs: Mapping[str, torch.Tensor], *, device: torch.device,
                     compute_dtype: str = "input", options: ComputeOptions = ComputeOptions(),
                     head: torch.nn.Module | None = None, memory: Memory | None = None,
                     trainable: Sequence[torch.nn.Parameter] = (), training: bool = True,
                     state_optimized_externally: bool = False, shard: Shard | None = None) -> Pass:
    """Run one batch through ``head`` (if any) and ``loss``; nothing is updated.

    ``trainable`` are session parameters (head and loss state) whose gradients the session optimiser needs.

    ``shard``: this replica's place in a step that ``shard.count`` replicas compute together, each with the same
    ``inputs``, head, memory and state (shard mode; the loss must be ``shardable`` unless ``count`` is 1). The
    loss computes the terms of the replica's anchors; the partial loss value, the gradients with respect to the
    loss's inputs and to the loss's state parameters are summed over the replicas (the head's backward then runs
    on the summed gradient, which by the chain rule gives the sum of the replicas' head and input gradients), and
    the triplets (capped at ``max_triplets`` after concatenation, in replica order), their total and the per-item
    losses are gathered. Every replica then returns the same result and parameter gradients. Every replica must
    make this call (the collectives block until all do).
    """
    if shard is not None and not loss.shardable:
        if shard.count > 1:
            raise FailedPrecondition(f"loss {loss.name!r} cannot be sharded across replicas; compute the whole "
                                     "step on every replica instead")
        shard = None  # one replica: the whole batch
    diff_names = [s.name for s in loss.inputs if s.differentiable and s.name in inputs]
    want_grad = options.gradient or bool(trainable)
    dev = _to_device(inputs, device, compute_dtype)
    leaves = {name: dev[name].detach().requires_grad_(want_grad) for name in diff_names}
    loss_inputs = {**dev, **leaves}
    head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    per_item = options.per_item or loss.returns_per_item
    ctx = ComputeContext(device=device, max_triplets=options.max_triplets, want_triplets=options.triplets,
                         want_per_item=per_item, memory=memory, training=training,
                         state_optimized_externally=state_optimized_externally, shard=shard)
    with torch.set_grad_enabled(want_grad):
        z = None
        if head is not None and "embeddings" in dev:
            z = head(leaves["embeddings"].to(head_dtype(head)))
            loss_inputs["embeddings"] = z
        out = loss.forward(loss_inputs, ctx)
    # Shard mode: the replicas' shares summed (float64); every replica sees the same sum, so all decide alike.
    loss_value = out.loss if shard is None else shard.all_reduce(out.loss.detach().to(torch.float64).reshape(1))[0]
    _check_finite(loss.name, "loss", loss_value)
    gathered = _ShardGather(shard, out, options, per_item) if shard is not None else None

    gradients: dict[str, torch.Tensor] = {}
    param_grads: ParamGrads = []
    if want_grad:
        state_params = [p for p in trainable if not any(p is q for q in head_params)]
        # Stage 1: d loss / d (loss inputs) and d loss / d (loss state parameters).
        if out.gradients is not None:
            stage1 = {name: out.gradients.get(name) for name in diff_names}
            state_grads: list[torch.Tensor | None] = [None] * len(state_params)
        else:
            full = _grads(out.loss, [loss_inputs[name] for name in diff_names] + state_params)
            stage1 = dict(zip(diff_names, full[:len(diff_names)]))
            state_grads = full[len(diff_names):]
        if shard is not None:
            # The partial gradients of the loss's inputs and state summed over the replicas (before the head).
            summed = _sum_over(shard, [stage1.get(name) for name in diff_names] + list(state_grads),
                               [loss_inputs[name] for name in diff_names] + state_params)
            stage1 = dict(zip(diff_names, summed[:len(diff_names)]))
            state_grads = summed[len(diff_names):]
        # Stage 2: through the head to the client's embeddings and the head's parameters.
        if z is not None:
            gz = stage1.get("embeddings")
            hx = torch.autograd.grad(z, [leaves["embeddings"], *head_params],
                                     grad_outputs=torch.zeros_like(z) if gz is None else gz, allow_unused=True)
            stage1["embeddings"] = hx[0]
            param_grads.extend(zip(head_params, hx[1:]))
        param_grads.extend(zip(state_params, state_grads))
        if options.gradient:
            for name in diff_names:
                g, src = stage1.get(name), inputs[name]
                g = torch.zeros(src.shape, dtype=src.dtype) if g is None else g.detach().to("cpu", src.dtype)
                _check_finite(loss.name, f"gradient of {name}", g)
                gradients[name] = g
        for _, g in param_grads:
            if g is not None:
                _check_finite(loss.name, "gradient of the session parameters", g)

    if gathered is not None:
        triplets, triplets_total, per_item_out = gathered.triplets, gathered.total, gathered.per_item
    else:
        triplets = out.triplets.detach().to("cpu", torch.int64) if (out.triplets is not None and options.triplets) \
            else None
        triplets_total = int(out.triplets_total)
        per_item_out = out.per_item.detach().to("cpu") if (out.per_item is not None and per_item) else None
    triplet_ids = None
    if triplets is not None and IDS_INPUT in inputs:
        cand = inputs[IDS_INPUT]
        if memory is not None and memory.ids.numel():
            cand = torch.cat([cand, memory.ids.to("cpu")])
        triplet_ids = cand[triplets] if triplets.numel() else torch.empty((0, 3), dtype=torch.int64)
    n = int(inputs["embeddings"].shape[0]) if "embeddings" in inputs else 0
    result = ComputeResult(
        loss=float(loss_value.detach()), gradients=gradients, triplets=triplets, triplets_total=triplets_total,
        triplet_ids=triplet_ids, per_item=per_item_out, stats={k: float(v) for k, v in out.stats.items()}, n=n,
        truncated=triplets is not None and triplets_total > triplets.shape[0])
    seen = {name: t.detach() for name, t in loss_inputs.items()}
    return Pass(result, out, seen, ctx, param_grads, shard)


# ---- shard mode ---------------------------------------------------------------------------------------------

def _sum_over(shard: Shard, grads: Sequence[torch.Tensor | None],
              like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each gradient summed over the replicas (a replica without one adds zeros shaped like its target);
    None where no replica has one. One collective for the flags, then one per gradient, in order."""
    if not grads:
        return []
    flags = shard.all_reduce(torch.tensor([g is not None for g in grads], dtype=torch.int64))
    out: list[torch.Tensor | None] = []
    for g, t, any_has in zip(grads, like, flags.tolist()):
        if not any_has:
            out.append(None)
            continue
        local = torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.detach()
        out.append(shard.all_reduce(local))
    return out


class _ShardGather:
    """The per-anchor results of every replica, in replica order: triplets (capped at ``max_triplets`` after the
    concatenation; each replica's own list is already capped, which keeps every triplet of the global prefix),
    their summed total, and the per-item losses. The stats are global already (``Loss.shardable``)."""

    def __init__(self, shard: Shard, out: LossOutput, options: ComputeOptions, per_item: bool) -> None:
        has_t = out.triplets is not None and options.triplets
        has_p = out.per_item is not None and per_item
        meta = shard.all_reduce(torch.tensor([int(has_t), int(out.triplets_total), int(has_p)], dtype=torch.int64))
        any_t, self.total, any_p = (int(v) for v in meta.tolist())
        self.triplets: torch.Tensor | None = None
        self.per_item: torch.Tensor | None = None
        if any_t:
            local = out.triplets.detach().to("cpu", torch.int64) if has_t else torch.zeros(0, 3, dtype=torch.int64)
            self.triplets = torch.cat(shard.all_gather(local.reshape(-1, 3)))[:max(options.max_triplets, 0)]
        if any_p:
            local = out.per_item.detach().to("cpu") if has_p else torch.zeros(0, dtype=out.loss.dtype)
            self.per_item = torch.cat(shard.all_gather(local))
