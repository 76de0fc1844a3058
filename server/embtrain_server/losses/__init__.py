"""The loss catalog. Every module in this package registers its losses on import, so adding a loss is adding
one file here; ``load_all`` imports them all once."""

from __future__ import annotations

import importlib
import pkgutil

from .base import ComputeContext, InputSpec, Loss, LossOutput, Memory, all_losses, get, names, register

_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


__all__ = ["ComputeContext", "InputSpec", "Loss", "LossOutput", "Memory", "all_losses", "get", "load_all", "names",
           "register"]
