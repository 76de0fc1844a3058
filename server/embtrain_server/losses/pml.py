"""pytorch-metric-learning (PML) losses, served as ``pml.<ClassName>`` when the ``pml`` extra is installed.

Only an explicit allow-list is reachable from the wire: the loss classes in ``_ROWS``, the distances in
``_DISTANCES``, the reducers in ``_REDUCERS`` and the miners in ``_MINERS``. Wire strings are looked up in these
dicts only, never with ``getattr`` on a PML module, so nothing else in the PML namespace can be instantiated.

Parameters are the loss constructor's own (derived from its signature, JSON-able types only, with a few
overrides for types the signature does not tell), plus

* ``distance`` / ``distance_params``: a distance by class name (``"LpDistance"``, ...) and its arguments;
* ``reducer`` / ``reducer_params``: a reducer by class name and its arguments;
* ``miner`` / ``miner_params``: a miner by wire name ``"pml.<MinerClassName>"`` and its arguments (which may
  hold their own ``distance`` / ``distance_params``); absent for the losses that refuse mined indices.

``null`` for ``distance``, ``reducer`` or ``miner`` keeps the loss's own default.

Losses with learnable parameters (ArcFace, CosFace, ProxyAnchor, SoftTriple, ...) are ``stateful``: in a session
``init_state`` builds the PML module (weights seeded from the session generator), ``state_tensors`` hands its
``nn.Parameter`` s to the session optimiser, and the weights persist across batches. A stateless request builds
them fresh (seed 0) for that request only, which is useful for evaluation at most. ``embedding_size`` (or
``descriptors_dim``) defaults to the width of the first batch. ``DynamicSoftMarginLoss`` keeps a running
histogram: it is computed in ``forward`` and committed in ``update``.

With a triplet miner (one that returns ``(a, p, n)``), the response's triplets are the miner's *selected*
triplets, sorted and de-duplicated: PML does not say which of them have a positive loss. Pair miners and
losses without a miner return none. Cross-batch memory is not used by PML losses.

Left out of the allow-list: the abstract bases (``BaseMetricLossFunction``, ``GenericPairLoss``,
``BaseLossWrapper``); the wrappers ``CrossBatchMemory`` (the service has its own memory), ``MultipleLosses`` and
``SelfSupervisedLoss`` (they take loss objects); ``VICRegLoss`` (pairs of views, no labels); ``ManifoldLoss``
(refuses labels, draws random meta-classes per call). Among reducers: ``DoNothingReducer`` (not a scalar),
``DivisorReducer`` (only meaningful as some losses' default), ``ClassWeightedReducer``, ``PerAnchorReducer``
and ``MultipleReducers`` (they take tensors, functions or reducer objects). Among miners:
``EmbeddingsAlreadyPackagedAsTriplets`` (a batch layout, not a miner).
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
from .base import EMBEDDINGS, LABELS, ComputeContext, Loss, LossOutput, note_missing_extra, register

try:  # imported once, here; the rest of the module only uses the dicts built from it
    from pytorch_metric_learning import distances as _pml_distances
    from pytorch_metric_learning import losses as _pml_losses
    from pytorch_metric_learning import miners as _pml_miners
    from pytorch_metric_learning import reducers as _pml_reducers
except ImportError:  # the optional 'pml' extra is not installed
    _pml_losses = None

_log = logging.getLogger(__name__)

# Seed of the weights a learnable loss gets in a stateless request (no session generator to draw from).
STATELESS_SEED = 0
# Embedding width used only to validate a learnable loss's constructor arguments at parse time (cheap).
_PROBE_DIM = 1

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
    "triplets_per_anchor": Param("triplets_per_anchor", "int", None, "triplets sampled per anchor; null: all",
                                 minimum=1, nullable=True),
}
# Names the services's own conventions supply; never offered as parameters.
_INTERNAL = {"embedding_regularizer", "embedding_reg_weight", "weight_regularizer", "weight_reg_weight",
             "weight_init_func", "collect_stats", "distance", "reducer", "mat_based_loss"}


@dataclass(frozen=True)
class _Row:
    """One allow-listed PML loss class and what the generic code needs to know about it."""

    cls: type
    learnable: bool = False            # holds nn.Parameters -> stateful
    dim_param: str | None = None       # constructor argument that is the embedding width
    dim_axis: tuple[str, int] | None = None  # (parameter, axis) where that width shows in the state tensors
    classes_param: str | None = None   # labels must lie in [0, params[classes_param])
    miner: bool = True                 # accepts mined indices
    buffers: tuple[str, ...] = ()      # non-parameter state updated by forward (committed in update)
    class_blocks: bool = False         # labels must come in contiguous, equally sized class blocks
    required: tuple[str, ...] = ()
    overrides: tuple[Param, ...] = ()
    complexity: str | None = None      # memory growth for the batch estimate; None: from dim_axis


def _float(name: str, default: float | None, description: str, **kw: Any) -> Param:
    return Param(name, "float", default, description, **kw)


if _pml_losses is not None:
    _L = _pml_losses
    _CLASSIFIER = {"dim_param": "embedding_size", "classes_param": "num_classes", "learnable": True,
                   "required": ("num_classes",)}
    _ROWS: dict[str, _Row] = {f"pml.{r.cls.__name__}": r for r in (
        _Row(_L.AngularLoss),
        _Row(_L.ArcFaceLoss, dim_axis=("W", 0), **_CLASSIFIER),
        _Row(_L.CircleLoss),
        _Row(_L.ContrastiveLoss),
        _Row(_L.CosFaceLoss, dim_axis=("W", 0), **_CLASSIFIER),
        _Row(_L.DynamicSoftMarginLoss, buffers=("hist_",)),
        _Row(_L.FastAPLoss),
        _Row(_L.GeneralizedLiftedStructureLoss),
        _Row(_L.HistogramLoss, overrides=(
            Param("n_bins", "int", None, "number of bins (delta = 2/n_bins); null with delta null: 100",
                  minimum=1, nullable=True),
            _float("delta", None, "bin width; null: 2/n_bins", minimum=0.0, exclusive_minimum=True,
                   nullable=True))),
        _Row(_L.InstanceLoss, miner=False),
        _Row(_L.IntraPairVarianceLoss),
        _Row(_L.LargeMarginSoftmaxLoss, dim_axis=("W", 0), overrides=(
            Param("margin", "int", 4, "angular margin multiplier m", minimum=1),), **_CLASSIFIER),
        _Row(_L.LiftedStructureLoss),
        _Row(_L.MarginLoss, learnable=True, classes_param="num_classes", overrides=(
            Param("num_classes", "int", None, "one beta per class; null: a single beta", minimum=1,
                  nullable=True),)),
        _Row(_L.MultiSimilarityLoss),
        _Row(_L.NCALoss),
        _Row(_L.NPairsLoss),
        _Row(_L.NTXentLoss),
        _Row(_L.NormalizedSoftmaxLoss, dim_axis=("W", 0), **_CLASSIFIER),
        _Row(_L.P2SGradLoss, learnable=True, dim_param="descriptors_dim", dim_axis=("weight", 0),
             classes_param="num_classes", miner=False, required=("num_classes",)),
        _Row(_L.PNPLoss, miner=False, complexity="n3", overrides=(
            Param("variant", "enum", "O", "PNP variant", choices=("Ds", "Dq", "Iu", "Ib", "O")),)),
        _Row(_L.ProxyAnchorLoss, dim_axis=("proxies", 1), **_CLASSIFIER),
        _Row(_L.ProxyNCALoss, dim_axis=("proxies", 1), **_CLASSIFIER),
        _Row(_L.RankedListLoss, miner=False, required=("margin", "Tn"), overrides=(
            _float("margin", None, "margin between the positive and the negative set (required)"),
            _float("Tn", None, "temperature of the negative weighting (required)"),
            _float("imbalance", 0.5, "weight of the negative part", minimum=0.0, maximum=1.0),
            _float("alpha", None, "boundary of the negative set; null: 1 + margin/2", nullable=True))),
        _Row(_L.SignalToNoiseRatioContrastiveLoss),
        _Row(_L.SmoothAPLoss, class_blocks=True, complexity="n3"),
        _Row(_L.SoftTripleLoss, dim_axis=("fc", 0), **_CLASSIFIER),
        _Row(_L.SphereFaceLoss, dim_axis=("W", 0), overrides=(
            Param("margin", "int", 4, "angular margin multiplier m", minimum=1),), **_CLASSIFIER),
        _Row(_L.SubCenterArcFaceLoss, dim_axis=("W", 0), **_CLASSIFIER),
        _Row(_L.SupConLoss),
        _Row(_L.ThresholdConsistentMarginLoss),
        _Row(_L.TripletMarginLoss),
        _Row(_L.TupletMarginLoss),
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
    _REDUCERS: dict[str, tuple[type, Schema]] = {
        "MeanReducer": (_pml_reducers.MeanReducer, Schema()),
        "AvgNonZeroReducer": (_pml_reducers.AvgNonZeroReducer, Schema()),
        "SumReducer": (_pml_reducers.SumReducer, Schema()),
        "ThresholdReducer": (_pml_reducers.ThresholdReducer, Schema((
            _float("low", None, "keep losses above this (at least one of low/high)", nullable=True),
            _float("high", None, "keep losses below this", nullable=True)))),
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


def _reducer(name: str | None, values: Mapping[str, Any]) -> Any:
    if name is None:
        if values:
            raise invalid("params.reducer_params", "set params.reducer too (reducer_params without a reducer)")
        return None
    cls, schema = _REDUCERS[name]
    parsed = schema.parse(values, prefix="params.reducer_params")
    try:
        return cls(**parsed)
    except (AssertionError, ValueError, TypeError) as exc:
        raise invalid("params.reducer_params", f"{name} refused these arguments: {_why(exc)}") from exc


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
        self._ctor = {k: v for k, v in p.items() if k not in ("distance", "distance_params", "reducer",
                                                               "reducer_params", "miner", "miner_params")}
        if "triplets_per_anchor" in self._ctor and self._ctor["triplets_per_anchor"] is None:
            self._ctor["triplets_per_anchor"] = "all"
        for key in ("n_bins", "delta", "alpha"):  # PML tells "unset" by None: keep it out of the call
            if key in self._ctor and self._ctor[key] is None:
                del self._ctor[key]
        self._miner = _miner(p.get("miner"), p.get("miner_params", {}))
        self._module: torch.nn.Module | None = None
        self._dim: int | None = None
        self._pending: dict[str, torch.Tensor] = {}
        # Validate every argument now (PML checks some in its constructor); learnable ones at a tiny width and with
        # one class, so that parsing allocates nothing however many classes are asked for (see ``state_bytes``).
        classes = row.classes_param if row.learnable and row.classes_param in self._ctor else None
        probe = self._build(_PROBE_DIM, STATELESS_SEED, **({classes: 1} if classes else {}))
        if not self._row.learnable and self._row.dim_param is None:
            self._module = probe

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
        reducer = _reducer(p["reducer"], p["reducer_params"])
        objects = {k: v for k, v in (("distance", distance), ("reducer", reducer)) if v is not None}
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
        emb, labels = inputs.get("embeddings"), inputs.get("labels")
        if emb is None or labels is None:
            missing = "embeddings" if emb is None else "labels"
            raise invalid(f"inputs.{missing}", f"required input missing ({self.name} takes embeddings, labels)")
        if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
            raise invalid("inputs.embeddings", f"shape {list(emb.shape)}, expected [n, d] with n, d >= 1")
        n, d = emb.shape
        if labels.shape != (n,):
            raise invalid("inputs.labels", f"shape {list(labels.shape)}, expected [{n}] (one per embedding row)")
        row, p = self._row, self.params
        want = self._dim if self._dim is not None else (p.get(row.dim_param) if row.dim_param else None)
        if want is not None and d != want:
            source = "the session state" if self._dim else f"params.{row.dim_param}"
            raise invalid("inputs.embeddings", f"width {d}, expected {want} ({source})")
        if row.classes_param and p.get(row.classes_param) is not None:
            k = p[row.classes_param]
            bad = (labels < 0) | (labels >= k)
            if bool(bad.any()):
                raise invalid("inputs.labels", f"label {labels[bad][0].item()} out of range; expected "
                                               f"0 <= label < params.{row.classes_param} ({k})")
        if row.class_blocks:
            _check_class_blocks(labels)

    # ---- compute ----------------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor], ctx: ComputeContext) -> LossOutput:
        if ctx.memory is not None and ctx.memory.embeddings.shape[0] > 0:
            raise FailedPrecondition(f"{self.name} does not use cross-batch memory; create the session without it",
                                     field="memory")
        emb, labels = inputs["embeddings"], inputs["labels"]
        if self._module is None:
            # Stateless request of a learnable loss: fresh weights for this request only.
            self._module = self._build(emb.shape[1], STATELESS_SEED).to(emb.device)
            self._dim = emb.shape[1]
        module = self._module
        saved = {b: getattr(module, b) for b in self._row.buffers}
        try:
            indices = self._miner(emb, labels) if self._miner is not None else None
            loss = module(emb, labels, indices_tuple=indices)
            # forward must not change state: the updated buffers wait for ``update``.
            self._pending = {b: getattr(module, b).detach() for b in self._row.buffers}
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            if is_out_of_memory(exc):
                raise  # a capacity problem, not the caller's input
            raise InvalidArgument(f"{self.name}: pytorch-metric-learning rejected the inputs: "
                                  f"{_why(exc)}", field="inputs") from exc
        finally:
            for b, value in saved.items():
                setattr(module, b, value)
        if not torch.is_tensor(loss):
            loss = torch.as_tensor(float(loss), dtype=emb.dtype, device=emb.device)
        loss = loss.reshape(()).to(emb.dtype)
        if not bool(torch.isfinite(loss.detach())):
            # PML does not guard every degenerate batch (e.g. NCALoss when no sample has a positive).
            raise InvalidArgument(f"{self.name}: pytorch-metric-learning returned a non-finite loss for this batch "
                                  "(degenerate for this loss: check that classes repeat and embeddings differ)",
                                  field="inputs.embeddings")
        if not loss.requires_grad and emb.requires_grad:
            loss = loss + 0.0 * emb.sum()  # keep the graph so the gradient is an explicit zero
        out = LossOutput(loss=loss)
        if indices is not None:
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
        if self._module is None:
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
        Param("reducer_params", "object", {}, "arguments of the reducer (ThresholdReducer: low, high)"),
    ]
    if row.miner:
        common += [Param("miner", "enum", None, "miner by wire name; null: no miner", choices=tuple(_MINERS),
                         nullable=True),
                   Param("miner_params", "object", {}, "arguments of the miner (and its distance, "
                                                       "distance_params)")]
    return Schema((*own, *common))


def _make(name: str, row: _Row) -> type[Loss]:
    learnable = " Learnable: keeps its weights in a session (stateless: fresh weights, evaluation only)." \
        if row.learnable else ""
    return type(f"Pml{row.cls.__name__}", (_PmlLoss,), {
        "__module__": __name__,
        "__doc__": f"pytorch_metric_learning.losses.{row.cls.__name__} served as {name}.",
        "name": name,
        "description": f"pytorch-metric-learning {row.cls.__name__} on (embeddings, labels).{learnable}",
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

__all__ = ["DISTANCES", "MINERS", "REDUCERS", "SERVED", "STATELESS_SEED"]
