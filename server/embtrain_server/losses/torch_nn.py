"""The ``torch.nn`` loss classes, served as ``torch.<ClassName>``.

One declarative table (``_TABLE``) describes the 21 classes: the forward inputs in torch's argument order and
with torch's argument names, which of them are differentiable, the constructor arguments as a parameter schema
(torch's defaults, with the ranges torch enforces or needs), and the shape checks that turn a would-be torch
error into an ``INVALID_ARGUMENT`` naming ``inputs.<name>``. One registered ``Loss`` subclass is generated per
row. ``forward`` builds the torch module from the validated parameters and calls it on the inputs, so the
numbers are torch's own.

Conventions:

* Tensor constructor arguments (``weight``, ``pos_weight``) are optional, non-differentiable input tensors.
* ``size_average`` / ``reduce`` are refused with a message that points to ``reduction``.
* ``reduction="none"``: the scalar ``loss`` is the sum of the elementwise output, so the returned gradient is
  ``d(sum)/d input``; the elementwise output is returned flattened as ``per_item``.
* Differentiable inputs are the float inputs torch differentiates, except targets that are ±1 signs or class
  labels (MarginRanking, HingeEmbedding, SoftMargin, CosineEmbedding): torch either refuses a gradient for them
  or gives one that means nothing. Regression and probability targets (MSE, KLDiv, BCE, ...) are differentiable.
* ``CrossEntropyLoss`` takes class-index targets (int); the probability-target form would need a float target
  and the wire declares one dtype per input.
* The service never answers NaN or Inf, so inputs on which torch would are refused: empty inputs,
  every target ignored or weighted 0, a CTC target too long for its input without ``zero_infinity``, a zero
  rate or variance with ``eps`` 0.
* Shapes must match exactly where torch would broadcast with a warning (MSE, L1, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument, invalid, is_out_of_memory
from ..params import Param, Schema
from .base import ComputeContext, InputSpec, Loss, LossOutput, register

Tensors = Mapping[str, torch.Tensor]
Check = Callable[[Tensors, Mapping[str, Any]], None]

# Constructor arguments that are tensors: they arrive as optional inputs and go to the constructor.
_CTOR_TENSORS = ("weight", "pos_weight")
_DEPRECATED_WHY = "deprecated in torch; use params.reduction ('none', 'mean' or 'sum')"


# ---- inputs and parameters --------------------------------------------------------------------------------

def _float(name: str, shape: str, differentiable: bool = True, description: str = "") -> InputSpec:
    return InputSpec(name, "float", shape, True, differentiable, description)


def _int(name: str, shape: str, description: str = "") -> InputSpec:
    return InputSpec(name, "int", shape, True, False, description)


def _weight(name: str, shape: str, description: str) -> InputSpec:
    return InputSpec(name, "float", shape, False, False, description)


def _reduction(*extra: str) -> Param:
    return Param("reduction", "enum", "mean", "how the elementwise losses are combined; 'none' returns them as "
                 "per-item losses and differentiates their sum", choices=("none", "mean", "sum", *extra))


def _margin(default: float, description: str = "margin") -> Param:
    return Param("margin", "float", default, description)


_SIGNS = "1 or -1"


# ---- shape and value checks (each raises InvalidArgument naming the input) --------------------------------

def _shape(t: torch.Tensor | torch.Size) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, torch.Tensor) else t)) + "]"


def _same_shape(*names: str) -> Check:
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        first = x[names[0]]
        for name in names[1:]:
            if x[name].shape != first.shape:
                raise invalid(f"inputs.{name}", f"shape {_shape(x[name])}, expected {_shape(first)} "
                                                f"(the shape of inputs.{names[0]})")
    return check


def _ndim(name: str, *allowed: int) -> Check:
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        if x[name].dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise invalid(f"inputs.{name}", f"{x[name].dim()}-D with shape {_shape(x[name])}, expected {want}")
    return check


def _values_in(name: str, lo: float | None, hi: float | None, what: str) -> Check:
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        t = x[name]
        bad = torch.zeros_like(t, dtype=torch.bool)
        if lo is not None:
            bad |= t < lo
        if hi is not None:
            bad |= t > hi
        if bool(bad.any()):
            raise invalid(f"inputs.{name}", f"value {t[bad].flatten()[0].item()!r} out of range; {what}")
    return check


def _signs(name: str) -> Check:
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        t = x[name]
        bad = (t != 1) & (t != -1)
        if bool(bad.any()):
            raise invalid(f"inputs.{name}", f"value {t[bad].flatten()[0].item()!r}; expected {_SIGNS}")
    return check


def _positive(name: str, why: str) -> Check:
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        if bool((x[name] <= 0).any()):
            raise invalid(f"inputs.{name}", f"entries must be > 0 ({why} would be infinite)")
    return check


def _when(param: str, value: Any, check: Check) -> Check:
    def guarded(x: Tensors, p: Mapping[str, Any]) -> None:
        if p[param] == value:
            check(x, p)
    return guarded


def _broadcasts_to(name: str, target: str) -> Check:
    """An optional tensor that torch broadcasts against ``target`` (BCE weights)."""
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        if name not in x:
            return
        try:
            ok = torch.broadcast_shapes(x[name].shape, x[target].shape) == x[target].shape
        except RuntimeError:
            ok = False
        if not ok:
            raise invalid(f"inputs.{name}", f"shape {_shape(x[name])} does not broadcast to the shape "
                                            f"{_shape(x[target])} of inputs.{target}")
    return check


def _class_dim(t: torch.Tensor) -> int:
    return 0 if t.dim() == 1 else 1


def _class_weight(name: str = "weight", scores: str = "input") -> Check:
    """An optional per-class weight: 1-D with one entry per class."""
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        if name not in x:
            return
        n_classes = x[scores].shape[_class_dim(x[scores])]
        if x[name].shape != (n_classes,):
            raise invalid(f"inputs.{name}", f"shape {_shape(x[name])}, expected [{n_classes}] "
                                            f"(one weight per class of inputs.{scores})")
    return check


def _class_targets(spatial: bool, ignore: bool) -> Check:
    """``input`` holds class scores ``[C]``, ``[N, C]`` (or ``[N, C, d1, ...]``), ``target`` class indices."""
    def check(x: Tensors, p: Mapping[str, Any]) -> None:
        scores, target = x["input"], x["target"]
        if scores.dim() < 1 or (not spatial and scores.dim() > 2):
            raise invalid("inputs.input", f"{scores.dim()}-D, expected [C] or [N, C]"
                                          + (" or [N, C, d1, ...]" if spatial else ""))
        cdim = _class_dim(scores)
        want = scores.shape[:cdim] + scores.shape[cdim + 1:]
        if target.shape != want:
            raise invalid("inputs.target", f"shape {_shape(target)}, expected "
                                           f"[{', '.join(map(str, want))}] (inputs.input without its class dimension)")
        n_classes = scores.shape[cdim]
        valid = (target >= 0) & (target < n_classes)
        if ignore:
            valid |= target == p["ignore_index"]
        if not bool(valid.all()):
            bad = target[~valid].flatten()[0].item()
            extra = f" or params.ignore_index ({p['ignore_index']})" if ignore else ""
            raise invalid("inputs.target", f"class index {bad} out of range; expected 0 <= index < {n_classes}{extra}")
        if p["reduction"] == "mean":
            # torch divides by the total weight of the counted targets; 0 of it would be a NaN loss.
            counted = target != p["ignore_index"] if ignore else torch.ones_like(target, dtype=torch.bool)
            if not bool(counted.any()):
                raise invalid("inputs.target", "every entry equals params.ignore_index: the mean over no elements "
                                               "is undefined (use reduction 'sum' or send a counted target)")
            if "weight" in x and float(x["weight"][target[counted]].sum()) == 0.0:
                raise invalid("inputs.weight", "the counted targets have total weight 0: the weighted mean is "
                                               "undefined (use reduction 'sum')")
    return check


def _multilabel_margin(x: Tensors, p: Mapping[str, Any]) -> None:
    n_classes = x["input"].shape[-1]
    bad = (x["target"] < -1) | (x["target"] >= n_classes)
    if bool(bad.any()):
        raise invalid("inputs.target", f"value {x['target'][bad].flatten()[0].item()} out of range; expected class "
                                       f"indices in [0, {n_classes}) padded with -1")


def _pairs_of_vectors(x: Tensors, p: Mapping[str, Any]) -> None:
    """CosineEmbedding: ``input1``/``input2`` are ``[N, D]`` (or ``[D]``), ``target`` has one sign per row."""
    a = x["input1"]
    want = a.shape[:1] if a.dim() == 2 else torch.Size([])
    if x["target"].shape != want:
        raise invalid("inputs.target", f"shape {_shape(x['target'])}, expected [{', '.join(map(str, want))}] "
                                       "(one entry per row of inputs.input1)")


def _gaussian_var(x: Tensors, p: Mapping[str, Any]) -> None:
    """torch's rule: the input's shape, the input's shape without its last dimension, or the input's shape with
    exactly one dimension replaced by 1 (one variance shared along it)."""
    inp, var = x["input"], x["var"]
    one_broadcast_dim = var.dim() == inp.dim() and sum(v for i, v in zip(inp.shape, var.shape) if i != v) == 1
    if not (var.shape == inp.shape or var.shape == inp.shape[:-1] or one_broadcast_dim):
        raise invalid("inputs.var", f"shape {_shape(var)}; expected {_shape(inp)} (one variance per element), "
                                    f"{_shape(inp.shape[:-1])} (one per row) or {_shape(inp)} with one dimension "
                                    "replaced by 1")
    if bool((var < 0).any()):
        raise invalid("inputs.var", "negative entries; variances must be >= 0")


def _ctc(x: Tensors, p: Mapping[str, Any]) -> None:
    lp, targets, in_len, tgt_len = x["log_probs"], x["targets"], x["input_lengths"], x["target_lengths"]
    if lp.dim() not in (2, 3):
        raise invalid("inputs.log_probs", f"{lp.dim()}-D, expected [T, N, C] (or [T, C] unbatched)")
    t_max, n_classes = lp.shape[0], lp.shape[-1]
    batch = lp.shape[1] if lp.dim() == 3 else None
    if p["blank"] >= n_classes:
        raise invalid("params.blank", f"{p['blank']}, expected < {n_classes} (the classes of inputs.log_probs)")
    for name, t in (("input_lengths", in_len), ("target_lengths", tgt_len)):
        want = (batch,) if batch is not None else None
        if (want is not None and t.shape != want) or (want is None and t.numel() != 1):
            raise invalid(f"inputs.{name}", f"shape {_shape(t)}, expected [{batch if batch is not None else 1}] "
                                            "(one length per sequence)")
    if bool(((in_len < 0) | (in_len > t_max)).any()):
        raise invalid("inputs.input_lengths", f"lengths must lie in [0, {t_max}] (T of inputs.log_probs)")
    if bool((tgt_len < 0).any()):
        raise invalid("inputs.target_lengths", "lengths must be >= 0")
    if batch is not None and targets.dim() == 2:
        if targets.shape[0] != batch:
            raise invalid("inputs.targets", f"{targets.shape[0]} rows, expected {batch} (N of inputs.log_probs)")
        if bool((tgt_len > targets.shape[1]).any()):
            raise invalid("inputs.target_lengths", f"a length exceeds the {targets.shape[1]} columns of inputs.targets")
        used = torch.arange(targets.shape[1], device=targets.device).unsqueeze(0) < tgt_len.unsqueeze(1)
        labels = targets[used]
    elif targets.dim() == 1:
        total = int(tgt_len.sum())
        # Batched 1-D targets are the concatenation of all sequences; an unbatched one may be padded.
        if (batch is not None and targets.shape[0] != total) or (batch is None and targets.shape[0] < total):
            raise invalid("inputs.targets", f"length {targets.shape[0]}, expected {total} (the sum of "
                                            "inputs.target_lengths)")
        labels = targets[:total]
    else:
        raise invalid("inputs.targets", f"{targets.dim()}-D, expected [N, S] (padded) or [sum(target_lengths)]")
    bad = (labels < 0) | (labels >= n_classes) | (labels == p["blank"])
    if bool(bad.any()):
        raise invalid("inputs.targets", f"label {labels[bad][0].item()}; expected 0 <= label < {n_classes} and "
                                        f"!= params.blank ({p['blank']})")
    if not p["zero_infinity"]:
        # An alignment needs one frame per label plus a blank between equal neighbours; with fewer frames the
        # loss is +inf (torch's zero_infinity turns that into 0).
        lengths = tgt_len.reshape(-1)
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=labels.device), lengths)
        repeat = (labels[1:] == labels[:-1]) & (seq[1:] == seq[:-1])
        needed = lengths.clone().index_add_(0, seq[1:][repeat], torch.ones_like(seq[1:][repeat]))
        short = in_len.reshape(-1) < needed
        if bool(short.any()):
            i = int(torch.nonzero(short)[0])
            raise invalid("inputs.input_lengths", f"sequence {i} has {int(in_len.reshape(-1)[i])} frames but its "
                                                  f"target needs at least {int(needed[i])}: the loss would be "
                                                  "infinite (shorten the target or set params.zero_infinity)")


# ---- TripletMarginWithDistanceLoss: the distance functions of LOSSES.md §C ------------------------------

def _squared_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # From differences (LOSSES.md §0.6): exact 0 and a zero gradient at duplicates.
    return (a - b).pow(2).sum(-1)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


# pairwise_distance is torch's default distance_function (F.pairwise_distance, p=2, eps=1e-6).
_DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "pairwise_distance": F.pairwise_distance,
    "squared_euclidean": _squared_euclidean,
    "cosine": _cosine_distance,
}


def _with_distance(params: Mapping[str, Any]) -> dict[str, Any]:
    return {**params, "distance_function": _DISTANCES[params["distance_function"]]}


# ---- the table --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Row:
    """One served torch class: its inputs (forward arguments first, then tensor constructor arguments), its
    constructor parameters, its input checks, and an optional map from validated params to constructor kwargs."""

    cls: type[torch.nn.Module]
    description: str
    inputs: tuple[InputSpec, ...]
    params: tuple[Param, ...]
    checks: tuple[Check, ...] = ()
    constructor_kwargs: Callable[[Mapping[str, Any]], dict[str, Any]] = dict


_ANY = "[*]"
_ELEMENTWISE = (_float("input", _ANY), _float("target", _ANY, description="same shape as input"))

_TABLE: tuple[_Row, ...] = (
    _Row(torch.nn.L1Loss, "mean absolute error |input - target|", _ELEMENTWISE, (_reduction(),),
         (_same_shape("input", "target"),)),
    _Row(torch.nn.MSELoss, "mean squared error (input - target)^2", _ELEMENTWISE, (_reduction(),),
         (_same_shape("input", "target"),)),
    _Row(torch.nn.CrossEntropyLoss, "softmax cross-entropy of unnormalised class scores against class indices",
         (_float("input", "[N, C] | [C] | [N, C, d1, ...]", description="unnormalised class scores"),
          _int("target", "[N] | [] | [N, d1, ...]", "class index per sample (or params.ignore_index)"),
          _weight("weight", "[C]", "rescaling weight per class")),
         (Param("ignore_index", "int", -100, "target value that is ignored and does not count in the mean"),
          _reduction(),
          Param("label_smoothing", "float", 0.0, "mix the one-hot target with the uniform distribution",
                minimum=0.0, maximum=1.0)),
         (_class_targets(spatial=True, ignore=True), _class_weight())),
    _Row(torch.nn.CTCLoss, "connectionist temporal classification loss",
         (_float("log_probs", "[T, N, C] | [T, C]", description="log-softmax outputs over time"),
          _int("targets", "[N, S] | [sum(target_lengths)]", "target sequences, padded or concatenated"),
          _int("input_lengths", "[N]", "length of each input sequence (<= T)"),
          _int("target_lengths", "[N]", "length of each target sequence")),
         (Param("blank", "int", 0, "index of the blank label", minimum=0), _reduction(),
          Param("zero_infinity", "bool", False,
                "zero infinite losses (inputs too short to align) and their gradients")),
         (_ctc,)),
    _Row(torch.nn.NLLLoss, "negative log-likelihood of log-probabilities against class indices",
         (_float("input", "[N, C] | [C] | [N, C, d1, ...]", description="log-probabilities per class"),
          _int("target", "[N] | [] | [N, d1, ...]", "class index per sample (or params.ignore_index)"),
          _weight("weight", "[C]", "rescaling weight per class")),
         (Param("ignore_index", "int", -100, "target value that is ignored and does not count in the mean"),
          _reduction()),
         (_class_targets(spatial=True, ignore=True), _class_weight())),
    _Row(torch.nn.PoissonNLLLoss, "negative log-likelihood of a Poisson target",
         (_float("log_input", _ANY, description="the rate's log (params.log_input) or the rate itself"),
          _float("target", _ANY, description="observed counts; same shape as log_input")),
         (Param("log_input", "bool", True, "the input is log(rate): loss exp(input) - target*input"),
          Param("full", "bool", False, "add the Stirling approximation term"),
          Param("eps", "float", 1e-8, "added to the rate inside the log when log_input is false", minimum=0.0),
          _reduction()),
         (_same_shape("log_input", "target"),
          _when("log_input", False, _values_in("log_input", 0.0, None, "a rate must be >= 0 when params.log_input "
                                                                        "is false")),
          _when("log_input", False, _when("eps", 0.0, _positive("log_input", "log(rate) with params.eps 0"))),
          _when("full", True, _values_in("target", 0.0, None, "counts must be >= 0 when params.full is true")))),
    _Row(torch.nn.GaussianNLLLoss, "negative log-likelihood of a Gaussian with predicted mean and variance",
         (_float("input", _ANY, description="predicted mean"),
          _float("target", _ANY, description="observation; same shape as input"),
          _float("var", "[*] | [*][:-1] | one dimension 1", description="predicted variance (>= 0)")),
         (Param("full", "bool", False, "add the constant 0.5*log(2*pi)"),
          Param("eps", "float", 1e-6, "variances are clamped to at least eps", minimum=0.0),
          _reduction()),
         (_same_shape("input", "target"), _gaussian_var, _when("eps", 0.0, _positive("var", "log(var) with "
                                                                                            "params.eps 0")))),
    _Row(torch.nn.KLDivLoss, "Kullback-Leibler divergence of target from the log-probabilities input",
         (_float("input", _ANY, description="log-probabilities"),
          _float("target", _ANY, description="probabilities (log-probabilities with params.log_target)")),
         (_reduction("batchmean"),
          Param("log_target", "bool", False, "the target is given as log-probabilities")),
         (_same_shape("input", "target"),
          _when("log_target", False, _values_in("target", 0.0, None, "probabilities must be >= 0")))),
    _Row(torch.nn.BCELoss, "binary cross-entropy of probabilities",
         (_float("input", _ANY, description="probabilities in [0, 1]"),
          _float("target", _ANY, description="target probabilities; same shape as input"),
          _weight("weight", "broadcastable to input", "rescaling weight per element")),
         (_reduction(),),
         (_same_shape("input", "target"), _values_in("input", 0.0, 1.0, "probabilities must lie in [0, 1]"),
          _broadcasts_to("weight", "input"))),
    _Row(torch.nn.BCEWithLogitsLoss, "binary cross-entropy of logits (sigmoid folded in, numerically stable)",
         (_float("input", _ANY, description="logits"),
          _float("target", _ANY, description="target probabilities; same shape as input"),
          _weight("weight", "broadcastable to input", "rescaling weight per element"),
          _weight("pos_weight", "broadcastable to input, e.g. [C]", "weight of positive examples per class")),
         (_reduction(),),
         (_same_shape("input", "target"), _broadcasts_to("weight", "input"), _broadcasts_to("pos_weight", "input"))),
    _Row(torch.nn.MarginRankingLoss, "[-target*(input1 - input2) + margin]_+",
         (_float("input1", _ANY), _float("input2", _ANY, description="same shape as input1"),
          _float("target", _ANY, False, f"{_SIGNS}: whether input1 should rank higher")),
         (_margin(0.0), _reduction()),
         (_same_shape("input1", "input2", "target"), _signs("target"))),
    _Row(torch.nn.HingeEmbeddingLoss, "input where target = 1, [margin - input]_+ where target = -1",
         (_float("input", _ANY, description="typically a distance"),
          _float("target", _ANY, False, f"{_SIGNS}; same shape as input")),
         (_margin(1.0), _reduction()),
         (_same_shape("input", "target"), _signs("target"))),
    _Row(torch.nn.MultiLabelMarginLoss, "multi-class multi-label hinge loss",
         (_float("input", "[N, C] | [C]"),
          _int("target", "[N, C] | [C]", "target class indices, padded with -1 after the last one")),
         (_reduction(),),
         (_ndim("input", 1, 2), _same_shape("input", "target"), _multilabel_margin)),
    _Row(torch.nn.HuberLoss, "Huber loss: quadratic below delta, linear above",
         _ELEMENTWISE,
         (_reduction(), Param("delta", "float", 1.0, "switch point", minimum=0.0, exclusive_minimum=True)),
         (_same_shape("input", "target"),)),
    _Row(torch.nn.SmoothL1Loss, "smooth L1: quadratic below beta (divided by beta), linear above",
         _ELEMENTWISE, (_reduction(), Param("beta", "float", 1.0, "switch point (0 gives L1)", minimum=0.0)),
         (_same_shape("input", "target"),)),
    _Row(torch.nn.SoftMarginLoss, "log(1 + exp(-target*input))",
         (_float("input", _ANY), _float("target", _ANY, False, f"{_SIGNS}; same shape as input")),
         (_reduction(),),
         (_same_shape("input", "target"), _signs("target"))),
    _Row(torch.nn.MultiLabelSoftMarginLoss, "one-versus-all logistic loss averaged over the classes",
         (_float("input", "[N, C] | [C]", description="logits"),
          _float("target", "[N, C] | [C]", description="multi-hot (or soft) targets"),
          _weight("weight", "[C]", "rescaling weight per class")),
         (_reduction(),),
         (_ndim("input", 1, 2), _same_shape("input", "target"), _broadcasts_to("weight", "input"))),
    _Row(torch.nn.CosineEmbeddingLoss, "1 - cos(input1, input2) where target = 1, [cos - margin]_+ where -1",
         (_float("input1", "[N, D] | [D]"), _float("input2", "[N, D] | [D]", description="same shape as input1"),
          _float("target", "[N] | []", False, f"{_SIGNS} per row")),
         (_margin(0.0, "margin for dissimilar pairs (-1 to 1; 0 to 0.5 suggested)"), _reduction()),
         (_ndim("input1", 1, 2), _same_shape("input1", "input2"), _pairs_of_vectors, _signs("target"))),
    _Row(torch.nn.MultiMarginLoss, "multi-class hinge loss",
         (_float("input", "[N, C] | [C]", description="class scores"),
          _int("target", "[N] | []", "class index per sample"),
          _weight("weight", "[C]", "rescaling weight per class")),
         (Param("p", "int", 1, "exponent of the hinge (1 or 2)", minimum=1, maximum=2), _margin(1.0), _reduction()),
         (_class_targets(spatial=False, ignore=False), _class_weight())),
    _Row(torch.nn.TripletMarginLoss, "[margin + d(a, p) - d(a, n)]_+ with the p-norm distance (LOSSES.md §C)",
         (_float("anchor", "[N, D] | [D]"), _float("positive", "[N, D] | [D]"), _float("negative", "[N, D] | [D]")),
         (_margin(1.0, "margin (> 0)"),
          Param("p", "float", 2.0, "norm degree of the pairwise distance", minimum=0.0, exclusive_minimum=True),
          Param("eps", "float", 1e-6, "added to the difference before the norm", minimum=0.0),
          Param("swap", "bool", False, "distance swap (Balntas et al. 2016)"),
          _reduction()),
         (_ndim("anchor", 1, 2), _same_shape("anchor", "positive", "negative"))),
    _Row(torch.nn.TripletMarginWithDistanceLoss, "[margin + d(a, p) - d(a, n)]_+ with a named distance (§C)",
         (_float("anchor", "[N, D] | [D]"), _float("positive", "[N, D] | [D]"), _float("negative", "[N, D] | [D]")),
         (Param("distance_function", "enum", "pairwise_distance",
                "pairwise_distance (torch's default, p=2, eps=1e-6), squared_euclidean, cosine (1 - cos)",
                choices=tuple(_DISTANCES)),
          _margin(1.0, "margin (> 0)"),
          Param("swap", "bool", False, "distance swap (Balntas et al. 2016)"),
          _reduction()),
         (_ndim("anchor", 1, 2), _same_shape("anchor", "positive", "negative")),
         _with_distance),
)

# torch requires a positive triplet margin; the schema says so up front.
_POSITIVE_MARGIN = {"TripletMarginLoss", "TripletMarginWithDistanceLoss"}


def _deprecated(cls: type[torch.nn.Module]) -> dict[str, str]:
    """``size_average``/``reduce`` where torch's constructor still takes them."""
    accepted = inspect.signature(cls.__init__).parameters
    return {name: _DEPRECATED_WHY for name in ("size_average", "reduce") if name in accepted}


class _TorchLoss(Loss):
    """Base of the generated classes: validation from the row's checks, forward through the torch module."""

    family = "torch"
    complexity = "n"
    _row: ClassVar[_Row]

    def footprint(self, inputs: Mapping[str, torch.Tensor]) -> tuple[int, float] | None:
        """Elementwise losses: a handful of input-sized temporaries; CTC adds its forward and backward tables of
        N x T x (2S + 1) entries (S the longest target)."""
        elements = sum(t.numel() for t in inputs.values())
        nbytes, ops = 8 * 8 * elements, 20.0 * elements
        if self._row.cls is torch.nn.CTCLoss and "log_probs" in inputs and "target_lengths" in inputs:
            lp, targets, lengths = inputs["log_probs"], inputs.get("targets"), inputs["target_lengths"]
            t_len = lp.shape[0]
            batch = lp.shape[1] if lp.dim() == 3 else 1
            longest = int(targets.shape[1]) if targets is not None and targets.dim() == 2 else \
                int(lengths.max()) if lengths.numel() else 0
            table = batch * t_len * (2 * longest + 1)
            nbytes += 3 * 8 * table
            ops += 30.0 * table
        return nbytes, ops

    def check_params(self) -> None:
        if self._row.cls.__name__ in _POSITIVE_MARGIN and self.params["margin"] <= 0:
            raise invalid("params.margin", f"expected a number > 0, got {self.params['margin']!r}")

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        for spec in self.inputs:
            if spec.name not in inputs:
                if spec.required:
                    raise invalid(f"inputs.{spec.name}", f"required input missing ({self.name} takes "
                                                         f"{', '.join(s.name for s in self.inputs)})")
                continue
            if inputs[spec.name].numel() == 0:
                raise invalid(f"inputs.{spec.name}", f"empty tensor of shape {_shape(inputs[spec.name])}; "
                                                     "at least one element expected")
        # torch's forward promotes mixed float dtypes but its backward does not: one float dtype for all inputs.
        floats = [(s.name, inputs[s.name].dtype) for s in self.inputs
                  if s.name in inputs and inputs[s.name].is_floating_point()]
        for name, dtype in floats[1:]:
            if dtype != floats[0][1]:
                raise invalid(f"inputs.{name}", f"dtype {str(dtype).removeprefix('torch.')}, expected "
                              f"{str(floats[0][1]).removeprefix('torch.')} (the dtype of inputs.{floats[0][0]}); "
                              "send every float input in one dtype")
        for check in self._row.checks:
            check(inputs, self.params)

    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        row = self._row
        kwargs = row.constructor_kwargs(self.params)
        kwargs.update({name: inputs[name] for name in _CTOR_TENSORS if inputs.get(name) is not None})
        args = [inputs[s.name] for s in self.inputs if s.name not in _CTOR_TENSORS]
        try:
            out = row.cls(**kwargs)(*args)
        except (RuntimeError, ValueError) as exc:
            if is_out_of_memory(exc):
                raise  # a capacity problem, not the caller's input
            # Last resort: the checks above should have caught it with a better message.
            raise InvalidArgument(f"{self.name}: torch rejected the inputs: {exc}", field="inputs") from exc
        if self.params["reduction"] == "none":
            return LossOutput(loss=out.sum(), per_item=out.detach().flatten())
        return LossOutput(loss=out)


def _make(row: _Row) -> type[Loss]:
    name = row.cls.__name__
    return type(f"Torch{name}", (_TorchLoss,), {
        "__module__": __name__,
        "__doc__": f"torch.nn.{name} served as torch.{name}.",
        "name": f"torch.{name}",
        "description": f"torch.nn.{name}: {row.description}",
        "inputs": row.inputs,
        "schema": Schema(row.params),
        "rejected_params": _deprecated(row.cls),
        "_row": row,
    })


SERVED: dict[str, type[Loss]] = {}
for _row in _TABLE:
    _cls = register(_make(_row))
    SERVED[_cls.name] = _cls
del _row, _cls

__all__ = ["SERVED"]
