"""Session optimisers: sgd / adam / adamw with an optional learning-rate schedule and gradient-norm clipping,
validated from the wire spec once at session creation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import invalid
from .params import Param, Schema

OPTIMIZER_TYPES = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")

_SCHEMAS = {
    "sgd": Schema((
        Param("lr", "float", 0.01, minimum=0, exclusive_minimum=True),
        Param("momentum", "float", 0.0, minimum=0, maximum=1, exclusive_maximum=True),
        Param("nesterov", "bool", False),
        Param("weight_decay", "float", 0.0, minimum=0),
    )),
    "adam": Schema((
        Param("lr", "float", 1e-3, minimum=0, exclusive_minimum=True),
        Param("betas", "float_list", [0.9, 0.999], minimum=0, maximum=1, exclusive_maximum=True),
        Param("eps", "float", 1e-8, minimum=0, exclusive_minimum=True),
        Param("weight_decay", "float", 0.0, minimum=0),
    )),
}
_SCHEMAS["adamw"] = Schema(tuple(p if p.name != "weight_decay" else Param("weight_decay", "float", 0.01, minimum=0)
                                 for p in _SCHEMAS["adam"].params))
_COMMON = Schema((
    Param("type", "enum", "adam", choices=OPTIMIZER_TYPES),
    Param("schedule", "enum", "constant", choices=SCHEDULES),
    Param("warmup_steps", "int", 0, minimum=0),
    Param("step_size", "int", 1000, minimum=1, description="step schedule: decay every step_size steps"),
    Param("gamma", "float", 0.1, minimum=0, exclusive_minimum=True, maximum=1, description="step schedule factor"),
    Param("total_steps", "int", 10000, minimum=1, description="cosine schedule length"),
    Param("min_lr_ratio", "float", 0.0, minimum=0, maximum=1, description="cosine floor as a fraction of lr"),
    Param("clip_grad_norm", "float", 0.0, minimum=0, description="0: no clipping"),
))


@dataclass(frozen=True)
class OptimizerSpec:
    type: str
    hyper: dict[str, Any]
    schedule: str
    warmup_steps: int
    step_size: int
    gamma: float
    total_steps: int
    min_lr_ratio: float
    clip_grad_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.hyper, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                "step_size": self.step_size, "gamma": self.gamma, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio, "clip_grad_norm": self.clip_grad_norm}


def parse_spec(raw: Mapping[str, Any] | None, field: str = "optimizer") -> OptimizerSpec:
    raw = dict(raw or {})
    kind = _COMMON.params[0].parse(raw.get("type", "adam"), field)
    common_names = set(_COMMON.names())
    common = _COMMON.parse({k: v for k, v in raw.items() if k in common_names}, field)
    rest = {k: v for k, v in raw.items() if k not in common_names}
    schema = _SCHEMAS[kind]
    unknown = sorted(set(rest) - set(schema.names()))
    if unknown:
        raise invalid(f"{field}.{unknown[0]}", f"unknown parameter for {kind}; valid parameters are: "
                      f"{', '.join(schema.names() + _COMMON.names())}")
    hyper = schema.parse(rest, field)
    if kind != "sgd" and len(hyper["betas"]) != 2:
        raise invalid(f"{field}.betas", f"expected two numbers [beta1, beta2], got {hyper['betas']!r}")
    if kind == "sgd" and hyper["nesterov"] and hyper["momentum"] <= 0:
        raise invalid(f"{field}.nesterov", "nesterov needs momentum > 0")
    return OptimizerSpec(type=kind, hyper=hyper, **{k: common[k] for k in common if k != "type"})


def lr_factor(spec: OptimizerSpec, step: int) -> float:
    """Multiplier of the base learning rate for the update that follows ``step`` completed steps."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    s = step - spec.warmup_steps
    if spec.schedule == "step":
        return spec.gamma ** (s // spec.step_size)
    if spec.schedule == "cosine":
        t = min(s, spec.total_steps) / spec.total_steps
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build(spec: OptimizerSpec, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    h = spec.hyper
    if spec.type == "sgd":
        return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                               weight_decay=h["weight_decay"])
    cls = torch.optim.Adam if spec.type == "adam" else torch.optim.AdamW
    return cls(params, lr=h["lr"], betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"])


def apply_step(spec: OptimizerSpec, opt: torch.optim.Optimizer, grads: Sequence[tuple[torch.nn.Parameter, torch.Tensor | None]],
               step: int) -> None:
    """Set the gradients, clip, schedule the learning rate for this step and take one optimiser step."""
    for p, g in grads:
        p.grad = None if g is None else g.to(p.dtype)
    params = [p for p, g in grads if g is not None]
    if spec.clip_grad_norm > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
    for group in opt.param_groups:
        group["lr"] = spec.hyper["lr"] * lr_factor(spec, step)
    opt.step()
    for p, _ in grads:
        p.grad = None


def summary(spec: OptimizerSpec, opt: torch.optim.Optimizer | None, step: int) -> dict[str, Any]:
    """What GetSession reports: type, schedule, the learning rate of the next update, parameters and state."""
    factor = lr_factor(spec, step)
    out: dict[str, Any] = {"type": spec.type, "schedule": spec.schedule, "base_lr": spec.hyper["lr"],
                           "lr_factor": factor, "lr": spec.hyper["lr"] * factor, "steps": step}
    if spec.warmup_steps:
        out["warmup_steps"] = spec.warmup_steps
    if spec.clip_grad_norm:
        out["clip_grad_norm"] = spec.clip_grad_norm
    if opt is not None:
        params = [p for g in opt.param_groups for p in g["params"]]
        tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        out["parameters"] = sum(p.numel() for p in params)
        out["state_tensors"] = len(tensors)
        out["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    return out
