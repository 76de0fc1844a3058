"""pytorch-metric-learning objects (distances, reducers, regularizers) -> the server's wire parameters.

An object is translated only when it is exactly one of PML's own classes (a subclass may change what it computes,
and its code cannot travel) and every setting that changes the numbers can be read back from it. Anything else is
refused with ``InvalidArgument`` naming the constructor argument, before anything is sent.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidArgument, invalid_argument

_DISTANCES = ("LpDistance", "CosineSimilarity", "DotProductSimilarity", "SNRDistance")
# Reducers that reduce to a scalar by themselves (what PerAnchorReducer and MultipleReducers may hold).
_PLAIN_REDUCERS = ("MeanReducer", "AvgNonZeroReducer", "SumReducer", "DivisorReducer", "ThresholdReducer",
                   "ClassWeightedReducer")
_REGULARIZERS = ("LpRegularizer", "ZeroMeanRegularizer", "CenterInvariantRegularizer", "RegularFaceRegularizer",
                 "SparseCentersRegularizer")


def _pml_class(obj: Any, package: str, allowed: tuple[str, ...], field: str, what: str) -> str:
    """The PML class name of ``obj`` when it is exactly one of ``allowed`` from ``pytorch_metric_learning.<package>``
    (its module is PML's own: a subclass defined elsewhere is refused)."""
    cls = type(obj)
    name = cls.__name__
    module = getattr(cls, "__module__", "") or ""
    if not module.startswith(f"pytorch_metric_learning.{package}"):
        raise invalid_argument(field, f"expected a pytorch_metric_learning.{package} object, got {module}.{name}: "
                               f"the remote loss can only use the {what} the server knows "
                               f"({', '.join(allowed)})")
    if name not in allowed:
        raise invalid_argument(field, f"{name} is not served remotely (served: {', '.join(allowed)})")
    if getattr(importlib.import_module(f"pytorch_metric_learning.{package}"), name, None) is not cls:
        raise invalid_argument(field, f"{module}.{name} is not PML's own {name}: only PML's classes are served")
    return name


def _number(value: Any) -> Any:
    """A plain JSON number from a Python or tensor scalar."""
    if hasattr(value, "item"):
        value = value.item()
    return value


def distance(obj: Any, field: str = "distance") -> tuple[str, dict[str, Any]]:
    name = _pml_class(obj, "distances", _DISTANCES, field, "distances")
    params: dict[str, Any] = {"p": _number(obj.p), "power": _number(obj.power)}
    if name != "CosineSimilarity":
        params["normalize_embeddings"] = bool(obj.normalize_embeddings)
    elif not obj.normalize_embeddings:
        raise invalid_argument(field, "CosineSimilarity with normalize_embeddings=False is not served")
    inverted = name in ("CosineSimilarity", "DotProductSimilarity")
    if bool(obj.is_inverted) != inverted:
        raise invalid_argument(field, f"{name} with is_inverted={obj.is_inverted} is not served")
    return name, params


def reducer(obj: Any, field: str = "reducer", plain_only: bool = False) -> tuple[str, dict[str, Any]]:
    allowed = _PLAIN_REDUCERS if plain_only else (*_PLAIN_REDUCERS, "PerAnchorReducer", "MultipleReducers",
                                                  "DoNothingReducer")
    name = _pml_class(obj, "reducers", allowed, field, "reducers")
    if name == "ThresholdReducer":
        return name, {"low": _number(obj.low), "high": _number(obj.high)}
    if name == "ClassWeightedReducer":
        weights = obj.weights
        weights = weights.detach().cpu().reshape(-1).tolist() if hasattr(weights, "detach") else \
            [float(w) for w in weights]
        return name, {"weights": weights}
    if name == "PerAnchorReducer":
        from pytorch_metric_learning.reducers.per_anchor_reducer import aggregation_func

        if obj.aggregation_func is not aggregation_func:
            raise invalid_argument(f"{field}.aggregation_func", "only PML's default aggregation_func is served (a "
                                   "function cannot travel to the server)")
        inner, inner_params = reducer(obj.reducer, f"{field}.reducer", plain_only=True)
        return name, {"reducer": inner, "reducer_params": inner_params}
    if name == "MultipleReducers":
        subs = {}
        for key, sub in obj.reducers.items():
            sub_name, sub_params = reducer(sub, f"{field}.reducers[{key!r}]", plain_only=True)
            subs[key] = {"reducer": sub_name, "reducer_params": sub_params}
        default, default_params = reducer(obj.default_reducer, f"{field}.default_reducer", plain_only=True)
        return name, {"reducers": subs, "default_reducer": default, "default_reducer_params": default_params}
    if name == "DoNothingReducer":
        # PML then returns its unreduced loss dictionary: the server sends it whole (per_item_losses, packed), and
        # the module rebuilds it (embtrain.pml._lossdict).
        return name, {"per_item": "dict"}
    return name, {}


def regularizer(obj: Any, field: str) -> tuple[str, dict[str, Any]]:
    name = _pml_class(obj, "regularizers", _REGULARIZERS, field, "regularizers")
    params: dict[str, Any] = {}
    if name == "LpRegularizer":
        params = {"p": _number(obj.p), "power": _number(obj.power)}
    elif name == "SparseCentersRegularizer":
        # PML keeps only the masks: the centres per class are the first block's size.
        mask = obj.same_class_mask
        per_class = int(mask[0].sum()) + 1
        params = {"num_classes": int(mask.shape[0]) // per_class, "centers_per_class": per_class}
    dist_name, dist_params = distance(obj.distance, f"{field}.distance")
    red_name, red_params = reducer(obj.reducer, f"{field}.reducer", plain_only=True)
    params.update(distance=dist_name, distance_params=dist_params, reducer=red_name, reducer_params=red_params)
    return name, params


def wire_params(kwargs: Mapping[str, Any], weight_regularizer: bool) -> dict[str, Any]:
    """A PML constructor's keyword arguments -> the ``pml.*`` loss's wire parameters. ``weight_init_func`` and
    ``collect_stats`` stay on the client (the weights are initialised here; statistics are not recorded)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("weight_init_func", "collect_stats"):
            continue
        if key == "distance":
            if value is not None:
                out["distance"], out["distance_params"] = distance(value)
        elif key == "reducer":
            if value is not None:
                out["reducer"], out["reducer_params"] = reducer(value)
        elif key in ("embedding_regularizer", "weight_regularizer"):
            if key == "weight_regularizer" and not weight_regularizer:
                raise invalid_argument(key, "this loss has no weights to regularise")
            if value is not None:
                out[key], out[f"{key}_params"] = regularizer(value, key)
        else:
            out[key] = _plain(value, key)
    return out


def _plain(value: Any, field: str) -> Any:
    """A constructor argument as JSON (numbers, booleans, strings, None)."""
    value = _number(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise invalid_argument(field, f"expected a number, boolean or string, got {type(value).__name__}")


__all__ = ["InvalidArgument", "distance", "reducer", "regularizer", "wire_params"]
