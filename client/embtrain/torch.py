"""PyTorch integration (extra ``embtrain[torch]``): ``RemoteLoss`` makes the remote loss feel local, and
``load_head`` rebuilds a session's exported head as a local module.

    loss_fn = RemoteLoss(client, loss="batch_hard_triplet", margin=0.3)
    loss = loss_fn(encoder(x), y)
    loss.backward()          # applies the server's d loss / d embeddings
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("embtrain.torch needs PyTorch: pip install 'embtrain[torch]'") from exc

from safetensors.torch import load as _st_load

from ._client import Client, ComputeResult, ExportedModel, Session
from .errors import invalid_argument
from .heads import build_head

__all__ = ["RemoteLoss", "load_head"]


class _RemoteLossFn(torch.autograd.Function):
    """Forward: the server's loss value. Backward: grad_output times the server's gradient for each input."""

    @staticmethod
    def forward(ctx: Any, loss_value: torch.Tensor, names: tuple[str, ...], grads: tuple[torch.Tensor | None, ...],
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return loss_value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        out = [None if g is None else (grad_output.to(g.dtype) * g) for g in ctx.grads]
        return (None, None, None, *out)


class RemoteLoss(nn.Module):
    """A loss computed by an embtrain server, usable like any torch loss.

    ``client_or_target`` is a ``Client``, a ``Session`` (trains the session's server-side state with every call)
    or a target string. Loss parameters are keyword arguments. ``forward(embeddings, labels=None, **inputs)``
    returns a scalar tensor on the embeddings' device and dtype; its backward applies the server's gradient for
    every differentiable input that requires grad. The last full result is kept in ``last_result`` (triplets,
    stats, step).

    With a ``Session``, every call is a step-numbered batch (the next step after the session's current one, read
    once at the first call), so a call that is resent after a lost answer is applied exactly once.

    **Group sessions and DDP.** With a session created with ``group_size=W``, each call sends this process's slice
    of the step as member ``rank``. Inside an initialised ``torch.distributed`` group, the rank is the process's
    rank, the step counter is agreed from rank 0, and the gradient is multiplied by the world size (``ddp_scale``,
    which overrides it). Why: the server returns ``G_r = dL/dx_r``, the exact partials of the loss ``L`` over the
    concatenated batch, so one process holding the whole batch would get ``dL/dθ = Σ_r J_rᵀ G_r`` for the encoder's
    parameters θ (``J_r = dx_r/dθ``). DDP's all-reduce *averages* the ranks' parameter gradients, giving
    ``(1/W) Σ_r J_rᵀ g_r`` for the gradients ``g_r`` back-propagated on each rank; with ``g_r = W · G_r`` that is
    exactly ``Σ_r J_rᵀ G_r``. A client that sums gradients itself (or a single process) passes ``ddp_scale=1``.
    Outside a process group, give ``rank=`` explicitly.
    """

    def __init__(self, client_or_target: Client | Session | str, loss: str | None = None,
                 params: Mapping[str, Any] | None = None, *, rank: int | None = None,
                 ddp_scale: float | None = None, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(client_or_target, Session):
            self.session: Session | None = client_or_target
            self.client = client_or_target.client
        else:
            self.session = None
            self.client = Client(client_or_target) if isinstance(client_or_target, str) else client_or_target
            if not loss:
                raise invalid_argument("loss", "expected the loss name (see `embtrain losses`), or pass a Session")
        self.loss_name = loss
        self.params = {**(params or {}), **kwargs}
        self.last_result: ComputeResult | None = None
        self.rank = rank
        self.ddp_scale = ddp_scale
        self._step: int | None = None  # the session's last applied step, as far as this loss knows
        self._member: Any = None  # the session, or its member for a group session

    def _join(self) -> None:
        """First call on a session: the step counter, and for a group session the rank and the DDP factor."""
        assert self.session is not None
        info = self.session.info()
        size = int(info.config.get("group_size", 1))
        dist = torch.distributed
        in_group = dist.is_available() and dist.is_initialized()
        step = info.step
        if size > 1:
            rank = self.rank if self.rank is not None else (dist.get_rank() if in_group else None)
            if rank is None:
                raise invalid_argument("rank", f"the session has group_size {size}: give rank= or run inside an "
                                       "initialised torch.distributed group")
            if in_group:  # every rank starts from the same step: rank 0's view
                agreed = [step]
                dist.broadcast_object_list(agreed, src=0)
                step = int(agreed[0])
            self._member = self.session.member(rank)
            if self.ddp_scale is None:
                self.ddp_scale = float(dist.get_world_size()) if in_group else 1.0
        else:
            self._member = self.session
        self._step = step

    def forward(self, embeddings: torch.Tensor, labels: Any = None, **inputs: Any) -> torch.Tensor:
        named = {"embeddings": embeddings, **inputs}
        want_grad = torch.is_grad_enabled() and any(
            torch.is_tensor(v) and v.requires_grad for v in named.values())
        if self.session is not None:
            if self._step is None:
                self._join()
            r = self._member.compute(embeddings, labels, return_gradient=want_grad, step=self._step + 1, **inputs)
            self._step = r.step
        else:
            r = self.client.compute(embeddings, labels, loss=self.loss_name, params=self.params,
                                    return_gradient=want_grad, **inputs)
        self.last_result = r
        value = torch.tensor(r.loss, dtype=embeddings.dtype, device=embeddings.device)
        if not want_grad:
            return value
        names = tuple(k for k, v in named.items() if torch.is_tensor(v) and v.requires_grad)
        scale = self.ddp_scale if self.ddp_scale is not None else 1.0
        grads = tuple(g if g is None or scale == 1.0 else g * scale for g in (r.gradients.get(k) for k in names))
        return _RemoteLossFn.apply(value, names, grads, *(named[k] for k in names))


def load_head(model: ExportedModel, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported session head (``Session.export_model()``) as a local module in eval mode.

    Its outputs equal ``Session.embed`` for the same weights, to float tolerance. The head takes
    ``[n, in_dim]`` float32 input (``model.config["in_dim"]``); an identity head is an empty ``nn.Sequential``.
    """
    config = model.config
    if "head" not in config or "in_dim" not in config:
        raise ValueError("model: not an exported session head (its config has no 'head' / 'in_dim')")
    head, out_dim = build_head(config["head"], int(config["in_dim"]))
    if "out_dim" in config and int(config["out_dim"]) != out_dim:
        raise ValueError(f"model: the head spec gives out_dim {out_dim}, the export says {config['out_dim']}")
    # strict: a missing or extra tensor means the export and this SDK disagree on the layout.
    head.load_state_dict(_st_load(model.weights), strict=True)
    return head.to(device).eval()
