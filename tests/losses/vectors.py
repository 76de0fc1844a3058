"""Load the spec's test vectors (LOSSES.md §F) and run one through the compute layer (no server).

``run_vector(vec, dtype)`` builds the inputs, instantiates the loss named by ``vec["loss"]`` with the vector's
hyperparameters, validates and computes it with ``compute.run`` (see ``served``), and returns the loss (a list for
``reduction="none"``), the gradient w.r.t. the embeddings and the mined triplets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from served import serve

from embtrain_server.losses import get, load_all

VECTOR_DIR = Path(__file__).resolve().parents[1] / "data" / "vectors"
_FLOAT_INPUTS = {"embeddings", "gt_distances", "centers"}


def _decode(value: Any) -> Any:
    """JSON non-finite numbers are written as the strings "NaN" / "Infinity" / "-Infinity"."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def load_vector(name: str) -> dict[str, Any]:
    path = VECTOR_DIR / (name if name.endswith(".json") else name + ".json")
    return _decode(json.loads(path.read_text()))


def vector_names(prefixes: str) -> list[str]:
    """Names of the vectors whose file name starts with one of the characters/prefixes in ``prefixes``."""
    return sorted(p.stem for p in VECTOR_DIR.glob("*.json") if p.stem.startswith(tuple(prefixes)))


class VectorResult(NamedTuple):
    loss: float | list[float]
    grad: torch.Tensor
    triplets: list[list[int]]


def build_inputs(vec: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    for key, value in vec["inputs"].items():
        if key in _FLOAT_INPUTS:
            inputs[key] = torch.tensor(value, dtype=dtype)
        else:
            inputs[key] = torch.tensor(value, dtype=torch.int64)
            if key == "triplets" and inputs[key].numel() == 0:
                inputs[key] = inputs[key].reshape(0, 3)
    return inputs


def run_vector(vec: dict[str, Any], dtype: torch.dtype, max_triplets: int = 1 << 30,
               device: str = "cpu") -> VectorResult:
    load_all()
    loss_fn = get(vec["loss"])(vec["hyperparameters"])
    res = serve(loss_fn, build_inputs(vec, dtype), device=device, max_triplets=max_triplets, per_item=True)
    if vec["hyperparameters"].get("reduction") == "none":
        assert res.per_item is not None
        loss: float | list[float] = res.per_item.tolist()
    else:
        loss = res.loss
    triplets = res.triplets.tolist() if res.triplets is not None else []
    assert not (isinstance(loss, float) and math.isnan(loss))
    return VectorResult(loss, res.gradients["embeddings"], triplets)
