"""The compute device: which one the server uses, how much memory it has, and giving cached memory back after an
allocation failure."""

from __future__ import annotations

import os

import torch


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
