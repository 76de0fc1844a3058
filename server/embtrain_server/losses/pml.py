"""pytorch-metric-learning (PML) losses, served as ``pml.<ClassName>`` when the ``pml`` extra is installed.

Only an explicit allow-list is reachable from the wire: the loss classes in ``_ROWS``, the distances in
``_DISTANCES``, the reducers in ``_REDUCERS``, the regularizers in ``_REGULARIZERS`` and the miners in ``_MINERS``.
Wire strings are looked up in these dicts only, never with ``getattr`` on a PML module, so nothing else in the PML
namespace can be instantiated.

Parameters are the loss constructor's own (derived from its signature, JSON-able types only, with a few
overrides for types the signature does not tell), plus

* ``distance`` / ``distance_params``: a distance by class name (``"LpDistance"``, ...) and its arguments;
* ``reducer`` / ``reducer_params``: a reducer by class name and its arguments (``PerAnchorReducer`` and
  ``MultipleReducers`` name their inner reducers the same way);
* ``embedding_regularizer`` / ``embedding_regularizer_params`` / ``embedding_reg_weight`` and, for the losses with
  weights, ``weight_regularizer`` / ``weight_regularizer_params`` / ``weight_reg_weight``: a regularizer by class
  name, its arguments (which may hold their own ``distance`` and ``reducer``) and its weight;
* ``miner`` / ``miner_params``: a miner by wire name ``"pml.<MinerClassName>"`` and its arguments (which may
  hold their own ``distance`` / ``distance_params``); absent for the losses that refuse mined indices.

``null`` for ``distance``, ``reducer``, a regularizer or ``miner`` keeps the loss's own default.

Inputs are PML's forward arguments: ``embeddings``, ``labels`` (optional where PML allows ``labels=None``),
``indices_tuple`` as ``triplets`` [k, 3] or the four pair arrays ``indices_a1``, ``indices_p``, ``indices_a2``,
``indices_n`` (anchors index the embeddings, positives and negatives the reference set), and ``ref_emb`` /
``ref_labels`` for the losses that take a reference set. Which loss takes which is fixed per loss (``_Row``) and
declared in ``inputs``, so ListLosses shows it and anything else is refused before PML runs.

Losses with learnable parameters (ArcFace's ``W``, ProxyAnchor's ``proxies``, SoftTriple's ``fc``, P2SGrad's
``weight``, MarginLoss's ``beta`` with ``learn_beta``) are ``stateful``. A **stateless** request sends them as
inputs of those names (differentiable: their gradients come back, as island's ``centers`` do); a stateless request
that does not send them is refused (INVALID_ARGUMENT naming the input), never computed with made-up weights. In a
**session** ``init_state`` builds the PML module (weights seeded from the session generator), ``state_tensors`` hands
its ``nn.Parameter`` s to the session optimiser, and the weights persist across batches (sending them as inputs
there is refused). ``embedding_size`` (or ``descriptors_dim``) defaults to the width of the first batch.
``DynamicSoftMarginLoss`` keeps a running histogram: it is computed in ``forward`` and committed in ``update``.

The loss value is PML's own, never rounded: SmoothAPLoss computes a float32 loss for float64 and float16 inputs,
and that float32 value is what the response carries (gradients are in each input's dtype).

With ``DoNothingReducer`` PML returns its loss dictionary unreduced, ``{sub_loss: {"losses", "indices",
"reduction_type"}}``. Its *elements* are every sub-loss's floating-point ``losses``, flattened, in the dictionary's
order (PML's zero losses, the number 0, are none). The loss is the **sum** of every element of every sub-loss and its
gradient is returned; with the input ``element_weights`` (float ``[e]``, one weight per element) it is
``sum_e w_e * element_e`` instead, whose gradients (embeddings, ``ref_emb``, learnable weights) are the
vector-Jacobian product that a client's own reduction of the dictionary needs: embtrain.pml's backward. Every answer
carries ``per_item_losses`` as ``reducer_params.per_item`` says: ``"first"`` (default) the first sub-loss's elements
in PML's order, ``"all"`` every element, ``"dict"`` the whole dictionary, indices and reduction types included,
packed in one float64 tensor (format at ``pack_loss_dict``). The elements are those of each call: where PML samples
(``triplets_per_anchor`` an integer, a sampling miner), a second call that must see the same ones sends the first
answer's triplets as its ``indices_tuple``.

With a triplet miner (one that returns ``(a, p, n)``), the response's triplets are the miner's *selected*
triplets, sorted and de-duplicated: PML does not say which of them have a positive loss. Pair miners, indices sent
by the client and losses without a miner return none. Cross-batch memory is not used by PML losses (PML's own
``CrossBatchMemory`` runs on the client: ``embtrain.pml.losses.CrossBatchMemory``, with ``ref_emb``).

Left out of the allow-list: the abstract bases (``BaseMetricLossFunction``, ``GenericPairLoss``,
``BaseLossWrapper``); the wrappers ``CrossBatchMemory``, ``MultipleLosses`` and ``SelfSupervisedLoss`` (they take
loss objects; ``embtrain.pml`` composes them on the client from served losses); ``VICRegLoss`` (pairs of views, no
labels); ``ManifoldLoss`` (refuses labels, draws random meta-classes per call). Among reducers: ``MultipleReducers``
with other reducers than the plain ones, and ``PerAnchorReducer`` with another ``aggregation_func`` (functions
cannot travel). Among miners: ``EmbeddingsAlreadyPackagedAsTriplets`` (a batch layout, not a miner).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import FailedPrecondition, InvalidArgument, invalid, is_out_of_memory
from ..params import Param, Schema
from ._mining import reference_rows
from .base import EMBEDDINGS, LABELS, ComputeContext, InputSpec, Loss, LossOutput, note_missing_extra, register

try:  # imported once, here; the rest of the module only uses the dicts built from it
    from pytorch_metric_learning import distances as _pml_distances
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning import miners as _pml_miners
    from pytorch_metric_learning import reducers as _pml_reducers
    from pytorch_metric_learning import regularizers as _pml_regularizers
    from pytorch_metric_learning.losses.mixins import WeightMixin as _WeightMixin
    from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin as _WeightRegularizerMixin
except ImportError:  # the optional 'pml' extra is not installed
    _pml_losses = None

_log = logging.getLogger(__name__)

# Seed of the weights a learnable loss is built with before a stateless request's own weights replace them, and of
# a restore without a session generator. Never the weights a result is computed with.
STATELESS_SEED = 0
# Embedding width used only to validate a learnable loss's constructor arguments at parse time (cheap).
_PROBE_DIM = 1


@dataclass(frozen=True)
class _IntOrAll(Param):
    """An integer >= 1 or the string ``"all"`` (PML's ``triplets_per_anchor``); ``null`` means ``"all"`` too."""

    def parse(self, value: Any, prefix: str = "params") -> Any:
        if isinstance(value, str) and value == "all":
            return "all"
        return super().parse(value, prefix)

    @property
    def range_text(self) -> str:
        return ">= 1, or 'all'"


# Parameter types the constructor signature does not tell (``None`` or int defaults), by parameter name.
_BY_NAME: dict[str, Param] = {
    "num_classes": Param("num_classes", "int", None, "number of classes (required)", minimum=1),
    "embedding_size": Param("embedding_size", "int", None, "embedding width; null: the first batch's d",
                            minimum=1, nullable=True),
    "descriptors_dim": Param("descriptors_dim", "int", None, "embedding width; null: the first batch's d",
                             minimum=1, nullable=True),
    "centers_per_class": Param("centers_per_class", "int", 10, "centres per class", minimum=1),
    "sub_centers": Param("sub_centers", "int", 3, "sub-centres per class", minimum=1),
    "num_bins": Param("num_bins", "int", 10, "number of histogram bins", minimum=1),
    "pos_per_bin": Param("pos_per_bin", "int", 10, "positive pairs sampled per bin", minimum=1),
    "neg_per_bin": Param("neg_per_bin", "int", 10, "negative pairs sampled per bin", minimum=1),
    "temperature": Param("temperature", "float", None, "softmax temperature", minimum=0.0, exclusive_minimum=True),
    "triplets_per_anchor": _IntOrAll("triplets_per_anchor", "int", "all",
                                     "triplets sampled per anchor, or 'all' (null: 'all')", minimum=1, nullable=True),
}
# Names the services's own conventions supply; never offered as parameters (the regularizers are added by name).
_INTERNAL = {"embedding_regularizer", "embedding_reg_weight", "weight_regularizer", "weight_reg_weight",
             "weight_init_func", "collect_stats", "distance", "reducer", "mat_based_loss"}
# Parameters that configure objects rather than the loss constructor's plain arguments.
_OBJECT_PARAMS = ("distance", "distance_params", "reducer", "reducer_params", "miner", "miner_params",
                  "embedding_regularizer", "embedding_regularizer_params", "weight_regularizer",
                  "weight_regularizer_params")
# What ``per_item_losses`` carries with DoNothingReducer (``reducer_params.per_item``).
_PER_ITEM = ("first", "all", "dict")
# Inputs that carry PML's ``indices_tuple``.
_PAIR_INPUTS = ("indices_a1", "indices_p", "indices_a2", "indices_n")
_INDEX_INPUTS = ("triplets", *_PAIR_INPUTS)


@dataclass(frozen=True)
class _Row:
    """One allow-listed PML loss class and what the generic code needs to know about it."""

    cls: type
    learnable: bool = False            # holds nn.Parameters -> stateful
    dim_param: str | None = None       # constructor argument that is the embedding width
    dim_axis: tuple[str, int] | None = None  # (parameter, axis) where that width shows in the state tensors
    classes_param: str | None = None   # labels must lie in [0, params[classes_param])
    miner: bool = True                 # accepts mined indices (a miner, or indices_tuple inputs)
    buffers: tuple[str, ...] = ()      # non-parameter state updated by forward (committed in update)
    class_blocks: bool = False         # labels must come in contiguous, equally sized class blocks
    required: tuple[str, ...] = ()
    overrides: tuple[Param, ...] = ()
    complexity: str | None = None      # memory growth for the batch estimate; None: from dim_axis
    labels: str = "required"           # "required" | "or_indices" (labels or an indices_tuple) | "optional"
    ref: bool = False                  # accepts ref_emb / ref_labels
    weights: tuple[tuple[str, str], ...] = ()  # learnable parameters (name, shape) a stateless call sends
    grad_without_labels: bool = True   # False: PML's labels=None path cannot be differentiated (in-place ops)


def _float(name: str, default: float | None, description: str, **kw: Any) -> Param:
    return Param(name, "float", default, description, **kw)


if _pml_losses is not None:
    _L = _pml_losses
    _CLASSIFIER = {"dim_param": "embedding_size", "classes_param": "num_classes", "learnable": True,
                   "required": ("num_classes",)}
    _W = (("W", "[d, num_classes]"),)
    _PAIRS = {"labels": "or_indices", "ref": True}  # GenericPairLoss and the other labels-or-indices losses
    _ROWS: dict[str, _Row] = {f"pml.{r.cls.__name__}": r for r in (
        _Row(_L.AngularLoss, ref=True),
        _Row(_L.ArcFaceLoss, dim_axis=("W", 0), weights=_W, **_CLASSIFIER),
        _Row(_L.CircleLoss, **_PAIRS),
        _Row(_L.ContrastiveLoss, **_PAIRS),
        _Row(_L.CosFaceLoss, dim_axis=("W", 0), weights=_W, **_CLASSIFIER),
        _Row(_L.DynamicSoftMarginLoss, buffers=("hist_",), labels="optional", ref=True, grad_without_labels=False),
        _Row(_L.FastAPLoss),
        _Row(_L.GeneralizedLiftedStructureLoss, **_PAIRS),
        _Row(_L.HistogramLoss, labels="or_indices", overrides=(
            Param("n_bins", "int", None, "number of bins (delta = 2/n_bins); null with delta null: 100",
                  minimum=1, nullable=True),
            _float("delta", None, "bin width; null: 2/n_bins", minimum=0.0, exclusive_minimum=True,
                   nullable=True))),
        _Row(_L.InstanceLoss, miner=False),
        _Row(_L.IntraPairVarianceLoss, **_PAIRS),
        _Row(_L.LargeMarginSoftmaxLoss, dim_axis=("W", 0), weights=_W, overrides=(
            Param("margin", "int", 4, "angular margin multiplier m", minimum=1),), **_CLASSIFIER),
        _Row(_L.LiftedStructureLoss, **_PAIRS),
        _Row(_L.MarginLoss, learnable=True, classes_param="num_classes",
             weights=(("beta", "[num_classes] or [1] (with learn_beta)"),), overrides=(
                 Param("num_classes", "int", None, "one beta per class; null: a single beta", minimum=1,
                       nullable=True),), **_PAIRS),
        _Row(_L.MultiSimilarityLoss, **_PAIRS),
        _Row(_L.NCALoss, ref=True),
        _Row(_L.NPairsLoss),
        _Row(_L.NTXentLoss, **_PAIRS),
        _Row(_L.NormalizedSoftmaxLoss, dim_axis=("W", 0), weights=_W, **_CLASSIFIER),
        _Row(_L.P2SGradLoss, learnable=True, dim_param="descriptors_dim", dim_axis=("weight", 0),
             classes_param="num_classes", miner=False, required=("num_classes",),
             weights=(("weight", "[d, num_classes]"),)),
        _Row(_L.PNPLoss, miner=False, complexity="n3", overrides=(
            Param("variant", "enum", "O", "PNP variant", choices=("Ds", "Dq", "Iu", "Ib", "O")),)),
        _Row(_L.ProxyAnchorLoss, dim_axis=("proxies", 1), weights=(("proxies", "[num_classes, d]"),),
             **_CLASSIFIER),
        _Row(_L.ProxyNCALoss, dim_axis=("proxies", 1), weights=(("proxies", "[num_classes, d]"),), **_CLASSIFIER),
        _Row(_L.RankedListLoss, miner=False, required=("margin", "Tn"), overrides=(
            _float("margin", None, "margin between the positive and the negative set (required)"),
            _float("Tn", None, "temperature of the negative weighting (required)"),
            _float("imbalance", 0.5, "weight of the negative part", minimum=0.0, maximum=1.0),
            _float("alpha", None, "boundary of the negative set; null: 1 + margin/2", nullable=True))),
        _Row(_L.SignalToNoiseRatioContrastiveLoss, **_PAIRS),
        _Row(_L.SmoothAPLoss, class_blocks=True, complexity="n3"),
        _Row(_L.SoftTripleLoss, dim_axis=("fc", 0), weights=(("fc", "[d, num_classes * centers_per_class]"),),
             **_CLASSIFIER),
        _Row(_L.SphereFaceLoss, dim_axis=("W", 0), weights=_W, overrides=(
            Param("margin", "int", 4, "angular margin multiplier m", minimum=1),), **_CLASSIFIER),
        _Row(_L.SubCenterArcFaceLoss, dim_axis=("W", 0), weights=(("W", "[d, num_classes * sub_centers]"),),
             **_CLASSIFIER),
        _Row(_L.SupConLoss, **_PAIRS),
        _Row(_L.ThresholdConsistentMarginLoss, **_PAIRS),
        _Row(_L.TripletMarginLoss, **_PAIRS),
        _Row(_L.TupletMarginLoss, **_PAIRS),
    )}
    # Where a derived signature walk stops: PML's bases hold only internal arguments.
    _STOP = _L.BaseMetricLossFunction

    _SHARED_DISTANCE = (Param("p", "float", 2.0, "norm degree (normalisation and Lp)", minimum=0.0,
                              exclusive_minimum=True),
                        Param("power", "float", 1.0, "the distance matrix is raised to this power"))
    _NORMALIZE = Param("normalize_embeddings", "bool", True, "L2-normalise the embeddings first")
    _DISTANCES: dict[str, tuple[type, Schema]] = {
        "LpDistance": (_pml_distances.LpDistance, Schema((_NORMALIZE, *_SHARED_DISTANCE))),
        "CosineSimilarity": (_pml_distances.CosineSimilarity, Schema(_SHARED_DISTANCE)),
        "DotProductSimilarity": (_pml_distances.DotProductSimilarity, Schema((_NORMALIZE, *_SHARED_DISTANCE))),
        "SNRDistance": (_pml_distances.SNRDistance, Schema((_NORMALIZE, *_SHARED_DISTANCE))),
    }
    _R = _pml_reducers
    # The reducers that reduce to a scalar by themselves (and may sit inside PerAnchorReducer, MultipleReducers).
    _PLAIN_REDUCERS: dict[str, tuple[type, Schema]] = {
        "MeanReducer": (_R.MeanReducer, Schema()),
        "AvgNonZeroReducer": (_R.AvgNonZeroReducer, Schema()),
        "SumReducer": (_R.SumReducer, Schema()),
        "DivisorReducer": (_R.DivisorReducer, Schema()),
        "ThresholdReducer": (_R.ThresholdReducer, Schema((
            _float("low", None, "keep losses above this (at least one of low/high)", nullable=True),
            _float("high", None, "keep losses below this", nullable=True)))),
        "ClassWeightedReducer": (_R.ClassWeightedReducer, Schema((
            Param("weights", "float_list", None, "one weight per class (required)"),))),
    }
    _INNER = Param("reducer", "enum", None, "inner reducer; null: MeanReducer", choices=tuple(_PLAIN_REDUCERS),
                   nullable=True)
    _REDUCERS: dict[str, tuple[type, Schema]] = {
        **_PLAIN_REDUCERS,
        "PerAnchorReducer": (_R.PerAnchorReducer, Schema((
            _INNER, Param("reducer_params", "object", {}, "arguments of the inner reducer")))),
        "MultipleReducers": (_R.MultipleReducers, Schema((
            Param("reducers", "object", {}, "sub-loss name -> {reducer, reducer_params}"),
            dataclasses.replace(_INNER, name="default_reducer", description="reducer of the other sub-losses; "
                                                                            "null: MeanReducer"),
            Param("default_reducer_params", "object", {}, "arguments of default_reducer")))),
        "DoNothingReducer": (_R.DoNothingReducer, Schema((
            Param("per_item", "enum", "first", "what per_item_losses carries: 'first' (the first sub-loss's "
                  "elements), 'all' (every element, in element_weights' order) or 'dict' (PML's whole loss "
                  "dictionary, packed: see embtrain_server.losses.pml)", choices=_PER_ITEM),))),
    }
    _RG = _pml_regularizers
    _REGULARIZERS: dict[str, tuple[type, Schema]] = {
        "LpRegularizer": (_RG.LpRegularizer, Schema((
            Param("p", "float", 2.0, "norm degree", minimum=0.0, exclusive_minimum=True),
            Param("power", "float", 1.0, "the norm is raised to this power")))),
        "ZeroMeanRegularizer": (_RG.ZeroMeanRegularizer, Schema()),
        "CenterInvariantRegularizer": (_RG.CenterInvariantRegularizer, Schema()),
        "RegularFaceRegularizer": (_RG.RegularFaceRegularizer, Schema()),
        "SparseCentersRegularizer": (_RG.SparseCentersRegularizer, Schema((
            Param("num_classes", "int", None, "number of classes (required)", minimum=1),
            Param("centers_per_class", "int", None, "centres per class (required, > 1)", minimum=2)))),
    }
    _STRATEGIES = ("easy", "semihard", "hard", "all")
    _MINER_DISTANCE = (Param("distance", "enum", None, "the miner's distance; null: its default",
                             choices=tuple(_DISTANCES), nullable=True),
                       Param("distance_params", "object", {}, "arguments of the miner's distance"))
    _MINER_OVERRIDES: dict[str, tuple[Param, ...]] = {
        "BatchEasyHardMiner": (
            Param("pos_strategy", "enum", "easy", "positive selection", choices=_STRATEGIES),
            Param("neg_strategy", "enum", "semihard", "negative selection", choices=_STRATEGIES),
            Param("allowed_pos_range", "float_list", None, "[low, high] of allowed positive distances",
                  nullable=True),
            Param("allowed_neg_range", "float_list", None, "[low, high] of allowed negative distances",
                  nullable=True)),
        "TripletMarginMiner": (
            Param("type_of_triplets", "enum", "all", "which triplets", choices=("all", "hard", "semihard", "easy")),),
    }
    _M = _pml_miners
    _MINER_CLASSES = (_M.AngularMiner, _M.BatchEasyHardMiner, _M.BatchHardMiner, _M.DistanceWeightedMiner,
                      _M.HDCMiner, _M.MultiSimilarityMiner, _M.PairMarginMiner, _M.TripletMarginMiner,
                      _M.UniformHistogramMiner)
    _MINER_STOP = _M.BaseMiner
else:
    _ROWS = {}
    _DISTANCES = {}
    _REDUCERS = {}
    _REGULARIZERS = {}
    _MINER_CLASSES = ()


# ---- schema derivation ------------------------------------------------------------------------------------

def _signature_params(cls: type, stop: type, allowed: set[type], overrides: Mapping[str, Param]) -> list[Param]:
    """The constructor arguments of ``cls`` and of its allowed bases up to ``stop`` (``**kwargs`` reach them),
    first definition wins; typed from the default unless ``overrides`` says otherwise."""
    seen: dict[str, Param] = {}
    for klass in cls.__mro__:
        if klass is stop:
            break
        if klass not in allowed or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name == "self" or p.name in _INTERNAL or p.name in seen or p.kind in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD):
                continue
            seen[p.name] = _typed(p, overrides, cls.__name__)
    return list(seen.values())


def _typed(p: inspect.Parameter, overrides: Mapping[str, Param], owner: str) -> Param:
    if p.name in overrides:
        return overrides[p.name]
    default = p.default
    if p.name in _BY_NAME:
        given = _BY_NAME[p.name]
        keep = given.default if default is inspect.Parameter.empty or default is None else default
        return dataclasses.replace(given, default=keep)
    if isinstance(default, bool):
        return Param(p.name, "bool", default)
    if isinstance(default, (int, float)):
        # PML writes many real-valued arguments with int defaults (alpha=40); accept any number.
        return Param(p.name, "float", float(default))
    raise TypeError(f"{owner}.{p.name}: no JSON type for default {default!r}; add an override")


def _sub_schema(cls: type, stop: type, extra: tuple[Param, ...] = ()) -> Schema:
    overrides = {p.name: p for p in _MINER_OVERRIDES.get(cls.__name__, ())}
    return Schema((*_signature_params(cls, stop, {cls}, overrides), *extra))


# ---- building PML objects from validated parameters -------------------------------------------------------

def _why(exc: BaseException) -> str:
    """PML's assertions often carry no message: fall back to the exception's type."""
    return str(exc) or type(exc).__name__


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from a private RNG stream: PML initialises weights from torch's global generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _distance(name: str | None, values: Mapping[str, Any], where: str) -> Any:
    if name is None:
        if values:
            raise invalid(f"{where}_params", f"set {where} too (distance_params without a distance)")
        return None
    cls, schema = _DISTANCES[name]
    return cls(**schema.parse(values, prefix=f"{where}_params"))


def _reducer(name: str | None, values: Mapping[str, Any], where: str = "params.reducer",
             table: Mapping[str, tuple[type, Schema]] | None = None) -> Any:
    """A reducer from its wire name and arguments; ``where`` names the field of the name (``<where>_params`` holds
    the arguments). ``table``: the names allowed here (inner reducers: the plain ones)."""
    if name is None:
        if values:
            raise invalid(f"{where}_params", f"set {where.rsplit('.', 1)[-1]} too (arguments without a reducer)")
        return None
    table = _REDUCERS if table is None else table
    if name not in table:
        raise invalid(where, f"expected one of {', '.join(map(repr, table))}, got {name!r}")
    cls, schema = table[name]
    prefix = f"{where}_params"
    parsed = schema.parse(values, prefix=prefix)
    if name == "DoNothingReducer":
        parsed = {}  # per_item says what the answer carries; the reducer itself takes no arguments
    elif name == "PerAnchorReducer":
        inner = _reducer(parsed["reducer"], parsed["reducer_params"], f"{prefix}.reducer", _PLAIN_REDUCERS)
        parsed = {"reducer": inner}
    elif name == "MultipleReducers":
        subs = {}
        for key, spec in parsed["reducers"].items():
            field = f"{prefix}.reducers.{key}"
            if not isinstance(spec, Mapping) or not isinstance(spec.get("reducer"), str) or \
                    set(spec) - {"reducer", "reducer_params"}:
                raise invalid(field, "expected {\"reducer\": name, \"reducer_params\": {...}}")
            subs[key] = _reducer(spec["reducer"], spec.get("reducer_params") or {}, f"{field}.reducer",
                                 _PLAIN_REDUCERS)
        default = _reducer(parsed["default_reducer"], parsed["default_reducer_params"], f"{prefix}.default_reducer",
                           _PLAIN_REDUCERS)
        parsed = {"reducers": subs, "default_reducer": default}
    elif name == "ClassWeightedReducer":
        if parsed["weights"] is None:
            raise invalid(f"{prefix}.weights", "required (one weight per class)")
        parsed = {"weights": torch.tensor(parsed["weights"], dtype=torch.float64)}
    try:
        return cls(**parsed)
    except (AssertionError, ValueError, TypeError) as exc:
        raise invalid(prefix, f"{name} refused these arguments: {_why(exc)}") from exc


def _regularizer(name: str | None, values: Mapping[str, Any], where: str) -> Any:
    if name is None:
        if values:
            raise invalid(f"{where}_params", f"set {where.rsplit('.', 1)[-1]} too (arguments without a regularizer)")
        return None
    cls, schema = _REGULARIZERS[name]
    prefix = f"{where}_params"
    extra = (Param("distance", "enum", None, "the regularizer's distance; null: its default",
                   choices=tuple(_DISTANCES), nullable=True),
             Param("distance_params", "object", {}, "arguments of the distance"),
             Param("reducer", "enum", None, "the regularizer's reducer; null: its default",
                   choices=tuple(_PLAIN_REDUCERS), nullable=True),
             Param("reducer_params", "object", {}, "arguments of the reducer"))
    parsed = Schema((*schema.params, *extra)).parse(values, prefix=prefix)
    for p in schema.params:
        if p.default is None and not p.nullable and parsed[p.name] is None:
            raise invalid(f"{prefix}.{p.name}", "required")
    objects = {"distance": _distance(parsed.pop("distance"), parsed.pop("distance_params"), f"{prefix}.distance"),
               "reducer": _reducer(parsed.pop("reducer"), parsed.pop("reducer_params"), f"{prefix}.reducer",
                                   _PLAIN_REDUCERS)}
    try:
        return cls(**parsed, **{k: v for k, v in objects.items() if v is not None})
    except (AssertionError, ValueError, TypeError) as exc:
        raise invalid(prefix, f"{name} refused these arguments: {_why(exc)}") from exc


def _miner(name: str | None, values: Mapping[str, Any]) -> Any:
    if name is None:
        if values:
            raise invalid("params.miner_params", "set params.miner too (miner_params without a miner)")
        return None
    cls, schema = _MINERS[name]
    parsed = schema.parse(values, prefix="params.miner_params")
    dist = _distance(parsed.pop("distance"), parsed.pop("distance_params"), "params.miner_params.distance")
    for key in ("allowed_pos_range", "allowed_neg_range"):
        if parsed.get(key) is not None and len(parsed[key]) != 2:
            raise invalid(f"params.miner_params.{key}", f"expected [low, high], got {len(parsed[key])} numbers")
    try:
        return cls(**parsed, **({"distance": dist} if dist is not None else {}))
    except (AssertionError, ValueError, TypeError) as exc:
        raise invalid("params.miner_params", f"pml.{cls.__name__} refused these arguments: "
                                             f"{_why(exc)}") from exc


_MINERS: dict[str, tuple[type, Schema]] = {
    f"pml.{c.__name__}": (c, _sub_schema(c, _MINER_STOP, _MINER_DISTANCE)) for c in _MINER_CLASSES
}


def _elements(loss_dict: Mapping[str, Any]) -> list[torch.Tensor]:
    """DoNothingReducer: the *elements* of PML's unreduced loss dictionary, in the order ``element_weights`` and
    ``per_item`` 'all' follow: for each sub-loss in the dictionary's order, its ``losses`` when that is a
    floating-point tensor, flattened (a 0-dim tensor is one element). PML's zero losses (the number ``0``) are no
    elements."""
    return [info["losses"].reshape(-1) for info in loss_dict.values()
            if isinstance(info, Mapping) and torch.is_tensor(info.get("losses"))
            and info["losses"].is_floating_point()]


def _sub_loss(info: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    """A sub-loss's ``losses`` as a tensor (PML writes a zero loss as the number 0), in ``like``'s dtype and device
    when it is a number."""
    losses = info["losses"]
    return losses if torch.is_tensor(losses) else torch.as_tensor(float(losses), dtype=like.dtype, device=like.device)


def _reduce_loss_dict(loss_dict: Mapping[str, Any], like: torch.Tensor,
                      weights: torch.Tensor | None) -> torch.Tensor:
    """DoNothingReducer: the loss the server differentiates. Without ``weights``, the sum of every element of every
    sub-loss (numbers included); with them (``inputs.element_weights``, one per element in ``_elements``' order),
    ``sum_e w_e * l_e``: its gradient is the vector-Jacobian product of the elements with ``w``, which is what a
    client's own reduction of the dictionary needs for its backward."""
    if weights is not None:
        elements = _elements(loss_dict)
        count = sum(int(e.numel()) for e in elements)
        if weights.shape[0] != count:
            raise invalid("inputs.element_weights", f"length {weights.shape[0]}, expected {count}: one weight per "
                          f"element of the loss dictionary ({_describe(loss_dict)}), in that order")
        total: torch.Tensor | None = None
        offset = 0
        for e in elements:
            k = int(e.numel())
            part = (e * weights[offset:offset + k].to(e.dtype)).sum()
            offset += k
            total = part if total is None else total + part
        return total if total is not None else torch.zeros((), dtype=like.dtype, device=like.device)
    total = None
    for info in loss_dict.values():
        part = _sub_loss(info, like).sum()
        total = part if total is None else total + part
    return total if total is not None else torch.zeros((), dtype=like.dtype, device=like.device)


def _describe(loss_dict: Mapping[str, Any]) -> str:
    """``pos_loss: 48, neg_loss: 192``: the elements of each sub-loss, for error messages."""
    parts = []
    for name, info in loss_dict.items():
        losses = info.get("losses") if isinstance(info, Mapping) else None
        count = int(losses.numel()) if torch.is_tensor(losses) and losses.is_floating_point() else 0
        parts.append(f"{name}: {count}")
    return ", ".join(parts) or "no sub-losses"


def _per_item(loss_dict: Mapping[str, Any], like: torch.Tensor, mode: str) -> torch.Tensor | None:
    """What ``per_item_losses`` carries with DoNothingReducer (``reducer_params.per_item``)."""
    if mode == "dict":
        return pack_loss_dict(loss_dict)
    if mode == "all":
        elements = [e.detach() for e in _elements(loss_dict)]
        if not elements:
            return torch.zeros(0, dtype=like.dtype)
        dtype = elements[0].dtype
        for e in elements[1:]:
            dtype = torch.promote_types(dtype, e.dtype)
        return torch.cat([e.to(dtype) for e in elements])
    for info in loss_dict.values():  # 'first': the first sub-loss's elements
        return _sub_loss(info, like).detach().reshape(-1)
    return None


# ---- the packed loss dictionary (reducer_params.per_item = "dict") -----------------------------------------
#
# PML's loss dictionary, exactly, in one float64 tensor (float64 holds every float16/bfloat16/float32/float64 value
# and every integer below 2**53 exactly):
#
#     [PACK_MAGIC, PACK_VERSION, S, structure (S numbers), elements (the rest)]
#
# ``elements`` are ``_elements(loss_dict)`` concatenated (the order ``element_weights`` follows). ``structure``
# encodes the dictionary as a value:
#
#     0                                   None
#     1, x                                a Python int (bool: as 0 / 1)
#     2, x                                a Python float
#     3, L, c_1 .. c_L                    a str, as L Unicode code points
#     4, K, v_1 .. v_K                    a tuple of K values
#     5, K, v_1 .. v_K                    a list of K values
#     6, K, (key_1, v_1) .. (key_K, v_K)  a dict (keys are str values), in its order
#     7, dtype, ndim, shape.., data..     a tensor given inline (indices)
#     8, dtype, ndim, shape..             a tensor whose data is the next numel() numbers of ``elements``
#                                         (a sub-loss's floating-point ``losses``)
#
# with ``dtype`` the position in ``PACK_DTYPES``. embtrain.pml decodes it on the client (embtrain.pml._lossdict).
PACK_MAGIC = 5262668.0  # "PML" as a number: a packed dictionary, not a list of losses
PACK_VERSION = 1.0
PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool)


def pack_loss_dict(loss_dict: Mapping[str, Any]) -> torch.Tensor:
    """PML's loss dictionary as one float64 CPU tensor (format above)."""
    structure: list[torch.Tensor] = []
    numbers: list[float] = []
    data: list[torch.Tensor] = []

    def flush() -> None:
        if numbers:
            structure.append(torch.tensor(numbers, dtype=torch.float64))
            numbers.clear()

    def put(value: Any, element: bool = False) -> None:
        if value is None:
            numbers.append(0.0)
        elif isinstance(value, (bool, int)):
            numbers.extend((1.0, float(int(value))))
        elif isinstance(value, float):
            numbers.extend((2.0, value))
        elif isinstance(value, str):
            numbers.extend((3.0, float(len(value)), *(float(ord(c)) for c in value)))
        elif isinstance(value, (tuple, list)):
            numbers.extend((4.0 if isinstance(value, tuple) else 5.0, float(len(value))))
            for v in value:
                put(v)
        elif isinstance(value, Mapping):
            numbers.extend((6.0, float(len(value))))
            for k, v in value.items():
                put(str(k))
                put(v)
        elif torch.is_tensor(value):
            if value.dtype not in PACK_DTYPES:
                raise TypeError(f"cannot pack a {value.dtype} tensor")
            flat = value.detach().reshape(-1).to("cpu", torch.float64)
            inline = not (element and value.is_floating_point())
            numbers.extend((7.0 if inline else 8.0, float(PACK_DTYPES.index(value.dtype)), float(value.dim()),
                            *(float(s) for s in value.shape)))
            if inline:
                flush()
                structure.append(flat)
            else:
                data.append(flat)
        else:
            raise TypeError(f"cannot pack a {type(value).__name__}")

    # The top level by hand: a sub-loss's "losses" is where the elements are (as ``_elements`` finds them).
    numbers.extend((6.0, float(len(loss_dict))))
    for name, info in loss_dict.items():
        put(str(name))
        if isinstance(info, Mapping):
            numbers.extend((6.0, float(len(info))))
            for k, v in info.items():
                put(str(k))
                put(v, element=k == "losses")
        else:
            put(info)
    flush()
    body = torch.cat(structure) if structure else torch.zeros(0, dtype=torch.float64)
    head = torch.tensor([PACK_MAGIC, PACK_VERSION, float(body.numel())], dtype=torch.float64)
    return torch.cat([head, body, *data])


# ---- the served loss --------------------------------------------------------------------------------------

class _PmlLoss(Loss):
    """Base of the generated classes. An instance holds one configuration and, once built, the PML module."""

    family = "pml"
    has_update_rule = False  # learnable parameters are stepped by the session's optimiser
    inputs = (EMBEDDINGS, LABELS)
    _row: ClassVar[_Row]

    def check_params(self) -> None:
        row, p = self._row, self.params
        for name in row.required:
            if p[name] is None:
                raise invalid(f"params.{name}", "required")
        self._ctor = {k: v for k, v in p.items() if k not in _OBJECT_PARAMS}
        if "triplets_per_anchor" in self._ctor and self._ctor["triplets_per_anchor"] is None:
            self._ctor["triplets_per_anchor"] = "all"
        for key in ("n_bins", "delta", "alpha"):  # PML tells "unset" by None: keep it out of the call
            if key in self._ctor and self._ctor[key] is None:
                del self._ctor[key]
        self._miner = _miner(p.get("miner"), p.get("miner_params", {}))
        self._module: torch.nn.Module | None = None
        self._dim: int | None = None
        self._held = False  # the module's weights are the session's (init_state / load_state_tensors)
        self._pending: dict[str, torch.Tensor] = {}
        # Validate every argument now (PML checks some in its constructor); learnable ones at a tiny width and with
        # one class, so that parsing allocates nothing however many classes are asked for (see ``state_bytes``).
        classes = row.classes_param if row.learnable and row.classes_param in self._ctor else None
        probe = self._build(_PROBE_DIM, STATELESS_SEED, **({classes: 1} if classes else {}))
        # The learnable parameters this configuration has (MarginLoss's beta only with learn_beta).
        self._weights = tuple(name for name, _ in probe.named_parameters())
        self._nothing = p.get("reducer") == "DoNothingReducer"
        self._per_item = _REDUCERS["DoNothingReducer"][1].parse(
            p["reducer_params"], prefix="params.reducer_params")["per_item"] if self._nothing else "first"
        if not self._row.learnable and self._row.dim_param is None:
            self._module = probe

    @property
    def returns_per_item(self) -> bool:
        """DoNothingReducer: the elements PML left unreduced come with every answer."""
        return self._nothing

    def state_bytes(self, dim: int) -> int:
        """Learnable classifier losses hold about num_classes x dim (x centres_per_class) weights."""
        row, p = self._row, self.params
        if not row.learnable or not row.classes_param or p.get(row.classes_param) is None:
            return 0
        return 4 * 8 * int(p[row.classes_param]) * dim * int(p.get("centers_per_class") or 1)

    def _build(self, dim: int, seed: int, **overrides: Any) -> torch.nn.Module:
        kwargs = {**self._ctor, **overrides}
        if self._row.dim_param is not None:
            kwargs[self._row.dim_param] = dim
        p = self.params
        distance = _distance(p["distance"], p["distance_params"], "params.distance")
        objects = {"distance": distance, "reducer": _reducer(p["reducer"], p["reducer_params"])}
        for kind in ("embedding", "weight"):
            key = f"{kind}_regularizer"
            if key in p:
                objects[key] = _regularizer(p[key], p[f"{key}_params"], f"params.{key}")
        objects = {k: v for k, v in objects.items() if v is not None}
        try:
            with _seeded(seed):
                return self._row.cls(**kwargs, **objects)
        except (AssertionError, ValueError, TypeError) as exc:
            if "distance" in objects:
                try:  # blame the distance when the loss accepts its default one
                    with _seeded(seed):
                        self._row.cls(**kwargs, **{k: v for k, v in objects.items() if k != "distance"})
                except (AssertionError, ValueError, TypeError):
                    pass
                else:
                    raise invalid("params.distance", f"{self.name} does not work with {p['distance']} "
                                                     f"{p['distance_params'] or ''}".rstrip()
                                  + (f": {exc}" if str(exc) else "")) from exc
            raise InvalidArgument(f"params: {self.name} refused these parameters: {_why(exc)}",
                                  field="params") from exc

    # ---- validation -------------------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        row, p = self._row, self.params
        emb, labels = inputs.get("embeddings"), inputs.get("labels")
        if emb is None:
            raise invalid("inputs.embeddings", f"required input missing ({self.name} takes embeddings)")
        if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
            raise invalid("inputs.embeddings", f"shape {list(emb.shape)}, expected [n, d] with n, d >= 1")
        n, d = emb.shape
        has_indices = any(k in inputs for k in _INDEX_INPUTS)
        if labels is None:
            if row.labels == "required":
                raise invalid("inputs.labels", f"required input missing ({self.name} takes embeddings, labels)")
            if row.labels == "or_indices" and not has_indices:
                raise invalid("inputs.labels", f"required unless the request carries an indices_tuple (triplets, or "
                                               f"{', '.join(_PAIR_INPUTS)}): {self.name} needs one of them")
            if self._miner is not None:
                raise invalid("inputs.labels", f"required by params.miner ({p['miner']} mines from the labels)")
        elif labels.shape != (n,):
            raise invalid("inputs.labels", f"shape {list(labels.shape)}, expected [{n}] (one per embedding row)")
        w = inputs.get("element_weights")
        if w is not None:
            if not self._nothing:
                raise invalid("inputs.element_weights", "only with params.reducer 'DoNothingReducer' (weights of the "
                                                        "elements of PML's unreduced loss dictionary)")
            if w.dim() != 1:
                raise invalid("inputs.element_weights", f"shape {list(w.shape)}, expected [e] (one weight per "
                                                        "element of the loss dictionary)")
        m = self._check_reference(inputs, n)
        if has_indices:
            self._check_indices(inputs, n, m)
        want = self._dim if self._dim is not None else (p.get(row.dim_param) if row.dim_param else None)
        if want is not None and d != want:
            source = "the session state" if self._held else f"params.{row.dim_param}"
            raise invalid("inputs.embeddings", f"width {d}, expected {want} ({source})")
        if labels is not None and row.classes_param and p.get(row.classes_param) is not None:
            k = p[row.classes_param]
            bad = (labels < 0) | (labels >= k)
            if bool(bad.any()):
                raise invalid("inputs.labels", f"label {labels[bad][0].item()} out of range; expected "
                                               f"0 <= label < params.{row.classes_param} ({k})")
        if row.class_blocks and labels is not None:
            _check_class_blocks(labels)
        self._check_weights(inputs, d)

    def _check_reference(self, inputs: Mapping[str, torch.Tensor], n: int) -> int:
        """``ref_emb`` / ``ref_labels`` (``_mining.reference_rows``); returns the number of reference rows (``n``
        without a reference set)."""
        m = reference_rows(inputs)
        if m is None:
            return n
        if self._miner is not None:
            raise invalid("inputs.ref_emb", "params.miner mines within the batch; with a reference set, mine on "
                                            "the client and send the indices")
        return m

    def _check_indices(self, inputs: Mapping[str, torch.Tensor], n: int, m: int) -> None:
        """An ``indices_tuple``: triplets [k, 3] or all four pair arrays; anchors index the batch, the others
        the reference set (the batch itself without one)."""
        given = [k for k in _INDEX_INPUTS if k in inputs]
        if self._miner is not None:
            raise invalid(f"inputs.{given[0]}", f"params.miner ({self.params['miner']}) mines the indices; send "
                                                "indices or configure a miner, not both")
        if "triplets" in inputs:
            if len(given) > 1:
                raise invalid(f"inputs.{given[1]}", "send triplets or the four pair arrays, not both")
            t = inputs["triplets"]
            if t.dim() != 2 or t.shape[1] != 3:
                raise invalid("inputs.triplets", f"shape {list(t.shape)}, expected [k, 3] (anchor, positive, "
                                                 "negative)")
            columns = (("inputs.triplets", t[:, 0], n, "anchor"), ("inputs.triplets", t[:, 1], m, "positive"),
                       ("inputs.triplets", t[:, 2], m, "negative"))
        else:
            missing = [k for k in _PAIR_INPUTS if k not in inputs]
            if missing:
                raise invalid(f"inputs.{missing[0]}", f"required with {', '.join(f'inputs.{g}' for g in given)} "
                                                      f"(a pair indices_tuple is {', '.join(_PAIR_INPUTS)})")
            for k in _PAIR_INPUTS:
                if inputs[k].dim() != 1:
                    raise invalid(f"inputs.{k}", f"shape {list(inputs[k].shape)}, expected [k] (one index per pair)")
            for a, b in (("indices_a1", "indices_p"), ("indices_a2", "indices_n")):
                if inputs[a].shape != inputs[b].shape:
                    raise invalid(f"inputs.{b}", f"length {inputs[b].shape[0]}, expected {inputs[a].shape[0]} "
                                                 f"(one per inputs.{a})")
            columns = (("inputs.indices_a1", inputs["indices_a1"], n, "anchor"),
                       ("inputs.indices_p", inputs["indices_p"], m, "positive"),
                       ("inputs.indices_a2", inputs["indices_a2"], n, "anchor"),
                       ("inputs.indices_n", inputs["indices_n"], m, "negative"))
        for field, col, size, what in columns:
            bad = (col < 0) | (col >= size)
            if bool(bad.any()):
                rows = "ref_emb" if what != "anchor" and "ref_emb" in inputs else "the batch"
                raise invalid(field, f"{what} index {col[bad][0].item()} out of range; expected 0 <= index < {size} "
                                     f"(rows of {rows})")

    def _check_weights(self, inputs: Mapping[str, torch.Tensor], d: int) -> None:
        """Learnable parameters: a session holds them; a stateless call sends every one of them."""
        declared = [name for name, _ in self._row.weights]
        sent = [name for name in declared if name in inputs]
        if not self._weights:
            if sent:
                raise invalid(f"inputs.{sent[0]}", f"{self.name} has no learnable {sent[0]} with these parameters"
                                                   + (" (set params.learn_beta)" if sent[0] == "beta" else ""))
            return
        if self._held:
            if sent:
                raise invalid(f"inputs.{sent[0]}", f"this session holds {self.name}'s {', '.join(self._weights)} "
                                                   "and trains them itself; send them only in a stateless call")
            return
        missing = [name for name in self._weights if name not in inputs]
        if missing:
            shapes = dict(self._row.weights)
            raise invalid(f"inputs.{missing[0]}", f"required: a stateless call of {self.name} sends its learnable "
                          f"{missing[0]} ({shapes.get(missing[0], '')}) and gets its gradient back (embtrain.pml "
                          "does this for you); or create a session, which holds and trains the weights")
        if self._module is None or self._dim != d:
            # The request's weights stand in for the module's: skip PML's initialisation where it can be skipped,
            # and keep no storage for them (nothing to move to the device).
            skip = {"weight_init_func": _skip_init} if issubclass(self._row.cls, _WeightMixin) else {}
            module = self._build(d, STATELESS_SEED, **skip)
            shapes = {name: tuple(t.shape) for name, t in module.named_parameters()}
            for t in module.parameters():
                t.data = t.data.new_empty(0)
            self._module, self._shapes = module, shapes
            self._dim = d if self._row.dim_param else None
        for name in self._weights:
            got, want = tuple(inputs[name].shape), self._shapes[name]
            if got != want:
                raise invalid(f"inputs.{name}", f"shape {list(got)}, expected {list(want)} "
                              f"({dict(self._row.weights).get(name, '')} for these parameters and width {d})")

    # ---- compute ----------------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        if ctx.memory is not None and ctx.memory.embeddings.shape[0] > 0:
            raise FailedPrecondition(f"{self.name} does not use cross-batch memory; create the session without it",
                                     field="memory")
        emb, labels = inputs["embeddings"], inputs.get("labels")
        if self._module is None:
            # A stateless request of a loss built per width (MarginLoss without learnable beta, say).
            self._module = self._build(emb.shape[1], STATELESS_SEED)
            self._dim = emb.shape[1] if self._row.dim_param else None
        module = self._module.to(emb.device)
        if labels is None and not self._row.grad_without_labels and torch.is_grad_enabled() and emb.requires_grad:
            # PML 2.9 fills the diagonal of the distance matrix in place on this path: autograd cannot go back.
            raise invalid("inputs.labels", f"required for a gradient: pytorch-metric-learning's {self.name} without "
                                           "labels modifies its distance matrix in place, so it cannot be "
                                           "differentiated (ask for no gradient to get the value)")
        ref, ref_labels = inputs.get("ref_emb"), inputs.get("ref_labels")
        weights = {name: inputs[name] for name in self._weights if name in inputs}
        saved = {b: getattr(module, b) for b in self._row.buffers}
        mined = False
        try:
            indices = _sent_indices(inputs)
            if indices is None and self._miner is not None:
                indices = self._miner(emb, labels)
                mined = True
            args = (emb, labels)
            kwargs = {"indices_tuple": indices, "ref_emb": ref, "ref_labels": ref_labels}
            if weights:  # a stateless call's own weights stand in for the module's (gradients flow to them)
                loss = torch.func.functional_call(module, weights, args, kwargs, strict=False)
            else:
                loss = module(*args, **kwargs)
            # forward must not change state: the updated buffers wait for ``update``.
            self._pending = {b: getattr(module, b).detach() for b in self._row.buffers}
        except (RuntimeError, ValueError, AssertionError, IndexError, KeyError, TypeError) as exc:
            if is_out_of_memory(exc):
                raise  # a capacity problem, not the caller's input
            raise InvalidArgument(f"{self.name}: pytorch-metric-learning rejected the inputs: "
                                  f"{_why(exc)}", field="inputs") from exc
        finally:
            for b, value in saved.items():
                setattr(module, b, value)
        per_item = None
        if isinstance(loss, Mapping):  # DoNothingReducer
            loss_dict = loss
            loss = _reduce_loss_dict(loss_dict, emb, inputs.get("element_weights"))
            if ctx.want_per_item:
                try:
                    per_item = _per_item(loss_dict, emb, self._per_item)
                except TypeError as exc:  # a dictionary this format cannot carry (not PML 2.9's)
                    raise InvalidArgument(f"{self.name}: reducer_params.per_item 'dict' cannot carry this loss "
                                          f"dictionary: {exc}", field="params.reducer_params.per_item") from exc
        if not torch.is_tensor(loss):
            loss = torch.as_tensor(float(loss), dtype=emb.dtype, device=emb.device)
        # PML's own dtype (SmoothAP: float32 for float64 and float16 inputs), never rounded to the input's.
        loss = loss.reshape(())
        if not bool(torch.isfinite(loss.detach())):
            # PML does not guard every degenerate batch (e.g. NCALoss when no sample has a positive).
            raise InvalidArgument(f"{self.name}: pytorch-metric-learning returned a non-finite loss for this batch "
                                  "(degenerate for this loss: check that classes repeat and embeddings differ)",
                                  field="inputs.embeddings")
        if not loss.requires_grad and emb.requires_grad:
            loss = loss + 0.0 * emb.sum().to(loss.dtype)  # keep the graph so the gradient is an explicit zero
        out = LossOutput(loss=loss, per_item=per_item if ctx.want_per_item else None)
        if mined:
            out.stats = ({"mined_triplets": float(len(indices[0]))} if len(indices) == 3 else
                         {"mined_pos_pairs": float(len(indices[0])), "mined_neg_pairs": float(len(indices[2]))})
            if len(indices) == 3 and ctx.want_triplets:
                triplets = torch.unique(torch.stack([t.to(torch.int64) for t in indices], dim=1), dim=0)
                out.triplets_total = int(triplets.shape[0])
                out.triplets = triplets[:ctx.max_triplets]
        return out

    # ---- session state ----------------------------------------------------------------------------------
    def init_state(self, dim: int, device: torch.device, generator: torch.Generator,
                   initial: Mapping[str, torch.Tensor]) -> None:
        row = self._row
        if row.dim_param and self.params.get(row.dim_param) not in (None, dim):
            raise invalid("inputs.embeddings", f"width {dim}, expected params.{row.dim_param} "
                                               f"({self.params[row.dim_param]})")
        self._module = self._build(dim, int(generator.initial_seed())).to(device)
        self._dim = dim if row.dim_param else None
        self._held = True
        self._pending = {}
        if initial:
            self.load_state_tensors(initial)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._module is None or not self.stateful:
            return {}
        state: dict[str, torch.Tensor] = dict(self._module.named_parameters())
        state.update({b: getattr(self._module, b) for b in self._row.buffers})
        return state

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        row = self._row
        if self._module is None or not self._held:
            # A restore without init_state: read the width from the state itself.
            dim = _PROBE_DIM
            if row.dim_axis is not None:
                key, axis = row.dim_axis
                if key not in tensors:
                    raise invalid(f"state.{key}", "missing; needed to rebuild the loss")
                dim = int(tensors[key].shape[axis])
            any_tensor = next(iter(tensors.values()), None)
            device = any_tensor.device if any_tensor is not None else torch.device("cpu")
            self._module = self._build(dim, STATELESS_SEED).to(device)
            self._dim = dim if row.dim_param else None
        self._held = True
        current = self.state_tensors()
        unknown = sorted(set(tensors) - set(current))
        if unknown:
            raise invalid(f"state.{unknown[0]}", f"not a state tensor of {self.name} "
                                                 f"(expected {', '.join(sorted(current)) or 'none'})")
        for key, value in tensors.items():
            target = current[key]
            if value.shape != target.shape:
                raise invalid(f"state.{key}", f"shape {list(value.shape)}, expected {list(target.shape)}")
            # The tensors land where the caller put them (the session moves its state to the device this way);
            # a Parameter keeps its identity so the optimiser built over it stays valid.
            if isinstance(target, torch.nn.Parameter):
                with torch.no_grad():
                    target.data = value.detach().clone()
            else:
                setattr(self._module, key, value.detach().clone())

    def update(self, inputs: dict[str, torch.Tensor], output: LossOutput, ctx: ComputeContext) -> None:
        if ctx.training and self._module is not None:
            for b, value in self._pending.items():
                setattr(self._module, b, value)
        self._pending = {}


def _skip_init(weight: torch.Tensor) -> None:
    """PML's ``weight_init_func`` for a module whose weights a stateless request supplies."""


def _sent_indices(inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
    """The request's ``indices_tuple`` as PML takes it, or None."""
    if "triplets" in inputs:
        t = inputs["triplets"]
        return t[:, 0], t[:, 1], t[:, 2]
    if "indices_a1" in inputs:
        return tuple(inputs[k] for k in _PAIR_INPUTS)
    return None


def _check_class_blocks(labels: torch.Tensor) -> None:
    """SmoothAP reshapes the batch into ``[classes, per_class, d]``: labels must be contiguous, equal blocks."""
    if bool((labels < 0).any()):
        raise invalid("inputs.labels", "labels must be >= 0 for this loss")
    change = torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1
    bounds = torch.cat([change.new_zeros(1), change, change.new_full((1,), labels.shape[0])])
    sizes = bounds[1:] - bounds[:-1]
    if bool((sizes != sizes[0]).any()) or torch.unique(labels).numel() != sizes.numel():
        raise invalid("inputs.labels", "expected contiguous blocks of equal size, one per class "
                                       "(e.g. [a, a, b, b, c, c]); sizes found: " + str(sizes.tolist()))


_OPTIONAL_LABELS = InputSpec("labels", "int", "[n]", False, False,
                             "integer class label per row; may be left out where PML allows labels=None")
_TRIPLETS = InputSpec("triplets", "int", "[k, 3]", False, False,
                      "indices_tuple as triplets (anchor row, positive ref row, negative ref row)")
_PAIR_SPECS = (
    InputSpec("indices_a1", "int", "[k1]", False, False, "indices_tuple as pairs: anchor rows of the positive pairs"),
    InputSpec("indices_p", "int", "[k1]", False, False, "positive (ref) rows of the positive pairs"),
    InputSpec("indices_a2", "int", "[k2]", False, False, "anchor rows of the negative pairs"),
    InputSpec("indices_n", "int", "[k2]", False, False, "negative (ref) rows of the negative pairs"),
)
_REF_SPECS = (
    InputSpec("ref_emb", "float", "[m, d]", False, True, "reference embeddings (PML's ref_emb; default: the batch)"),
    InputSpec("ref_labels", "int", "[m]", False, False, "labels of ref_emb"),
)


_ELEMENT_WEIGHTS = InputSpec(
    "element_weights", "float", "[e]", False, False,
    "with params.reducer DoNothingReducer only: one weight per element of PML's loss dictionary (every sub-loss's "
    "floating-point losses flattened, in the dictionary's order: per_item 'all'); the loss is then sum(w * "
    "element) and its gradients the vector-Jacobian product with w")


def _inputs(row: _Row) -> tuple[InputSpec, ...]:
    specs = [EMBEDDINGS, LABELS if row.labels == "required" else _OPTIONAL_LABELS]
    if row.miner:
        specs += [_TRIPLETS, *_PAIR_SPECS]
    if row.ref:
        specs += list(_REF_SPECS)
    specs += [InputSpec(name, "float", shape, False, True, f"the learnable {name} of a stateless call (a session "
                        "holds its own); its gradient comes back") for name, shape in row.weights]
    specs.append(_ELEMENT_WEIGHTS)
    return tuple(specs)


def _schema(row: _Row) -> Schema:
    overrides = {p.name: p for p in row.overrides}
    own = _signature_params(row.cls, _STOP, {r.cls for r in _ROWS.values()}, overrides)
    common = [
        Param("distance", "enum", None, "distance by class name; null: the loss's default",
              choices=tuple(_DISTANCES), nullable=True),
        Param("distance_params", "object", {}, "arguments of the distance: " + ", ".join(
            sorted({n for _, s in _DISTANCES.values() for n in s.names()}))),
        Param("reducer", "enum", None, "reducer by class name; null: the loss's default",
              choices=tuple(_REDUCERS), nullable=True),
        Param("reducer_params", "object", {}, "arguments of the reducer (ThresholdReducer: low, high; "
                                              "PerAnchorReducer: reducer, reducer_params; ...)"),
    ]
    kinds = ["embedding"] + (["weight"] if issubclass(row.cls, _WeightRegularizerMixin) else [])
    for kind in kinds:
        common += [Param(f"{kind}_regularizer", "enum", None, f"{kind} regularizer by class name; null: none",
                         choices=tuple(_REGULARIZERS), nullable=True),
                   Param(f"{kind}_regularizer_params", "object", {}, "arguments of the regularizer (and its "
                                                                     "distance, reducer)"),
                   Param(f"{kind}_reg_weight", "float", 1.0, f"weight of the {kind} regularizer's loss")]
    if row.miner:
        common += [Param("miner", "enum", None, "miner by wire name; null: no miner", choices=tuple(_MINERS),
                         nullable=True),
                   Param("miner_params", "object", {}, "arguments of the miner (and its distance, "
                                                       "distance_params)")]
    return Schema((*own, *common))


def _make(name: str, row: _Row) -> type[Loss]:
    learnable = (" Learnable: a stateless call sends " + ", ".join(w for w, _ in row.weights) + "; a session holds "
                 "them.") if row.weights else ""
    return type(f"Pml{row.cls.__name__}", (_PmlLoss,), {
        "__module__": __name__,
        "__doc__": f"pytorch_metric_learning.losses.{row.cls.__name__} served as {name}.",
        "name": name,
        "description": f"pytorch-metric-learning {row.cls.__name__}.{learnable}",
        "inputs": _inputs(row),
        "schema": _schema(row),
        "stateful": row.learnable or bool(row.buffers),
        "complexity": row.complexity or ("n" if row.dim_axis else "n2"),
        "_row": row,
    })


SERVED: dict[str, type[Loss]] = {}
if _pml_losses is None:
    note_missing_extra("pml.", "pml")
else:
    for _name, _row in _ROWS.items():
        try:
            _cls = _make(_name, _row)
        except TypeError as _exc:  # a PML version whose signature we cannot type: serve the rest
            _log.warning("not serving %s: %s", _name, _exc)
            continue
        SERVED[_name] = register(_cls)

MINERS: tuple[str, ...] = tuple(_MINERS)
DISTANCES: tuple[str, ...] = tuple(_DISTANCES)
REDUCERS: tuple[str, ...] = tuple(_REDUCERS)
REGULARIZERS: tuple[str, ...] = tuple(_REGULARIZERS)

__all__ = ["DISTANCES", "MINERS", "REDUCERS", "REGULARIZERS", "SERVED", "STATELESS_SEED"]
