"""Island loss (Cai et al., FG 2018; LOSSES.md §D): a center loss plus a term pushing the class centres apart.

``loss = loss_weight · (L_C + λ1·L_I)`` with ``L_C = ½Σ||x_i − c_{y_i}||²`` (``/n`` for ``center_reduction =
"mean"``) and ``L_I = Σ_{j<k}(cos(c_j, c_k) + 1)`` (``×2`` for ordered pairs) over all K centres.

Two modes:

* **stateless**: the request carries ``centers`` [K, d]; the response then has gradients for the embeddings
  and for the centres, and nothing is kept.
* **session**: the session holds the centres (``init_state``: N(0,1) from the session generator, or
  ``initial["initial_centers"]``). ``forward`` uses them as they are; ``update`` then moves them with the
  paper's α-rule (``center_update="paper"``), one plain SGD step on ``∂loss/∂C`` (``"sgd"``), or not at all
  (``"none"``). The loss and gradient of a call always use the centres before its update.

The loss and its gradients with respect to the embeddings and the centres are computed in closed form
(``island_closed_form``: one K x K matmul, no autograd graph) and handed to autograd with
``distances.with_gradients``; ``island_terms`` is the same formula through autograd (used by the SGD centre update).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import invalid
from ..params import Param, Schema
from .base import EMBEDDINGS, ComputeContext, InputSpec, Loss, LossOutput, register
from ._mining import check_labels
from .distances import with_gradients

# Centres with a norm below this have cos := 0 with everything (constant, no gradient) instead of 0/0.
_MIN_NORM = 1e-8


def _outside(y: torch.Tensor, k: int | None) -> tuple[bool, bool]:
    """Whether the smallest label is below 0 and whether the largest is at least ``k``."""
    lo, hi = (int(v) for v in torch.aminmax(y))
    return lo < 0, hi >= k  # type: ignore[operator]


def _unit_centers(centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit centres, norms and the ``norm >= 1e-8`` mask; a zero-norm row is left as is with norm 1 so that
    neither the value nor the gradient can be NaN (``where`` blocks the masked branch's gradient)."""
    sq = (centers * centers).sum(1)
    ok = sq.detach().sqrt() >= _MIN_NORM
    norm = torch.where(ok, sq, torch.ones_like(sq)).sqrt()
    return centers / norm[:, None], norm, ok


def island_terms(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor,
                 params: Mapping[str, object]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, L_C, L_I)`` of §D.3 (differentiable in ``x`` and ``centers``)."""
    n, k = x.shape[0], centers.shape[0]
    diff = x - centers[y]
    center_loss = 0.5 * (diff * diff).sum()
    if params["center_reduction"] == "mean":
        center_loss = center_loss / n
    unit, _, ok = _unit_centers(centers)
    both = ok[:, None] & ok[None, :] & ~torch.eye(k, dtype=torch.bool, device=centers.device)
    cos = torch.where(both, unit @ unit.T, 0.0)
    # Σ_{j<k}(cos + 1) = ½Σ_{j≠k} cos + K(K−1)/2; zero-norm pairs contribute exactly the +1.
    island = 0.5 * cos.sum() + k * (k - 1) / 2
    if params["pairs"] == "ordered":
        island = 2.0 * island
    loss = params["loss_weight"] * (center_loss + params["lambda1"] * island)
    return loss, center_loss, island


def island_closed_form(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, params: Mapping[str, object],
                       need_grad: bool) -> tuple[torch.Tensor, float, float, torch.Tensor | None,
                                                  torch.Tensor | None]:
    """``(loss, L_C, L_I, ∂loss/∂x, ∂loss/∂C)`` of §D.3 without autograd (the gradients None unless
    ``need_grad``); the same numbers as ``island_terms`` and its autograd gradient.

    ``∂L_C/∂x_i = (x_i − c_{y_i})·s`` (s = 1/n for "mean") and ``∂L_C/∂c_j = −s·Σ_{y_i=j}(x_i − c_j)``;
    ``∂L_I/∂c_j = m·Σ_{k≠j}(u_k − cos_jk u_j)/|c_j|`` over the centres with a norm >= 1e-8 (m = 2 for ordered
    pairs), which needs only the sum of the unit centres and the row sums of the cosine matrix: one K x K matmul.
    """
    n, k = x.shape[0], centers.shape[0]
    xd, cd = x.detach(), centers.detach()
    diff = xd - cd.index_select(0, y)
    scale = 1.0 / n if params["center_reduction"] == "mean" and n else 1.0
    center_loss = 0.5 * float(torch.linalg.vector_norm(diff)) ** 2 * scale
    norm = torch.linalg.vector_norm(cd, dim=1)
    inv = torch.where(norm >= _MIN_NORM, norm, torch.inf).reciprocal_()  # a zero-norm centre: 0, so cos := 0
    unit = cd * inv[:, None]
    cos = unit @ unit.T
    row = cos.sum(1).sub_(cos.diagonal())  # Σ_{k≠j} cos_jk
    mult = 2.0 if params["pairs"] == "ordered" else 1.0
    island = mult * (0.5 * float(row.sum()) + k * (k - 1) / 2)
    w, lam = float(params["loss_weight"]), float(params["lambda1"])  # type: ignore[arg-type]
    loss = torch.tensor(w * (center_loss + lam * island), dtype=torch.float64, device=x.device)
    if not need_grad:
        return loss, center_loss, island, None, None
    gx = diff * (w * scale)
    gc = torch.zeros_like(cd).index_add_(0, y, diff, alpha=-w * scale)
    if k > 1 and lam:
        # (Σ_{k≠j} u_k − row_j·u_j)/|c_j|
        g_island = torch.addcmul(unit.sum(0)[None, :] - unit, row[:, None], unit, value=-1.0)
        gc.addcmul_(g_island, inv[:, None], value=w * lam * mult)
    return loss, center_loss, island, gx, gc


def paper_center_delta(x: torch.Tensor, y: torch.Tensor, centers: torch.Tensor, lambda1: float) -> torch.Tensor:
    """The paper's centre update direction Δc [K, d] (§D.1; the update is ``c ← c − α·Δc``):

    ``Δc_j = Σ_{y_i=j}(c_j − x_i)/(1 + n_j) + λ1/(K−1)·Σ_{k≠j}[c_k/(|c_k||c_j|) − (c_k·c_j)c_j/(|c_k||c_j|³)]``,
    with the island part absent for K = 1 and every term with a zero-norm centre (< 1e-8) taken as 0.
    """
    with torch.no_grad():
        k = centers.shape[0]
        counts = torch.bincount(y, minlength=k).to(centers.dtype)
        sum_x = torch.zeros_like(centers).index_add_(0, y, x.to(centers.dtype))
        delta = (counts[:, None] * centers - sum_x) / (1.0 + counts[:, None])
        if k > 1:
            unit, norm, ok = _unit_centers(centers)
            both = (ok[:, None] & ok[None, :] & ~torch.eye(k, dtype=torch.bool, device=centers.device))
            bothf = both.to(centers.dtype)
            cos = (unit @ unit.T) * bothf
            # Σ_{k≠j} [u_k − cos_jk u_j] / |c_j|  ==  the bracket above written with unit vectors.
            island = (bothf @ unit - cos.sum(1, keepdim=True) * unit) / norm[:, None]
            delta = delta + lambda1 / (k - 1) * island
        return delta


@register
class IslandLoss(Loss):
    """Island loss (§D.3), stateless (``centers`` input) or with session-held centres.

    ``center_update`` (session mode only): ``"paper"`` applies ``c ← c − center_alpha·Δc`` with the paper's Δc
    (``paper_center_delta``; α ∈ [0, 1] as in the center loss of Wen et al.), ``"sgd"`` applies
    ``c ← c − center_lr·∂loss/∂C`` (the centres are exposed as a ``torch.nn.Parameter``; when the session's own
    optimiser steps them, ``ctx.state_optimized_externally``, ``update`` leaves them alone and ``center_lr`` is
    unused), ``"none"`` keeps them fixed. Updates only happen in training calls (``ctx.training``).
    """

    name = "island"
    description = (
        "Island loss (Cai et al. 2018): loss_weight·(½Σ||x_i - c_{y_i}||² (/n for mean) + lambda1·Σ_{j<k}(cos(c_j,c_k)"
        " + 1) (x2 for ordered pairs)). Centres from the 'centers' input (stateless; gradients for embeddings and "
        "centers) or held by the session and updated after each step (paper α-rule, SGD, or none)."
    )
    inputs = (
        EMBEDDINGS,
        InputSpec("labels", "int", "[n]", True, False, "class of each row, in [0, K)"),
        InputSpec("centers", "float", "[K, d]", False, True,
                  "class centres for a stateless call (otherwise the session's centres are used)"),
    )
    schema = Schema((
        Param("lambda1", "float", 0.01, "weight of the island term (source alpha1)", minimum=0.0),
        Param("pairs", "enum", "unordered", "'unordered': Σ_{j<k} (source code); 'ordered': Σ_{j≠k} (paper)",
              choices=("unordered", "ordered")),
        Param("center_reduction", "enum", "mean", "'mean': center loss / n; 'sum': the paper",
              choices=("mean", "sum")),
        Param("loss_weight", "float", 1.0, "lambda multiplying the whole island loss", minimum=0.0),
        Param("center_update", "enum", "paper", "session centres after each step: 'paper' α-rule, 'sgd' "
              "c -= center_lr·dloss/dC, 'none'", choices=("paper", "sgd", "none")),
        Param("center_alpha", "float", 0.5, "α of the paper rule (center-loss convention, [0, 1])",
              minimum=0.0, maximum=1.0),
        Param("center_lr", "float", 0.5, "learning rate of center_update='sgd'", minimum=0.0),
        Param("num_classes", "int", None, "K; required to create session centres without initial_centers, "
              "otherwise inferred", minimum=1, nullable=True),
    ))
    stateful = True
    complexity = "n"

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        super().__init__(params)
        self._centers: torch.Tensor | None = None

    # ---- validation ---------------------------------------------------------------------------------------
    def _num_classes(self, inputs: Mapping[str, torch.Tensor]) -> int | None:
        if inputs.get("centers") is not None:
            return int(inputs["centers"].shape[0])
        if self._centers is not None:
            return int(self._centers.shape[0])
        return None

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        check_labels(inputs, inputs["embeddings"].shape[0])
        d = inputs["embeddings"].shape[1]
        c = inputs.get("centers")
        if c is not None:
            if c.dim() != 2 or c.shape[0] < 1 or c.shape[1] != d:
                raise invalid("inputs.centers", f"shape {list(c.shape)}, expected [K, {d}] with K >= 1 (one centre "
                              "per class, embedding width)")
            if self.params["num_classes"] is not None and c.shape[0] != self.params["num_classes"]:
                raise invalid("inputs.centers", f"{c.shape[0]} rows, expected params.num_classes = "
                              f"{self.params['num_classes']}")
            if c.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(c.detach())):  # NaN propagates
                raise invalid("inputs.centers", "every entry must be finite")
        elif self._centers is None:
            raise invalid("inputs.centers", "required: this loss holds no session centres (stateless call)")
        elif self._centers.shape[1] != d:
            raise invalid("inputs.embeddings", f"width {d}, expected {self._centers.shape[1]} (the session "
                          "centres' width)")
        k = self._num_classes(inputs)
        y = inputs["labels"]
        if y.numel() and any(_outside(y, k)):
            bad = y[(y < 0) | (y >= k)][0].item()  # type: ignore[operator]
            raise invalid("inputs.labels", f"label {bad} outside [0, {k}) (K = number of centres)")

    # ---- compute --------------------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        x, y = inputs["embeddings"], inputs["labels"]
        centers = inputs.get("centers")
        if centers is None:
            assert self._centers is not None, "check_inputs guarantees centres"
            # A Parameter (center_update="sgd") keeps its grad path through the dtype cast.
            centers = self._centers.to(dtype=x.dtype)
        need_grad = torch.is_grad_enabled() and (x.requires_grad or centers.requires_grad)
        value, center_loss, island, gx, gc = island_closed_form(x, y, centers, self.params, need_grad)
        per_item = None
        if ctx.want_per_item:
            per_item = 0.5 * (x.detach() - centers.detach()[y]).square().sum(1)
        return LossOutput(
            loss=with_gradients(value, [(x, gx), (centers, gc)]),
            per_item=per_item,
            stats={"center_loss": center_loss, "island_term": island, "num_classes": float(centers.shape[0])},
        )

    # ---- session state ---------------------------------------------------------------------------------------
    def state_bytes(self, dim: int) -> int:
        k = self.params["num_classes"] or 0  # without it the centres come (already allocated) from initial_state
        return 4 * 8 * k * dim  # float64 at most; gradient and two optimiser slots under center_update "sgd"

    def check_initial_state(self, initial: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(initial) - {"initial_centers"})
        if unknown:
            raise invalid(f"config.initial_state.{unknown[0]}", "not a state of island (expected initial_centers)")
        given = initial.get("initial_centers")
        if given is None:
            return
        field, k = "config.initial_state.initial_centers", self.params["num_classes"]
        if given.dim() != 2 or given.shape[0] < 1 or given.shape[1] < 1 or (k is not None and given.shape[0] != k):
            want = f"[{k}, d] (params.num_classes = {k} rows" if k is not None else "[K, d] (K >= 1 rows"
            raise invalid(field, f"shape {list(given.shape)}, expected {want}, one centre per class; d is the "
                          "embedding width after the head)")
        if not given.is_floating_point() or not bool(torch.isfinite(given).all()):
            raise invalid(field, "expected finite floating-point values")

    def init_state(self, dim: int, device: torch.device, generator: torch.Generator,
                   initial: Mapping[str, torch.Tensor]) -> None:
        self.check_initial_state(initial)
        k = self.params["num_classes"]
        given = initial.get("initial_centers")
        if given is not None:
            if given.shape[1] != dim:
                raise invalid("inputs.embeddings", f"width {dim} (after the head), expected {given.shape[1]} (the "
                              "width of the session's config.initial_state.initial_centers)")
            centers = given.detach().to(device=device).clone()
        else:
            if k is None:
                raise invalid("params.num_classes", "required to create the session centres (or give "
                              "initial_centers)")
            # N(0,1) as in every implementation; drawn on the generator's device for reproducibility.
            centers = torch.randn(k, dim, generator=generator, device=generator.device).to(device)
        self._set_centers(centers)

    def _set_centers(self, centers: torch.Tensor) -> None:
        if self.params["center_update"] == "sgd":
            self._centers = torch.nn.Parameter(centers.detach().clone())
        else:
            self._centers = centers.detach().clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self._centers is None else {"centers": self._centers}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        c = tensors.get("centers")
        if c is None or c.dim() != 2 or not c.is_floating_point():
            raise invalid("state.centers", "expected a float [K, d] tensor")
        if self.params["num_classes"] is not None and c.shape[0] != self.params["num_classes"]:
            raise invalid("state.centers", f"{c.shape[0]} rows, expected params.num_classes = "
                          f"{self.params['num_classes']}")
        self._set_centers(c)

    def update(self, inputs: dict[str, torch.Tensor], output: LossOutput, ctx: ComputeContext) -> None:
        if not ctx.training or self._centers is None or inputs.get("centers") is not None:
            return  # stateless calls own their centres; validation calls never move state
        mode = self.params["center_update"]
        c = self._centers
        x = inputs["embeddings"].detach().to(c.dtype)
        y = inputs["labels"]
        if mode == "paper":
            step = self.params["center_alpha"] * paper_center_delta(x, y, c.detach(), self.params["lambda1"])
        elif mode == "sgd" and not ctx.state_optimized_externally:
            # The centres are still those of the forward, so this is exactly ∂loss/∂C of the returned loss.
            leaf = c.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss, _, _ = island_terms(x, y, leaf, self.params)
                (grad,) = torch.autograd.grad(loss, leaf)
            step = self.params["center_lr"] * grad
        else:
            return
        with torch.no_grad():
            c.sub_(step)
