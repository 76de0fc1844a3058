"""embtrain: the client SDK of the remote loss-and-mining service.

    import embtrain
    with embtrain.Client("127.0.0.1:50051") as client:
        r = client.compute(X, labels=y, loss="batch_hard_triplet", params={"margin": 0.3})
        r.loss, r.gradient, r.triplets

``embtrain.torch`` (extra ``embtrain[torch]``) adds ``RemoteLoss``, an ``nn.Module`` whose backward applies the
server's gradient, and ``load_head``.
"""

from ._client import (Client, ComputeResult, ExportedModel, LossInfo, Member, Session, SessionInfo,
                      replica_addresses)
from .errors import (
    Aborted,
    DeadlineExceeded,
    EmbtrainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "Aborted", "Client", "ComputeResult", "DeadlineExceeded", "EmbtrainError", "ExportedModel", "FailedPrecondition",
    "FieldViolation", "InvalidArgument", "LossInfo", "Member", "NotFound", "PermissionDenied", "ResourceExhausted", "Session",
    "SessionInfo", "Unauthenticated", "Unavailable", "replica_addresses",
]
