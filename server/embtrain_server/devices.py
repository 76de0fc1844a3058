"""The compute device: which one the server uses, how much memory it has, and what an allocation failure on it
becomes (RESOURCE_EXHAUSTED, with the cached memory given back)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .errors import ResourceExhausted, is_out_of_memory


def resolve(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device that exists. Raises ``ValueError``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} requested but CUDA is not available (use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def memory_total(device: torch.device) -> int:
    """The device's memory in bytes (CPU: physical RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def release_cached(device: torch.device) -> None:
    """After an out-of-memory failure: hand the caching allocator's free blocks back (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def out_of_memory(device: torch.device, field: str, what: str) -> Iterator[None]:
    """An allocation failure inside is RESOURCE_EXHAUSTED naming ``field`` (torch.OutOfMemoryError on CUDA, the CPU
    allocator's RuntimeError), after the cached memory is given back."""
    try:
        yield
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        release_cached(device)
        raise ResourceExhausted(f"{field}: {what}; send smaller batches", field=field) from None
