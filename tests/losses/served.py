"""Run a loss the way the service runs a stateless batch: the generic request validation, the loss's own input
checks, then the compute layer (``compute.run``). The loss tests call losses through here, so the numbers they
check are the numbers the server computes, device moves, dtypes and gradient plumbing included.

What ``compute.run`` does not take (a cross-batch memory, a session's ``update``) stays with the tests that need
it: they call ``loss.forward`` themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from embtrain_server import compute
from embtrain_server.losses import Loss
from embtrain_server.validation import validate_inputs

# No element limit here: the tests size their own batches.
MAX_BATCH_ELEMENTS = 1 << 40
ALL_TRIPLETS = 1 << 30


def validated(loss: Loss, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The service's checks on CPU tensors, in its order: generic validation, then ``loss.check_inputs``."""
    inputs = validate_inputs(type(loss), dict(raw), max_batch_elements=MAX_BATCH_ELEMENTS)
    loss.check_inputs(inputs)
    return inputs


def serve(loss: Loss, raw: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
          compute_dtype: str = "input", max_triplets: int = ALL_TRIPLETS, per_item: bool = True,
          gradient: bool = True, triplets: bool = True) -> compute.ComputeResult:
    """Validate ``raw`` (CPU tensors) and compute one stateless batch on ``device``; results come back on the CPU,
    gradients in each input's dtype."""
    inputs = validated(loss, raw)
    options = compute.ComputeOptions(gradient=gradient, triplets=triplets, max_triplets=max_triplets,
                                     per_item=per_item)
    return compute.run(loss, inputs, device=torch.device(device), compute_dtype=compute_dtype, options=options)
