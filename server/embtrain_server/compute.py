"""The compute layer: validated CPU tensors + a loss (+ optional head, memory) -> loss, gradients, triplets.

Knows tensors and loss objects only (no gRPC), so it can be called and tested without a server. Flow:
``validate_inputs`` (generic checks, then the loss's own) runs on the decoded CPU tensors before anything is
computed; ``run`` moves them to the device, runs head and loss, takes the gradients and brings the results back
to the CPU in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import invalid
from .losses.base import ComputeContext, Loss, LossOutput, Memory
from .validation import IDS_INPUT, all_finite


@dataclass(frozen=True)
class ComputeOptions:
    gradient: bool = True
    triplets: bool = True
    max_triplets: int = 100_000
    per_item: bool = False


@dataclass
class ComputeResult:
    loss: float
    gradients: dict[str, torch.Tensor]
    triplets: torch.Tensor | None
    triplets_total: int
    triplet_ids: torch.Tensor | None
    per_item: torch.Tensor | None
    stats: dict[str, float]
    n: int
    output: LossOutput
    # Gradients of trainable session parameters (head, loss state), for the session's optimiser.
    param_grads: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = field(default_factory=list)
    head_output: torch.Tensor | None = None  # detached, on the device (for the memory bank)


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


def run(loss: Loss, inputs: Mapping[str, torch.Tensor], *, device: torch.device, compute_dtype: str = "input",
        options: ComputeOptions = ComputeOptions(), head: torch.nn.Module | None = None,
        memory: Memory | None = None, trainable: Sequence[torch.nn.Parameter] = (),
        training: bool = True, state_optimized_externally: bool = False) -> ComputeResult:
    """Run one batch. ``inputs`` are validated CPU tensors; results come back on the CPU.

    ``trainable`` are session parameters (head and loss state) whose gradients the session optimiser needs.
    """
    diff_names = [s.name for s in loss.inputs if s.differentiable and s.name in inputs]
    dev: dict[str, torch.Tensor] = {}
    for name, t in inputs.items():
        if t.is_floating_point():
            target = t.dtype if compute_dtype == "input" else getattr(torch, compute_dtype)
            t = t.to(device=device, dtype=target)
        else:
            t = t.to(device=device)
        dev[name] = t
    want_grad = options.gradient or bool(trainable)
    leaves = {}
    for name in diff_names:
        leaves[name] = dev[name].detach().requires_grad_(want_grad)
        dev[name] = leaves[name]
    loss_inputs = dict(dev)
    head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
    with torch.set_grad_enabled(want_grad):
        z = None
        if head is not None and "embeddings" in dev:
            z = head(dev["embeddings"].to(head_dtype(head)))
            loss_inputs["embeddings"] = z
        ctx = ComputeContext(device=device, max_triplets=options.max_triplets, want_triplets=options.triplets,
                             want_per_item=options.per_item, memory=memory, training=training,
                             state_optimized_externally=state_optimized_externally)
        out = loss.forward(loss_inputs, ctx)
    _check_finite(loss.name, "loss", out.loss)

    gradients: dict[str, torch.Tensor] = {}
    param_grads: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []
    loss_state_params = [p for p in trainable if not any(p is q for q in head_params)]
    if want_grad:
        # Stage 1: d loss / d (loss inputs) and d loss / d (loss state parameters).
        loss_targets = {name: loss_inputs[name] for name in diff_names}
        if out.gradients is not None:
            stage1 = {name: out.gradients.get(name) for name in loss_targets}
            state_grads = [None] * len(loss_state_params)
        else:
            targets = list(loss_targets.values()) + list(loss_state_params)
            needs = [t.requires_grad for t in targets]
            grads = torch.autograd.grad(out.loss, [t for t, r in zip(targets, needs) if r], allow_unused=True) \
                if out.loss.requires_grad and any(needs) else []
            it = iter(grads)
            full = [next(it) if r else None for r in needs]
            stage1 = dict(zip(loss_targets, full[:len(loss_targets)]))
            state_grads = full[len(loss_targets):]
        # Stage 2: through the head to the client's embeddings and the head's parameters.
        if z is not None:
            gz = stage1.get("embeddings")
            if gz is None:
                gz = torch.zeros_like(z)
            hx = torch.autograd.grad(z, [leaves["embeddings"], *head_params], grad_outputs=gz, allow_unused=True)
            stage1["embeddings"] = hx[0]
            param_grads.extend(zip(head_params, hx[1:]))
        param_grads.extend(zip(loss_state_params, state_grads))
        if options.gradient:
            for name in diff_names:
                g = stage1.get(name)
                src = inputs[name]
                g = torch.zeros(src.shape, dtype=src.dtype) if g is None else g.detach().to("cpu", src.dtype)
                _check_finite(loss.name, f"gradient of {name}", g)
                gradients[name] = g
        for _, g in param_grads:
            if g is not None:
                _check_finite(loss.name, "gradient of the session parameters", g)

    triplets = out.triplets.detach().to("cpu", torch.int64) if (out.triplets is not None and options.triplets) else None
    triplet_ids = None
    if triplets is not None and IDS_INPUT in inputs:
        cand = inputs[IDS_INPUT]
        if memory is not None and memory.ids.numel():
            cand = torch.cat([cand, memory.ids.to("cpu")])
        triplet_ids = cand[triplets] if triplets.numel() else torch.empty((0, 3), dtype=torch.int64)
    per_item = out.per_item.detach().to("cpu") if (out.per_item is not None and options.per_item) else None
    n = int(inputs["embeddings"].shape[0]) if "embeddings" in inputs else 0
    return ComputeResult(
        loss=float(out.loss.detach()), gradients=gradients, triplets=triplets, triplets_total=int(out.triplets_total),
        triplet_ids=triplet_ids, per_item=per_item, stats={k: float(v) for k, v in out.stats.items()}, n=n,
        output=out, param_grads=param_grads, head_output=None if z is None else z.detach())

