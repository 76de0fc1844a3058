"""embtrain.pml: a drop-in for pytorch-metric-learning's losses, computed by an embtrain server.

    from embtrain.pml import losses          # was: from pytorch_metric_learning import losses
    loss_func = losses.TripletMarginLoss(margin=0.1)
    loss = loss_func(embeddings, labels)      # the same numbers as PML 2.9, gradient included

See ``embtrain.pml.losses`` for what is served, and the README's "From pytorch-metric-learning". Needs PyTorch
(``embtrain[torch]``); PML's distance, reducer and regularizer objects, local weight initialisation and the
wrappers use pytorch-metric-learning on the client when it is installed (``embtrain[pml]``).
"""

from ._defaults import DEFAULT_TARGET, default_client, set_default_client

__all__ = ["DEFAULT_TARGET", "default_client", "losses", "set_default_client"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "losses":  # imported on first use: it needs torch
        import importlib

        return importlib.import_module(f"{__name__}.losses")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
