"""What the embtrain.pml tests share: the batch shape, a labelled batch and twin encoders to train alike."""

from __future__ import annotations

import copy

import torch

N_CLASSES, PER_CLASS, DIM, IN_DIM = 4, 4, 8, 12
CLASSIFIER = {"num_classes": N_CLASSES, "embedding_size": DIM}


def batch(seed: int = 0, dtype: torch.dtype = torch.float32, per_class: int = PER_CLASS
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """N_CLASSES classes of ``per_class`` rows each, DIM wide, each class nudged along its own axis."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_CLASSES).repeat_interleave(per_class)
    x = torch.randn(labels.shape[0], DIM, generator=g, dtype=dtype)
    return x + 0.5 * torch.nn.functional.one_hot(labels, DIM).to(dtype), labels


def twins(local: torch.nn.Module, served: torch.nn.Module, optimizer: type[torch.optim.Optimizer], lr: float,
          seed: int) -> tuple[list[tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]], torch.Generator,
                              torch.Tensor]:
    """One encoder (IN_DIM -> DIM) twice, each trained with its loss's parameters by its own optimiser: the
    in-process PML side and the served side, ``[(encoder, loss, optimizer)] * 2``; the input generator (``seed +
    1``) and the labels of a batch."""
    torch.manual_seed(seed)
    enc_local = torch.nn.Linear(IN_DIM, DIM)
    enc_served = copy.deepcopy(enc_local)
    sides = [(enc, loss, optimizer([*enc.parameters(), *loss.parameters()], lr=lr))
             for enc, loss in ((enc_local, local), (enc_served, served))]
    return sides, torch.Generator().manual_seed(seed + 1), torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
