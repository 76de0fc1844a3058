"""Cross-batch memory (Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020): a ring buffer
of the last ``size`` rows of (embedding after the head, detached; label; id) on the session's device.

The losses see the filled rows oldest first (``view``), so a candidate index ``n + k`` is the k-th oldest row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import invalid
from .losses.base import Memory
from .params import Param, Schema

SCHEMA = Schema((
    Param("size", "int", 0, "rows kept; 0: no memory", minimum=0, maximum=10_000_000),
))

NO_ID = -1  # the id of a row whose batch carried no ``ids`` input


class MemoryBank:
    """The ring buffer. Storage is allocated on the first enqueue, in that batch's dtype (float64 embeddings
    without a head are kept in float64), so an unused memory costs nothing."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        if size < 1:
            raise invalid("config.memory.size", f"expected >= 1 for a memory, got {size}")
        self.size = size
        self.dim = dim
        self.device = device
        self.embeddings = torch.zeros((0, dim), device=device)
        self.labels = torch.zeros((0,), dtype=torch.int64, device=device)
        self.ids = torch.zeros((0,), dtype=torch.int64, device=device)
        self.ptr = 0  # next slot to write
        self.fill = 0

    def view(self) -> Memory:
        """The filled rows, oldest first."""
        if self.fill < self.size:
            idx = slice(0, self.fill)
            return Memory(self.embeddings[idx], self.labels[idx], self.ids[idx])
        if self.ptr == 0:
            return Memory(self.embeddings, self.labels, self.ids)
        order = torch.cat([torch.arange(self.ptr, self.size), torch.arange(0, self.ptr)]).to(self.device)
        return Memory(self.embeddings[order], self.labels[order], self.ids[order])

    def _allocate(self, dtype: torch.dtype) -> None:
        self.embeddings = torch.zeros((self.size, self.dim), device=self.device, dtype=dtype)
        self.labels = torch.full((self.size,), -1, dtype=torch.int64, device=self.device)
        self.ids = torch.full((self.size,), NO_ID, dtype=torch.int64, device=self.device)

    def reserve(self, dtype: torch.dtype) -> None:
        """Allocate the storage (in the first batch's dtype) before a step commits, so that enqueue cannot fail
        for want of memory."""
        if self.embeddings.shape[0] == 0:
            self._allocate(dtype)

    def position(self) -> tuple[int, int]:
        return self.ptr, self.fill

    def set_position(self, ptr: int, fill: int) -> None:
        self.ptr, self.fill = ptr, fill

    def enqueue(self, emb: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None) -> None:
        """Append a batch's rows (dropping the oldest beyond ``size``)."""
        n = emb.shape[0]
        if n == 0:
            return
        if self.embeddings.shape[0] == 0:
            self._allocate(emb.dtype)
        if ids is None:
            ids = torch.full((n,), NO_ID, dtype=torch.int64)
        if n >= self.size:  # only the last `size` rows survive; they fill the buffer in order
            emb, labels, ids = emb[-self.size:], labels[-self.size:], ids[-self.size:]
            n = self.size
        pos = ((torch.arange(n) + self.ptr) % self.size).to(self.device)
        self.embeddings[pos] = emb.detach().to(self.device, self.embeddings.dtype)
        self.labels[pos] = labels.to(self.device, torch.int64)
        self.ids[pos] = ids.to(self.device, torch.int64)
        self.ptr = (self.ptr + n) % self.size
        self.fill = min(self.size, self.fill + n)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"memory.embeddings": self.embeddings, "memory.labels": self.labels, "memory.ids": self.ids},
                {"ptr": self.ptr, "fill": self.fill})

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        emb, labels, ids = tensors["memory.embeddings"], tensors["memory.labels"], tensors["memory.ids"]
        rows = emb.shape[0]
        if rows not in (0, self.size) or emb.dim() != 2 or emb.shape[1] != self.dim or \
                labels.shape != (rows,) or ids.shape != (rows,):
            raise ValueError(f"memory tensors of shape {list(emb.shape)}, expected [{self.size}, {self.dim}]")
        ptr, fill = int(meta["ptr"]), int(meta["fill"])
        if not (0 <= ptr < self.size and 0 <= fill <= rows):
            raise ValueError(f"memory position ptr={ptr}, fill={fill} outside the buffer of {rows} rows")
        self.embeddings = emb.to(self.device).clone()
        self.labels = labels.to(self.device, torch.int64).clone()
        self.ids = ids.to(self.device, torch.int64).clone()
        self.ptr, self.fill = ptr, fill
