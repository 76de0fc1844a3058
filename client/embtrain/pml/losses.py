"""pytorch-metric-learning 2.9's loss classes, computed by an embtrain server.

    from embtrain.pml import losses          # was: from pytorch_metric_learning import losses
    loss_func = losses.ArcFaceLoss(num_classes=10, embedding_size=128)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_func.parameters()])
    loss = loss_func(embeddings, labels)     # PML's forward: (embeddings, labels, indices_tuple, ref_emb, ref_labels)
    loss.backward()

Every class takes PML's constructor arguments (the same names, defaults and required arguments) and one more
keyword, ``client=`` (an ``embtrain.Client`` or a target; default ``embtrain.pml.default_client()``). PML's
distance, reducer and regularizer objects are translated into the server's parameters; what cannot be (another
class, a custom function) is refused when the loss is built, naming the argument. With pytorch-metric-learning
installed on the client the PML loss is also built locally once, so a constructor refuses exactly what PML refuses
and learnable parameters start from exactly PML's initial values (and draw the same random numbers).

Learnable parameters (``W``, ``proxies``, ``fc``, ``weight``, ``beta`` with ``learn_beta``) are ``nn.Parameter`` s
of the module under PML's names (``state_dict`` is PML's): every call sends them and applies the gradients the
server returns, so the caller's optimiser trains them. Losses with state across calls (DynamicSoftMarginLoss's
histogram) run in a server session that the module opens at its first call and closes with ``close()`` or when it
is collected. ``CrossBatchMemory``, ``SelfSupervisedLoss`` and ``MultipleLosses`` are PML's own wrappers, running on
the client around these losses (they need pytorch-metric-learning installed on the client).

The loss value is PML's, in PML's dtype (the embeddings', and float32 for SmoothAPLoss); gradients come back in
each input's dtype and device. ``last_result`` keeps the server's last answer.

With ``reducer=DoNothingReducer()`` the forward returns PML's unreduced loss dictionary, ``{sub_loss: {"losses",
"indices", "reduction_type"}}``, rebuilt from the server's answer (the same keys, indices, reduction types and
element values; ``embtrain.pml._lossdict``), its element tensors differentiable: reduce or weight them as you like,
and the backward sends the upstream gradient of every element to the server in a second call (``element_weights``),
which returns the vector-Jacobian product for the embeddings, ``ref_emb`` and the learnable parameters. That call
computes the same elements (random triplets of ``triplets_per_anchor`` are sent back; the indices are checked). A
loss with state across calls (DynamicSoftMarginLoss) refuses DoNothingReducer: the second call would update it twice.
"""

from __future__ import annotations

import copy
import inspect
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("embtrain.pml needs PyTorch: pip install 'embtrain[torch]'") from exc

import grpc

from .._client import Client, ComputeResult, Session
from ..errors import FailedPrecondition, invalid_argument
from . import _lossdict, _translate
from ._defaults import default_client

try:
    from pytorch_metric_learning import losses as _pml
except ImportError:  # the losses work without it; the wrappers need it
    _pml = None

_REQ = inspect.Parameter.empty
PAIR_INPUTS = ("indices_a1", "indices_p", "indices_a2", "indices_n")


@dataclass(frozen=True)
class _Spec:
    """One PML 2.9 loss class as the client sees it."""

    positional: tuple[tuple[str, Any], ...] = ()   # (name, default or _REQ), positional-or-keyword
    keyword: tuple[tuple[str, Any], ...] = ()      # keyword-only arguments of the class itself
    weights: tuple[str, ...] = ()                  # learnable nn.Parameters, by PML attribute name
    weight_mixin: bool = False                     # WeightRegularizerMixin: weight_regularizer, weight_init_func
    stateful: bool = False                         # buffers that persist across calls: runs in a session
    loss_dtype: torch.dtype | None = None          # PML's loss dtype when not the embeddings' (SmoothAP)


_CLASSES = (("num_classes", _REQ), ("embedding_size", _REQ))
_SPECS: dict[str, _Spec] = {
    "AngularLoss": _Spec((("alpha", 40),)),
    "ArcFaceLoss": _Spec((*_CLASSES, ("margin", 28.6), ("scale", 64)), weights=("W",), weight_mixin=True),
    "CircleLoss": _Spec((("m", 0.4), ("gamma", 80))),
    "ContrastiveLoss": _Spec((("pos_margin", 0), ("neg_margin", 1))),
    "CosFaceLoss": _Spec(_CLASSES, (("margin", 0.35), ("scale", 64)), weights=("W",), weight_mixin=True),
    "DynamicSoftMarginLoss": _Spec((("min_val", -2.0), ("num_bins", 10), ("momentum", 0.01)), stateful=True),
    "FastAPLoss": _Spec((("num_bins", 10),)),
    "GeneralizedLiftedStructureLoss": _Spec((("neg_margin", 1), ("pos_margin", 0))),
    "HistogramLoss": _Spec((("n_bins", None), ("delta", None))),
    "InstanceLoss": _Spec((("gamma", 64),)),
    "IntraPairVarianceLoss": _Spec((("pos_eps", 0.01), ("neg_eps", 0.01))),
    "LargeMarginSoftmaxLoss": _Spec((*_CLASSES, ("margin", 4), ("scale", 1)), weights=("W",), weight_mixin=True),
    "LiftedStructureLoss": _Spec((("neg_margin", 1), ("pos_margin", 0))),
    "MarginLoss": _Spec((("margin", 0.2), ("nu", 0), ("beta", 1.2), ("triplets_per_anchor", "all"),
                         ("learn_beta", False), ("num_classes", None)), weights=("beta",)),
    "MultiSimilarityLoss": _Spec((("alpha", 2), ("beta", 50), ("base", 0.5))),
    "NCALoss": _Spec((("softmax_scale", 1),)),
    "NPairsLoss": _Spec(),
    "NTXentLoss": _Spec((("temperature", 0.07),)),
    "NormalizedSoftmaxLoss": _Spec((*_CLASSES, ("temperature", 0.05)), weights=("W",), weight_mixin=True),
    "P2SGradLoss": _Spec((("descriptors_dim", _REQ), ("num_classes", _REQ)), weights=("weight",)),
    "PNPLoss": _Spec((("b", 2), ("alpha", 1), ("anneal", 0.01), ("variant", "O"))),
    "ProxyAnchorLoss": _Spec((*_CLASSES, ("margin", 0.1), ("alpha", 32)), weights=("proxies",), weight_mixin=True),
    "ProxyNCALoss": _Spec(_CLASSES, (("softmax_scale", 1),), weights=("proxies",), weight_mixin=True),
    "RankedListLoss": _Spec((("margin", _REQ), ("Tn", _REQ), ("imbalance", 0.5), ("alpha", None), ("Tp", 0))),
    "SignalToNoiseRatioContrastiveLoss": _Spec((), (("pos_margin", 0), ("neg_margin", 1))),
    "SmoothAPLoss": _Spec((("temperature", 0.01),), loss_dtype=torch.float32),
    "SoftTripleLoss": _Spec((*_CLASSES, ("centers_per_class", 10), ("la", 20), ("gamma", 0.1), ("margin", 0.01)),
                            weights=("fc",), weight_mixin=True),
    "SphereFaceLoss": _Spec((*_CLASSES, ("margin", 4), ("scale", 1)), weights=("W",), weight_mixin=True),
    # PML 2.9 reads num_classes and embedding_size from **kwargs here: keyword-only.
    "SubCenterArcFaceLoss": _Spec((), (*_CLASSES, ("margin", 28.6), ("scale", 64), ("sub_centers", 3)),
                                  weights=("W",), weight_mixin=True),
    "SupConLoss": _Spec((("temperature", 0.1),)),
    "ThresholdConsistentMarginLoss": _Spec((("lambda_plus", 1.0), ("lambda_minus", 1.0), ("margin_plus", 0.9),
                                            ("margin_minus", 0.5))),
    "TripletMarginLoss": _Spec((("margin", 0.05), ("swap", False), ("smooth_loss", False),
                                ("triplets_per_anchor", "all"))),
    "TupletMarginLoss": _Spec((("margin", 5.73), ("scale", 64))),
}
# Keyword arguments every PML loss takes through its bases, and those of the losses with weights.
_BASE = (("distance", None), ("reducer", None), ("embedding_regularizer", None), ("embedding_reg_weight", 1),
         ("collect_stats", None))
_WEIGHTED = (("weight_regularizer", None), ("weight_reg_weight", 1), ("weight_init_func", None))

SERVED: tuple[str, ...] = tuple(_SPECS)


def _signature(spec: _Spec) -> inspect.Signature:
    P = inspect.Parameter
    params = [P(name, P.POSITIONAL_OR_KEYWORD, default=default) for name, default in spec.positional]
    keyword = [*spec.keyword, *(_WEIGHTED if spec.weight_mixin else ()), *_BASE, ("client", None)]
    params += [P(name, P.KEYWORD_ONLY, default=default) for name, default in keyword]
    return inspect.Signature(params)


class _Apply(torch.autograd.Function):
    """Forward: the server's loss value. Backward: ``grad_output`` times the server's gradient of each input, in
    that input's dtype and on its device."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, grads: tuple[torch.Tensor | None, ...],
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        ctx.like = [(t.dtype, t.device) for t in tensors]
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        out = []
        for g, (dtype, device) in zip(ctx.grads, ctx.like):
            if g is None:
                out.append(None)
            else:
                g = g.to(device)
                out.append((grad_output.to(device, g.dtype) * g).to(dtype))
        return (None, None, *out)


class _Elements(torch.autograd.Function):
    """DoNothingReducer. Forward: the elements of PML's loss dictionary (as the server computed them). Backward:
    the upstream gradient of every element (zeros where the caller did not use one) goes to the server, which
    returns the vector-Jacobian product (the gradient of ``sum_e w_e * element_e``) for each input."""

    @staticmethod
    def forward(ctx: Any, vjp: Any, values: list[torch.Tensor], batch: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.vjp = vjp
        ctx.like = [(t.dtype, t.device) for t in tensors]
        # The first ``batch`` inputs are what the second call sends (embeddings, ref_emb): modified in place before
        # the backward, autograd refuses, as it does in-process.
        ctx.save_for_backward(*tensors[:batch])
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        ctx.saved_tensors  # noqa: B018 - the version check of the batch
        grads = ctx.vjp(grad_outputs)
        out = [None if g is None else g.to(device, dtype) for g, (dtype, device) in zip(grads, ctx.like)]
        return (None, None, None, *out)


def _close_session(session: Session) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - the server may be gone at exit; the session then expires there
        pass


class RemoteMetricLoss(nn.Module):
    """Base of the ``embtrain.pml.losses`` classes: one PML loss configuration, computed remotely."""

    pml_name: ClassVar[str]
    _spec: ClassVar[_Spec]
    _sig: ClassVar[inspect.Signature]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        try:
            bound = self._sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.pml_name}: {exc}") from None
        given = dict(bound.arguments)
        client = given.pop("client", None)
        self._client: Client | None = Client(client) if isinstance(client, str) else client
        spec = self._spec
        # The wire parameters: the arguments given (the server's defaults are PML's), objects translated.
        self.wire_params = _translate.wire_params(given, spec.weight_mixin)
        self.wire_name = f"pml.{self.pml_name}"
        # DoNothingReducer: the forward returns PML's unreduced loss dictionary (see ``_loss_dict``).
        self._nothing = self.wire_params.get("reducer") == "DoNothingReducer"
        if self._nothing and spec.stateful:
            raise invalid_argument("reducer", f"DoNothingReducer is not served for {self.pml_name}: its state "
                                   "(a server session) changes with every call, and the backward of your own "
                                   "reduction of the loss dictionary needs a second call, which would update it "
                                   "twice and differentiate another loss; use a reducing reducer")
        bound.apply_defaults()
        self._args = {k: v for k, v in bound.arguments.items() if k != "client"}
        self.last_result: ComputeResult | None = None
        self._session: Session | None = None
        self._step = 0
        self._finalizer: Any = None
        names = spec.weights if spec.weights != ("beta",) or self._args["learn_beta"] else ()
        self._weight_names: tuple[str, ...] = names
        local = self._build_locally(given)
        for name in names:
            init = getattr(local, name).detach().clone() if local is not None else _init_weight(
                self.pml_name, name, self._args)
            setattr(self, name, nn.Parameter(init))

    def _build_locally(self, given: Mapping[str, Any]) -> nn.Module | None:
        """PML's own loss, built once from the same arguments when PML is installed: it refuses what PML refuses
        and holds PML's initial weights (drawn from the global generator, as in-process PML draws them)."""
        if _pml is None:
            return None
        return getattr(_pml, self.pml_name)(**given)

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.wire_params.items())
        return f"{self.wire_name}({shown})"

    @property
    def client(self) -> Client:
        """The client this loss calls (the shared default one unless ``client=`` was given)."""
        if self._client is None:
            self._client = default_client()
        return self._client

    _LOCAL = ("_session", "_finalizer", "last_result")  # what a copy does not take over

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteMetricLoss:
        """A copy shares the client (a connection is not copied) and opens its own session when it needs one."""
        if self._client is not None:
            memo[id(self._client)] = self._client
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}
        new.__dict__.update(copy.deepcopy(state, memo))
        new._session, new._finalizer, new.last_result, new._step = None, None, None, 0
        return new

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save(module)``) without its connection: the loaded loss uses the default client."""
        state = {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}
        state.update(_client=None, _session=None, _finalizer=None, last_result=None, _step=0)
        return state

    def close(self) -> None:
        """Close the server session of a loss with state across calls (a no-op for the others)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._session = None
        self._step = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None, indices_tuple: Any = None,
                ref_emb: torch.Tensor | None = None, ref_labels: torch.Tensor | None = None) -> Any:
        inputs: dict[str, Any] = {}
        if labels is not None and not torch.is_tensor(labels):
            labels = torch.as_tensor(labels)
        if indices_tuple is not None:
            if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
                raise invalid_argument("indices_tuple", "expected (anchors, positives, negatives) or (anchors1, "
                                       "positives, anchors2, negatives)")
            if len(indices_tuple) == 3:
                inputs["triplets"] = torch.stack([torch.as_tensor(t).to(torch.int64) for t in indices_tuple], 1)
            else:
                inputs.update(zip(PAIR_INPUTS, indices_tuple))
        # PML ignores ref_labels without ref_emb, and ref_emb=embeddings with ref_labels=labels is its default.
        if ref_emb is not None and not (ref_emb is embeddings and ref_labels is labels):
            inputs["ref_emb"] = ref_emb
            if ref_labels is not None:
                inputs["ref_labels"] = ref_labels if torch.is_tensor(ref_labels) else torch.as_tensor(ref_labels)
        weights = {name: getattr(self, name) for name in self._weight_names}
        inputs.update(weights)
        differentiable = {"embeddings": embeddings, **({"ref_emb": inputs["ref_emb"]} if "ref_emb" in inputs else {}),
                          **weights}
        want_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable.values())
        if self._nothing:
            return self._loss_dict(embeddings, labels, inputs, differentiable, want_grad,
                                   resample=indices_tuple is None)
        r = self._call(embeddings, labels, inputs, want_grad)
        self.last_result = r
        self._after_call(embeddings)
        value = torch.tensor(r.loss, dtype=self._spec.loss_dtype or embeddings.dtype, device=embeddings.device)
        if not want_grad:
            return value
        names = [k for k, t in differentiable.items() if t.requires_grad]
        grads = tuple(r.gradients.get(k) for k in names)
        return _Apply.apply(value, grads, *(differentiable[k] for k in names))

    def _after_call(self, embeddings: torch.Tensor) -> None:
        if self.pml_name == "P2SGradLoss":
            # PML renormalises its weight in place in every forward (and moves it to the embeddings' dtype): the
            # server computed with exactly this, and the optimiser steps from it.
            with torch.no_grad():
                w = self.weight
                w.data = w.data.renorm(2, 1, 1e-5).mul(1e5).to(embeddings.device, embeddings.dtype)

    def _loss_dict(self, embeddings: torch.Tensor, labels: Any, inputs: dict[str, Any],
                   differentiable: dict[str, torch.Tensor], want_grad: bool, resample: bool) -> dict[str, Any]:
        """DoNothingReducer: PML's unreduced loss dictionary, its element tensors differentiable.

        The first call returns the dictionary (packed in per_item_losses); the backward makes a second call with the
        same inputs and ``element_weights`` (the upstream gradient of every element), whose gradients are the
        vector-Jacobian product. The second call must compute the same elements: where the server samples
        (``triplets_per_anchor`` an integer, no ``indices_tuple``) it is sent the first call's triplets, and its
        dictionary's indices are checked against the first one's in any case."""
        # What the second call sends: the weights as this call sends them (P2SGrad renormalises its own after it).
        sent = {k: (v.detach().clone() if k in self._weight_names else v) for k, v in inputs.items()}
        r = self._call(embeddings, labels, inputs, False)
        self.last_result = r
        self._after_call(embeddings)
        unpacked = _lossdict.unpack(r.per_item_losses, embeddings.device)
        values = unpacked.element_tensors()
        names = [k for k, t in differentiable.items() if t.requires_grad]
        if not want_grad or not values or not names:
            return unpacked.value
        if resample and self._args.get("triplets_per_anchor", "all") != "all":
            triplets = unpacked.triplets()
            if triplets is not None:
                sent["triplets"] = triplets
        dtype = values[0].dtype
        for v in values[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        batch = embeddings.detach()

        def vjp(grad_outputs: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
            w = torch.cat([(torch.zeros(v.numel(), dtype=dtype) if g is None else
                            g.detach().reshape(-1).to("cpu", dtype)) for g, v in zip(grad_outputs, values)])
            back = self.client.compute(batch, labels, loss=self.wire_name, params=self.wire_params,
                                       return_gradient=True, return_triplets=False, element_weights=w, **sent)
            again = _lossdict.unpack(back.per_item_losses)
            if not torch.equal(again.structure, unpacked.structure):
                raise FailedPrecondition(grpc.StatusCode.FAILED_PRECONDITION, f"{self.pml_name}: the server "
                                         "computed other elements (indices) for the backward than for the forward "
                                         "of this loss dictionary; the gradient would be another loss's")
            return [back.gradients.get(k) for k in names]

        batch_inputs = sum(k in ("embeddings", "ref_emb") for k in names)  # first in ``names``
        outs = _Elements.apply(vjp, values, batch_inputs, *(differentiable[k] for k in names))
        for (holder, key), out in zip(unpacked.elements, outs):
            holder[key] = out
        return unpacked.value

    def _call(self, embeddings: torch.Tensor, labels: Any, inputs: dict[str, Any], want_grad: bool) -> ComputeResult:
        if not self._spec.stateful:
            return self.client.compute(embeddings, labels, loss=self.wire_name, params=self.wire_params,
                                       return_gradient=want_grad, return_triplets=False, **inputs)
        if self._session is None:
            self._session = self.client.create_session(self.wire_name, self.wire_params)
            self._step = 0
            self._finalizer = weakref.finalize(self, _close_session, self._session)
        r = self._session.compute(embeddings, labels, return_gradient=want_grad, return_triplets=False,
                                  step=self._step + 1, **inputs)
        self._step = r.step
        return r


def _init_weight(pml_name: str, name: str, args: Mapping[str, Any]) -> torch.Tensor:
    """PML 2.9's initial value of a learnable parameter, for a client without pytorch-metric-learning: the same
    shapes, init functions and draws from the global generator as PML's constructors."""
    if pml_name == "MarginLoss":
        beta = torch.tensor([float(args["beta"])])
        return torch.ones(args["num_classes"]) * beta if args["num_classes"] else beta
    k, d = args["num_classes"], args.get("embedding_size")
    if pml_name == "P2SGradLoss":
        return torch.empty(args["descriptors_dim"], k).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
    shape = {"ProxyAnchorLoss": (k, d), "ProxyNCALoss": (k, d),
             "SoftTripleLoss": (d, k * args.get("centers_per_class", 10)),
             "SubCenterArcFaceLoss": (d, k * args.get("sub_centers", 3))}.get(pml_name, (d, k))
    default = {"ProxyAnchorLoss": lambda t: nn.init.kaiming_normal_(t, mode="fan_out"),
               "SoftTripleLoss": lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))}.get(pml_name, nn.init.normal_)
    weight = nn.Parameter(torch.empty(*shape))
    (args.get("weight_init_func") or default)(weight)
    return weight.detach()


def _make(pml_name: str, spec: _Spec) -> type[RemoteMetricLoss]:
    sig = _signature(spec)
    cls = type(pml_name, (RemoteMetricLoss,), {
        "__module__": __name__,
        "__doc__": f"pytorch_metric_learning.losses.{pml_name}, computed by the server as ``pml.{pml_name}``.\n\n"
                   f"Arguments as PML 2.9's{'; learnable: ' + ', '.join(spec.weights) if spec.weights else ''}"
                   f"{'; runs in a server session (state across calls)' if spec.stateful else ''}. ``client``: an "
                   "``embtrain.Client`` or a target (default: ``embtrain.pml.default_client()``).",
        "pml_name": pml_name,
        "_spec": spec,
        "_sig": sig,
    })
    # What help() and inspect show: PML's arguments plus client=.
    cls.__signature__ = sig  # type: ignore[attr-defined]
    return cls


for _name, _s in _SPECS.items():
    globals()[_name] = _make(_name, _s)

# PML's wrappers run here, around the remote losses (their names are PML's, so PML's support checks accept them).
_WRAPPERS = ("CrossBatchMemory", "SelfSupervisedLoss", "MultipleLosses")
if _pml is not None:
    CrossBatchMemory = _pml.CrossBatchMemory
    SelfSupervisedLoss = _pml.SelfSupervisedLoss
    MultipleLosses = _pml.MultipleLosses


def __getattr__(name: str) -> Any:
    if name in _WRAPPERS:
        raise ImportError(f"embtrain.pml.losses.{name} is pytorch-metric-learning's own wrapper, run on the client "
                          "around the remote losses: install it there too (pip install 'embtrain[pml]')")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PAIR_INPUTS", "SERVED", "RemoteMetricLoss", *SERVED, *_WRAPPERS]
