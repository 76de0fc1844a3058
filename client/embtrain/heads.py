"""Head modules: the small networks a session applies to the client's embeddings before the loss.

Defined in the SDK so that the server (which trains them) and ``embtrain.torch.load_head`` (which rebuilds an
exported head locally) build exactly the same module from the same configuration. Needs torch.

A head spec is a dict or a list of dicts, composed in order:
``identity``; ``linear`` (out_dim, bias=true); ``mlp`` (hidden=[...], activation=relu|gelu|tanh|silu,
dropout=0.0, out_dim, bias=true); ``l2_normalize`` (eps=1e-12).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
_KEYS = {
    "identity": set(),
    "linear": {"out_dim", "bias"},
    "mlp": {"hidden", "activation", "dropout", "out_dim", "bias"},
    "l2_normalize": {"eps"},
}


class HeadSpecError(ValueError):
    def __init__(self, field: str, expected: str) -> None:
        super().__init__(f"{field}: {expected}")
        self.field = field


class L2Normalize(nn.Module):
    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True).clamp_min(self.eps)


class SeededDropout(nn.Module):
    """Dropout drawing its mask from an explicit generator, so a session's training is reproducible and its
    random state can be checkpointed (``nn.Dropout`` draws from the global generator)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.rand(x.shape, generator=self.generator, dtype=torch.float32,
                           device="cpu" if self.generator is None else self.generator.device)
        mask = (noise.to(x.device) < keep).to(x.dtype)
        return x * mask / keep


def normalize_spec(spec: Any, field: str = "head") -> list[dict[str, Any]]:
    """Validate a head spec and fill its defaults. Raises ``HeadSpecError`` naming the field."""
    if spec is None:
        return []
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(spec, (list, tuple)) else field
        if isinstance(item, str):
            item = {"type": item}
        if not isinstance(item, Mapping):
            raise HeadSpecError(where, f"expected an object with a 'type', got {item!r}")
        kind = item.get("type")
        if kind not in _KEYS:
            raise HeadSpecError(f"{where}.type", f"expected one of {', '.join(_KEYS)}, got {kind!r}")
        unknown = sorted(set(item) - _KEYS[kind] - {"type"})
        if unknown:
            raise HeadSpecError(f"{where}.{unknown[0]}", f"unknown key for {kind}; valid keys: "
                                f"{', '.join(sorted(_KEYS[kind])) or '(none)'}")
        norm: dict[str, Any] = {"type": kind}
        if kind in ("linear", "mlp"):
            norm["out_dim"] = _int(item.get("out_dim"), f"{where}.out_dim")
            norm["bias"] = _bool(item.get("bias", True), f"{where}.bias")
        if kind == "mlp":
            hidden = item.get("hidden", [])
            if not isinstance(hidden, (list, tuple)):
                raise HeadSpecError(f"{where}.hidden", f"expected a list of layer widths, got {hidden!r}")
            norm["hidden"] = [_int(h, f"{where}.hidden[{j}]") for j, h in enumerate(hidden)]
            act = item.get("activation", "relu")
            if act not in _ACTIVATIONS:
                raise HeadSpecError(f"{where}.activation", f"expected one of {', '.join(_ACTIVATIONS)}, got {act!r}")
            norm["activation"] = act
            p = item.get("dropout", 0.0)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise HeadSpecError(f"{where}.dropout", f"expected a number in [0, 1), got {p!r}")
            norm["dropout"] = float(p)
        if kind == "l2_normalize":
            eps = item.get("eps", 1e-12)
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
                raise HeadSpecError(f"{where}.eps", f"expected a number > 0, got {eps!r}")
            norm["eps"] = float(eps)
        out.append(norm)
    return out


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 1 <= v <= 1_000_000:
        raise HeadSpecError(where, f"expected an integer in [1, 1000000], got {v!r}")
    return int(v)


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise HeadSpecError(where, f"expected a boolean, got {v!r}")
    return v


def build_head(spec: Sequence[Mapping[str, Any]], in_dim: int,
               generator: torch.Generator | None = None) -> tuple[nn.Sequential, int]:
    """Build the module for a normalised spec (see ``normalize_spec``). Returns (module, out_dim).

    With a ``generator``, every linear layer is initialised from it with torch's default distribution
    (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))), independently of the process-wide generator.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for item in spec:
        kind = item["type"]
        if kind == "linear":
            layers.append(nn.Linear(dim, item["out_dim"], bias=item["bias"]))
            dim = item["out_dim"]
        elif kind == "mlp":
            for width in item["hidden"]:
                layers.append(nn.Linear(dim, width, bias=item["bias"]))
                layers.append(_ACTIVATIONS[item["activation"]]())
                if item["dropout"] > 0:
                    layers.append(SeededDropout(item["dropout"]))
                dim = width
            layers.append(nn.Linear(dim, item["out_dim"], bias=item["bias"]))
            dim = item["out_dim"]
        elif kind == "l2_normalize":
            layers.append(L2Normalize(item["eps"]))
    head = nn.Sequential(*layers)
    if generator is not None:
        with torch.no_grad():
            for layer in head.modules():
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    if layer.bias is not None:
                        layer.bias.uniform_(-bound, bound, generator=generator)
    return head, dim


def set_generator(head: nn.Module, generator: torch.Generator | None) -> None:
    for m in head.modules():
        if isinstance(m, SeededDropout):
            m.generator = generator
