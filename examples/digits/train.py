"""Training code of the digits example: data split, class-balanced batches, the encoder, the two ways of computing
the loss (an embtrain server through ``RemoteLoss``, or the server's own loss classes in this process) and the
training loop that runs either one on the same batches.

The two runs of one configuration start from the same encoder weights, see the same batches in the same order and
take the same optimiser steps; the only difference is where the loss and its gradient with respect to the
embeddings are computed. Their per-step losses therefore agree to float32 rounding (see
``tests/test_demo_metrics.py``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .retrieval import retrieval_metrics

# ---- data ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Standardised features (train statistics) and labels of the fixed train/test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split(test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 samples, 10 classes; no download), split by sample and stratified by
    class, so every class is in both parts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6  # some border pixels are always 0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Split(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


def pk_batches(labels: torch.Tensor, classes_per_batch: int, samples_per_class: int, steps: int,
               seed: int) -> list[torch.Tensor]:
    """``steps`` class-balanced batches of row indices: P classes drawn without replacement, then K rows of each
    drawn without replacement (with replacement only for a class smaller than K). Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    by_class = {int(c): np.flatnonzero(y == c) for c in np.unique(y)}
    classes = np.array(sorted(by_class))
    if classes_per_batch > len(classes):
        raise ValueError(f"classes_per_batch: {classes_per_batch}, but the data has {len(classes)} classes")
    out = []
    for _ in range(steps):
        chosen = rng.choice(classes, classes_per_batch, replace=False)
        rows = [rng.choice(by_class[int(c)], samples_per_class, replace=len(by_class[int(c)]) < samples_per_class)
                for c in chosen]
        out.append(torch.from_numpy(np.concatenate(rows)))
    return out


# ---- model ---------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """A small MLP; ``normalize`` puts the embeddings on the unit sphere (for the distance/similarity losses)."""

    def __init__(self, in_dim: int = 64, hidden: int = 128, out_dim: int = 16, normalize: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return F.normalize(z, dim=1) if self.normalize else z


def embed(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    with torch.no_grad():
        return encoder(x)


# ---- losses --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """One loss of the demo. ``session``: train server-side state (island's centres) in a session."""

    loss: str
    params: Mapping[str, Any] = field(default_factory=dict)
    normalize: bool = True
    session: bool = False
    title: str = ""

    @property
    def label(self) -> str:
        return self.title or self.loss


DEFAULT_CONFIGS = (
    LossConfig("batch_hard_triplet", {"margin": 0.2}, title="batch_hard_triplet"),
    LossConfig("triplet_margin", {"miner": "semihard", "margin": 0.2}, title="triplet_margin (semihard)"),
    LossConfig("multi_similarity", {}, title="multi_similarity"),
    # Centres live in the session (paper α-rule after every step); unnormalised embeddings, as in the paper.
    LossConfig("island", {"lambda1": 10.0, "center_alpha": 0.5}, normalize=False, session=True,
               title="island (session)"),
)


class _ApplyGradient(torch.autograd.Function):
    """Forward: a precomputed loss value. Backward: grad_output times the precomputed d loss / d embeddings."""

    @staticmethod
    def forward(ctx: Any, embeddings: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


class InProcessLoss(nn.Module):
    """The server's loss class run in this process, used like ``RemoteLoss``: the forward computes the loss and
    its gradient with respect to the embeddings (as the server does: autograd on a detached leaf, or the loss's own
    gradients), and the backward applies that gradient. A stateful loss (island) keeps its state here and updates
    it after every training call, with the rule the server's session applies.
    """

    def __init__(self, loss: str, params: Mapping[str, Any] | None = None, *,
                 initial_state: Mapping[str, torch.Tensor] | None = None, max_triplets: int = 100_000) -> None:
        super().__init__()
        from embtrain_server import losses

        losses.load_all()
        self.impl = losses.get(loss)(dict(params or {}))
        self.initial_state = dict(initial_state or {})
        self.max_triplets = max_triplets
        self._ready = not self.impl.stateful

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from embtrain_server.losses import ComputeContext

        if not self._ready:  # like a session: state is created on the first batch, for its width
            self.impl.init_state(int(embeddings.shape[1]), torch.device("cpu"), torch.Generator().manual_seed(0),
                                 self.initial_state)
            self._ready = True
        leaf = embeddings.detach().requires_grad_(True)
        inputs = {"embeddings": leaf, "labels": labels.to(torch.int64)}
        ctx = ComputeContext(device=leaf.device, max_triplets=self.max_triplets, want_triplets=True)
        with torch.enable_grad():
            out = self.impl.forward(inputs, ctx)
            if out.gradients is not None:
                grad = out.gradients["embeddings"]
            else:
                (grad,) = torch.autograd.grad(out.loss, leaf)
        if self.impl.stateful:
            with torch.no_grad():
                self.impl.update({"embeddings": leaf.detach(), "labels": inputs["labels"]}, out, ctx)
        return _ApplyGradient.apply(embeddings, out.loss.detach().to(embeddings.dtype), grad.to(embeddings.dtype))


# ---- training ------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One training run. ``loss_seconds``: time inside the loss call (the remote round trip, or the in-process
    loss and its gradient); ``wall_seconds``: the run's training steps (encoder, loss, backward, optimiser)."""

    losses: list[float]
    wall_seconds: float
    loss_seconds: float
    encoder: nn.Module


def initial_encoder(normalize: bool, out_dim: int = 16, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(out_dim=out_dim, normalize=normalize)


def train_side_by_side(encoder: nn.Module, split: Split, batches: Sequence[torch.Tensor],
                       loss_fns: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], *,
                       lr: float = 1e-3, progress: str | None = None) -> dict[str, RunResult]:
    """Train one copy of ``encoder`` per loss function with Adam on ``batches`` of ``split``'s training rows.

    The runs take their steps in turn (step 1 of each, then step 2 of each, ...), so load from other processes
    slows them alike and their times stay comparable; each run's ``wall_seconds`` counts its own steps only.
    ``progress``: the description of a tqdm bar (None: no bar).
    """
    models = {k: copy.deepcopy(encoder) for k in loss_fns}
    opts = {k: torch.optim.Adam(m.parameters(), lr=lr) for k, m in models.items()}
    losses: dict[str, list[float]] = {k: [] for k in loss_fns}
    wall = dict.fromkeys(loss_fns, 0.0)
    in_loss = dict.fromkeys(loss_fns, 0.0)
    it: Any = batches
    if progress is not None:
        from tqdm import tqdm

        it = tqdm(batches, desc=progress, unit="step", leave=False, dynamic_ncols=True)
    for m in models.values():
        m.train()
    for idx in it:
        x, y = split.x_train[idx], split.y_train[idx]
        for k, loss_fn in loss_fns.items():
            t0 = time.perf_counter()
            z = models[k](x)
            t1 = time.perf_counter()
            loss = loss_fn(z, y)
            in_loss[k] += time.perf_counter() - t1
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            wall[k] += time.perf_counter() - t0
            losses[k].append(float(loss.detach()))
        if progress is not None:
            it.set_postfix({k: f"{v[-1]:.4f}" for k, v in losses.items()}, refresh=False)
    return {k: RunResult(losses[k], wall[k], in_loss[k], models[k]) for k in loss_fns}


def train(encoder: nn.Module, split: Split, batches: Sequence[torch.Tensor],
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, lr: float = 1e-3,
          progress: str | None = None) -> RunResult:
    """One run of ``train_side_by_side``."""
    return train_side_by_side(encoder, split, batches, {"run": loss_fn}, lr=lr, progress=progress)["run"]


def evaluate(encoder: nn.Module, split: Split) -> dict[str, float]:
    """Recall@1 and MAP@R of the test split's embeddings (leave-one-out within the test split)."""
    return retrieval_metrics(embed(encoder, split.x_test), split.y_test)


def island_centers(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """The island loss's initial centres, N(0, 1) as in the paper, given to both the session and the local loss."""
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))
