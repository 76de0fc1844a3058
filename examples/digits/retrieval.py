"""Retrieval metrics of an embedding space: Recall@1 and MAP@R (Musgrave et al., "A Metric Learning Reality
Check", ECCV 2020), leave-one-out over one labelled set.

Every sample is a query against all the *other* samples. A query whose class has no other sample cannot retrieve
anything relevant and is left out of both means. Neighbours are ranked by Euclidean distance (on L2-normalised
embeddings by default, i.e. by cosine similarity); equal distances are broken by the lower index, so results do
not depend on the sort's whims.

* Recall@1: the fraction of queries whose nearest other sample has the query's label.
* MAP@R: with ``R`` = the number of other samples of the query's class, ``AP@R = (1/R) Σ_{i≤R} P(i)·rel(i)``, where
  ``rel(i)`` says whether the i-th neighbour has the query's label and ``P(i)`` is the precision of the first
  ``i`` neighbours; MAP@R is its mean over the queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, *, normalize: bool = True,
                      chunk: int = 1024) -> dict[str, float]:
    """``{"recall_at_1", "map_at_r", "queries"}`` for ``embeddings`` [n, d] and integer ``labels`` [n].

    Queries are processed ``chunk`` rows at a time, so memory is ``chunk x n`` rather than ``n x n``.
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"embeddings [n, d] and labels [n] expected, got {list(embeddings.shape)} and "
                         f"{list(labels.shape)}")
    x = embeddings.detach().to(torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    y = labels.detach().to(torch.int64)
    n = x.shape[0]
    # Other samples of each query's class (R); queries with R = 0 are left out.
    counts = torch.bincount(y - y.min()) if n else torch.zeros(0, dtype=torch.int64)
    r_all = counts[y - y.min()] - 1 if n else counts
    r_max = int(r_all.max()) if n else 0
    hits1 = ap_sum = 0.0
    for start in range(0, n, chunk):
        q = slice(start, min(start + chunk, n))
        rows = torch.arange(q.start, q.stop)
        d = torch.cdist(x[q], x)
        d[torch.arange(len(rows)), rows] = float("inf")  # never retrieve yourself
        # Stable sort of (distance, index): ties go to the lower index.
        order = torch.sort(d, dim=1, stable=True).indices[:, :max(r_max, 1)]
        rel = (y[order] == y[q, None]).to(torch.float64)
        r = r_all[q]
        valid = r > 0
        hits1 += float(rel[valid, 0].sum())
        ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
        within = ranks[None, :] <= r[:, None]  # only the first R neighbours count
        precision = torch.cumsum(rel, 1) / ranks
        ap = (precision * rel * within).sum(1) / r.clamp_min(1)
        ap_sum += float(ap[valid].sum())
    queries = int((r_all > 0).sum())
    if queries == 0:
        return {"recall_at_1": float("nan"), "map_at_r": float("nan"), "queries": 0}
    return {"recall_at_1": hits1 / queries, "map_at_r": ap_sum / queries, "queries": queries}
