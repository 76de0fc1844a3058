"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): a ring buffer
of the last ``size`` rows of (embedding after the head, detached; label; id) on the session's device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .losses.base import Memory
from .params import Param, Schema

SCHEMA = Schema((
    Param("size", "int", 0, minimum=0, maximum=10_000_000, description="rows kept; 0: no memory"),
))


class MemoryBank:
    def __init__(self, size: int, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.size = size
        self.embeddings = torch.zeros((size, dim), device=device, dtype=dtype)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0  # next slot to write
        self.fill = 0

    def view(self) -> Memory:
        """The filled rows, oldest first."""
        if self.fill < self.size:
            idx = slice(0, self.fill)
            return Memory(self.embeddings[idx], self.labels[idx], self.ids[idx])
        order = torch.cat([torch.arange(self.ptr, self.size), torch.arange(0, self.ptr)]).to(self.embeddings.device)
        return Memory(self.embeddings[order], self.labels[order], self.ids[order])

    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None) -> None:
        n = emb.shape[0]
        if n == 0 or self.size == 0:
            return
        if ids is None:
            ids = torch.full((n,), -1, dtype=torch.int64)
        if n >= self.size:  # only the last `size` rows survive
            emb, labels, ids = emb[-self.size:], labels[-self.size:], ids[-self.size:]
            n = self.size
        pos = (torch.arange(n) + self.ptr) % self.size
        pos = pos.to(self.embeddings.device)
        self.embeddings[pos] = emb.detach().to(self.embeddings.dtype)
        self.labels[pos] = labels.to(self.labels.device)
        self.ids[pos] = ids.to(self.ids.device)
        self.ptr = (self.ptr + n) % self.size
        self.fill = min(self.size, self.fill + n)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"memory.embeddings": self.embeddings, "memory.labels": self.labels, "memory.ids": self.ids},
                {"ptr": self.ptr, "fill": self.fill})

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.embeddings.copy_(tensors["memory.embeddings"])
        self.labels.copy_(tensors["memory.labels"])
        self.ids.copy_(tensors["memory.ids"])
        self.ptr = int(meta["ptr"])
        self.fill = int(meta["fill"])
