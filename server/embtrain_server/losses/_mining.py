"""Mining and reduction machinery shared by the native triplet losses (LOSSES.md §0, B, C).

Everything here works on *candidates*: anchors are the ``n`` batch rows; positives and negatives come from the
batch rows followed by the cross-batch memory rows (candidate index ``j >= n`` is memory row ``j - n``).
Memory rows never receive gradient. With a reference set (``ref_emb`` / ``ref_labels``, PML's semantics;
``Candidates.ref``) the candidates are the reference rows only: candidate ``j`` is reference row ``j``, no
candidate is the anchor itself (nothing is excluded), and the reference rows get their own gradient. In shard mode
(``Candidates.rows``) the miners and reducers take the anchors of one row range only, against every candidate;
counts and sums are then this range's, gradients partial.

Memory stays O(block · m): distance rows are computed per block of anchors, and the O(n·K·m) triplet work runs
on chunks of positive pairs (or on sorted rows, see ``all_triplets``). Gradients are computed here, never through
an O(n³) autograd graph: the per-triplet evaluator runs autograd on bounded chunks of gathered rows, and the
all-triplets reducer accumulates ``∂loss/∂D`` in a coefficient matrix that ``PairDistance.backward`` turns into
row gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .. import cancellation
from ..errors import invalid
from ..params import Param
from .base import ComputeContext, InputSpec, LossOutput, Memory
from .distances import PairDistance, work_dtype

# The hinge parameters of the batch-hard and batch-all losses (LOSSES.md §B.2, §B.3).
HINGE_PARAMS = (
    Param("margin", "float", 0.3, "hinge margin (ignored when soft)", minimum=0.0),
    Param("soft", "bool", False, "softplus(D_ap - D_an) instead of the hinge"),
)

Tensor = torch.Tensor

_INF = float("inf")

# A reference set (PML's ``ref_emb`` / ``ref_labels``): anchors from the batch, every positive and negative from
# these rows.
REF_EMB = InputSpec("ref_emb", "float", "[m, d]", False, True,
                    "reference set (PML's ref_emb): positives and negatives come only from these rows, anchors from "
                    "the batch; same dtype and width as embeddings; its gradient comes back")
REF_LABELS = InputSpec("ref_labels", "int", "[m]", False, False, "labels of ref_emb (required with it)")


# Elements of one [rows, m] working matrix per device type (several are alive at once), and of one chunk of
# gathered rows in evaluate_triplets. Module constants so that tests can shrink them to exercise the blocking.
BLOCK_ELEMS = {"cpu": 2**22, "cuda": 2**24}
CHUNK_ELEMS = 2**22


def _budget(device: torch.device) -> int:
    return BLOCK_ELEMS.get(device.type, 2**22)


# ---- inputs ------------------------------------------------------------------------------------------------------

def check_labels(inputs: Mapping[str, Tensor], n: int, why: str = "") -> None:
    """``inputs.labels`` must be present, 1-D, one per embedding row."""
    labels = inputs.get("labels")
    if labels is None:
        raise invalid("inputs.labels", f"required{why}: one integer class label per embedding row")
    if labels.dim() != 1:
        raise invalid("inputs.labels", f"shape {list(labels.shape)}, expected [{n}] (one label per embedding row)")
    if labels.shape[0] != n:
        raise invalid("inputs.labels", f"length {labels.shape[0]}, expected {n} (one per embedding row)")


def check_triplets(triplets: Tensor, n: int, m: int | None = None) -> None:
    """``inputs.triplets`` must be ``[k, 3]`` row indices in ``[0, n)``; with a reference set of ``m`` rows the
    positives and negatives (columns 1 and 2) index ``ref_emb``, ``[0, m)``."""
    if triplets.dim() != 2 or triplets.shape[1] != 3:
        raise invalid("inputs.triplets",
                      f"shape {list(triplets.shape)}, expected [k, 3] (anchor, positive, negative row indices)")
    if triplets.numel():
        if m is None:
            bad = (triplets < 0) | (triplets >= n)
        else:
            bound = torch.tensor([n, m, m], dtype=triplets.dtype)
            bad = (triplets < 0) | (triplets >= bound)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            size, rows = (n, "embedding rows") if m is None or col == 0 else (m, "rows of inputs.ref_emb")
            raise invalid("inputs.triplets",
                          f"index {int(triplets[row, col])} at [{row}, {col}] is outside [0, {size}) ({rows})")


def reference_rows(inputs: Mapping[str, Tensor]) -> int | None:
    """What every reference set must be (the native losses' and the ``pml.*`` losses'): ``inputs.ref_emb`` ``[m, d]``
    of the embeddings' width, ``inputs.ref_labels`` (if sent) one per row and never without it. Returns ``m``
    (None: no reference set)."""
    ref, ref_labels = inputs.get("ref_emb"), inputs.get("ref_labels")
    if ref is None:
        if ref_labels is not None:
            raise invalid("inputs.ref_labels", "given without inputs.ref_emb (the labels of a reference set come "
                                               "with it)")
        return None
    d = inputs["embeddings"].shape[1]
    if ref.dim() != 2 or ref.shape[1] != d:
        raise invalid("inputs.ref_emb", f"shape {list(ref.shape)}, expected [m, {d}] (the embeddings' width)")
    m = int(ref.shape[0])
    if ref_labels is not None and (ref_labels.dim() != 1 or ref_labels.shape[0] != m):
        raise invalid("inputs.ref_labels", f"shape {list(ref_labels.shape)}, expected [{m}] (one per ref_emb row)")
    return m


def check_reference(inputs: Mapping[str, Tensor], labels_needed: bool = True) -> int | None:
    """A native loss's reference set (``reference_rows``), also of the embeddings' dtype, with its labels when the
    loss uses labels. Returns ``m`` (None: no reference set).

    A reference set replaces the candidates, so it cannot be combined with the per-row sample ids (the response's
    ``triplet_ids`` map every candidate index to a batch id)."""
    m = reference_rows(inputs)
    if m is None:
        return None
    ref, emb = inputs["ref_emb"], inputs["embeddings"]
    if ref.dtype != emb.dtype:
        raise invalid("inputs.ref_emb", f"dtype {str(ref.dtype).removeprefix('torch.')}, expected "
                                        f"{str(emb.dtype).removeprefix('torch.')} (the embeddings' dtype)")
    if labels_needed and inputs.get("ref_labels") is None:
        raise invalid("inputs.ref_labels", f"required with inputs.ref_emb: one integer class label per "
                                           f"reference row ([{m}])")
    if inputs.get("ids") is not None:
        raise invalid("inputs.ids", "not with inputs.ref_emb: triplet ids are batch ids, and with a reference set "
                                    "the positives and negatives are reference rows (send no ids)")
    return m


def refuse_memory_with_reference(memory: Memory | None) -> None:
    """A cross-batch memory already extends the candidates: a reference set is refused with it."""
    if memory is not None and memory.embeddings.shape[0] > 0:
        raise invalid("inputs.ref_emb", "not with a cross-batch memory: the memory already extends the candidates; "
                                        "use a session without memory_size (or a stateless call)")


@dataclass(frozen=True)
class Candidates:
    """Anchors ``x`` (the batch) and candidates ``r = cat(x, memory)`` with labels, detached, in the work dtype;
    with ``ref`` the candidates are a reference set, ``r = ref_emb`` (it does not contain ``x``)."""

    x: Tensor  # [n, d]
    r: Tensor  # [m, d]
    y: Tensor  # [n]
    yr: Tensor  # [m]
    npos: Tensor  # [n] candidates with the anchor's label, the anchor itself excluded
    nneg: Tensor  # [n] candidates with another label
    # The anchors the miners and reducers take, [lo, hi) (shard mode); None: every batch row.
    anchor_range: tuple[int, int] | None = None
    # r is a reference set: no candidate is an anchor (no self column), and r gets its own gradient.
    ref: bool = False

    def self_col(self, s: int) -> int | None:
        """The candidate column of anchor ``s`` (the first of a block starting there); None with a reference set."""
        return None if self.ref else s

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def rows(self) -> tuple[int, int]:
        """The anchor rows ``[lo, hi)`` (all ``n`` batch rows unless sharded)."""
        return self.anchor_range if self.anchor_range is not None else (0, self.x.shape[0])

    @property
    def m(self) -> int:
        return self.r.shape[0]


def make_candidates(embeddings: Tensor, labels: Tensor | None, memory: Memory | None,
                    rows: tuple[int, int] | None = None, ref: Tensor | None = None,
                    ref_labels: Tensor | None = None) -> Candidates:
    """Candidates for anchors ``rows`` (``[lo, hi)``, shard mode; None: every batch row); with ``ref`` (and its
    ``ref_labels``; None: all one label) the candidates are the reference rows instead of the batch and memory."""
    x = embeddings.detach()
    x = x.to(work_dtype(x.dtype))
    n = x.shape[0]
    y = labels.to(device=x.device, dtype=torch.int64) if labels is not None else torch.zeros(
        n, dtype=torch.int64, device=x.device)
    if ref is not None:
        refuse_memory_with_reference(memory)
        r = ref.detach().to(device=x.device, dtype=x.dtype)
        yr = ref_labels.to(device=x.device, dtype=torch.int64) if ref_labels is not None else torch.zeros(
            r.shape[0], dtype=torch.int64, device=x.device)
        same = LabelIndex(yr).counts(y)  # an anchor's label need not occur in the reference set
        if rows is not None and tuple(rows) == (0, n):
            rows = None
        return Candidates(x, r, y, yr, same, r.shape[0] - same,
                          None if rows is None else (int(rows[0]), int(rows[1])), ref=True)
    if memory is not None and memory.embeddings.shape[0] > 0:
        r = torch.cat([x, memory.embeddings.detach().to(device=x.device, dtype=x.dtype)])
        yr = torch.cat([y, memory.labels.to(device=x.device, dtype=torch.int64)])
    else:
        r, yr = x, y
    uniq, counts = torch.unique(yr, return_counts=True)
    same = counts[torch.searchsorted(uniq, y)]  # every anchor label occurs among the candidates
    if rows is not None and tuple(rows) == (0, n):
        rows = None
    return Candidates(x, r, y, yr, same - 1, r.shape[0] - same, None if rows is None else (int(rows[0]), int(rows[1])))


@dataclass(frozen=True)
class PairRows:
    """The rows of a loss over all (anchor, partner) pairs (contrastive, multi-similarity), detached, in the work
    dtype: the batch ``xw``, the anchors ``xa = prep(xw)`` and the partners ``cand`` (``xa`` followed by the
    prepared memory rows, or with ``ref`` the prepared reference rows only) with their labels."""

    xw: Tensor  # [n, d]
    xa: Tensor  # [n, d]
    y: Tensor  # [n] int64
    cand: Tensor  # [m, d]
    cand_y: Tensor  # [m] int64
    ref: bool = False  # cand is a reference set: no partner is an anchor, and cand gets its own gradient


def pair_rows(x: Tensor, labels: Tensor, memory: Memory | None, ref: Tensor | None = None,
              ref_labels: Tensor | None = None, prep: Callable[[Tensor], Tensor] | None = None) -> PairRows:
    """``PairRows`` of the batch ``x`` and its ``labels`` against the batch and the cross-batch ``memory``, or
    against the reference set ``ref`` / ``ref_labels``; ``prep`` maps rows to what the loss compares
    (multi-similarity's L2 normalisation; None: the rows themselves)."""
    dev = x.device
    xw = x.detach().to(work_dtype(x.dtype))
    dt = xw.dtype
    y = labels.to(device=dev, dtype=torch.int64)
    xa = xw if prep is None else prep(xw)
    if ref is not None:
        refuse_memory_with_reference(memory)
        assert ref_labels is not None
        cand = ref.detach().to(device=dev, dtype=dt)
        return PairRows(xw, xa, y, cand if prep is None else prep(cand),
                        ref_labels.to(device=dev, dtype=torch.int64), ref=True)
    cand, cand_y = xa, y
    if memory is not None and memory.embeddings.shape[0] > 0:
        mem = memory.embeddings.detach().to(device=dev, dtype=dt)
        cand = torch.cat([xa, mem if prep is None else prep(mem)])
        cand_y = torch.cat([y, memory.labels.to(device=dev, dtype=torch.int64)])
    return PairRows(xw, xa, y, cand, cand_y)


def row_blocks(n: int, m: int, device: torch.device, start: int = 0,
               rows: int | None = None) -> Iterator[tuple[int, int]]:
    """Anchor blocks [s, e) covering [start, n) whose distance rows fit the block budget (or of ``rows`` rows); a
    cancelled call stops between blocks."""
    if rows is None:
        rows = max(1, _budget(device) // max(m, 1))
    for s in range(start, n, rows):
        cancellation.check()
        yield s, min(n, s + rows)


def block_masks(c: Candidates, s: int, e: int) -> tuple[Tensor, Tensor]:
    """``same [B, m]`` (same label) and ``pos [B, m]`` (same label, not the anchor itself) for anchors ``s:e``."""
    same = c.y[s:e, None] == c.yr[None, :]
    pos = same.clone()
    if c.ref:
        return same, pos  # no candidate is the anchor
    rows = torch.arange(e - s, device=same.device)
    pos[rows, rows + s] = False
    return same, pos


class LabelIndex:
    """Candidate labels ``yr [m]`` sorted once, so that the same-label ``(row, column)`` pairs of a block of anchor
    rows come as index lists in O(b + pairs), without a ``[b, m]`` mask."""

    def __init__(self, yr: Tensor) -> None:
        self.order = torch.argsort(yr, stable=True)
        self.sorted = yr[self.order].contiguous()

    def counts(self, ya: Tensor) -> Tensor:
        """Candidates with each of the labels ``ya``."""
        return torch.searchsorted(self.sorted, ya, right=True) - torch.searchsorted(self.sorted, ya)

    def pairs(self, ya: Tensor) -> tuple[Tensor, Tensor]:
        """``(i, j)``: every candidate ``j`` with label ``ya[i]``, by ``i`` then ``j`` ascending."""
        start = torch.searchsorted(self.sorted, ya)
        cnt = torch.searchsorted(self.sorted, ya, right=True) - start
        i = torch.repeat_interleave(torch.arange(ya.numel(), device=ya.device), cnt)
        offset = torch.cumsum(cnt, 0) - cnt
        j = self.order[start[i] + torch.arange(i.numel(), device=ya.device) - offset[i]]
        return i, j


def _pad_by_row(rows: Tensor, n_rows: int, values: Tensor, fill: float) -> tuple[Tensor, Tensor]:
    """Scatter ``values`` (grouped by ascending ``rows``) into a ``[n_rows, kmax]`` table; returns (table, rank)."""
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    table = torch.full((n_rows, int(counts.max())), fill, dtype=values.dtype, device=values.device)
    table[rows, rank] = values
    return table, rank


# ---- mined-triplet lists ------------------------------------------------------------------------------------------

def finalize_triplets(t: Tensor, limit: int) -> tuple[Tensor, int]:
    """Sort ``[k, 3]`` triplets lexicographically, drop duplicates, keep the first ``limit``; returns (kept, total)."""
    t = t.reshape(-1, 3).to(torch.int64)
    if t.shape[0] == 0:
        return t, 0
    m = int(t.max()) + 1
    if m < 2**20:
        # one int64 key per row sorts like the row (torch.unique(dim=0) is far slower)
        key = torch.unique((t[:, 0] * m + t[:, 1]) * m + t[:, 2])
        u = torch.stack([key // (m * m), key // m % m, key % m], 1)
    else:
        u = torch.unique(t, dim=0)  # sorted lexicographically
    return u[:max(limit, 0)], int(u.shape[0])


class TripletSink:
    """Collects triplets that arrive already sorted and de-duplicated, keeping the first ``limit``."""

    def __init__(self, limit: int, enabled: bool) -> None:
        self.limit = max(int(limit), 0) if enabled else 0
        self.parts: list[Tensor] = []
        self.kept = 0
        self.total = 0

    @property
    def room(self) -> int:
        return self.limit - self.kept

    def add(self, t: Tensor, count: int | None = None) -> None:
        """``t`` are the next triplets in order; ``count`` is how many there are (``len(t)`` when omitted)."""
        self.total += t.shape[0] if count is None else count
        if self.room > 0 and t.shape[0]:
            t = t[:self.room]
            self.parts.append(t)
            self.kept += t.shape[0]

    def result(self, device: torch.device) -> Tensor:
        if not self.parts:
            return torch.zeros(0, 3, dtype=torch.int64, device=device)
        return torch.cat(self.parts)


# ---- miners that select a few triplets ---------------------------------------------------------------------------

def mine_batch_hard(dist: PairDistance, c: Candidates) -> tuple[Tensor, Tensor, Tensor]:
    """B.2: for each anchor with a positive and a negative, the farthest positive and the closest negative.

    Ties go to the lowest index (torch's argmax/argmin return the first extremum). Returns ``(a, p*, n*)``.

    The positives (a few per anchor in a P·K batch) are handled as index lists (``LabelIndex``): the farthest is
    a segment maximum over them, and the closest negative an ``argmin`` over the row with the same-label entries
    set to +inf, so no ``[b, m]`` mask is built.
    """
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    lo, hi = c.rows
    prepared = dist.prepare(c.r)
    labels = LabelIndex(c.yr)
    for s, e in row_blocks(hi, c.m, c.x.device, lo):
        valid = (c.npos[s:e] > 0) & (c.nneg[s:e] > 0)
        if not bool(valid.any()):
            continue
        d, _ = dist.matrix(c.x[s:e], c.r, prepared, self_col=c.self_col(s))
        si, sj = labels.pairs(c.y[s:e])  # same label, by row then column ascending; the anchor itself included
        if c.ref:
            pi, pj = si, sj  # no candidate is the anchor
        else:
            not_self = sj != si + s
            pi, pj = si[not_self], sj[not_self]
        dp = d[pi, pj]
        best = torch.full((e - s,), -_INF, dtype=d.dtype, device=d.device).scatter_reduce_(0, pi, dp, "amax")
        first = torch.where(dp == best[pi], pj, c.m)  # lowest column among a row's farthest positives
        p_star = torch.full((e - s,), c.m, dtype=torch.int64, device=d.device).scatter_reduce_(0, pi, first, "amin")
        d[si, sj] = _INF
        n_star = d.argmin(1)
        rows = valid.nonzero(as_tuple=True)[0]
        out.append((rows + s, p_star[rows], n_star[rows]))
    return _cat3(out, c.x.device)


def mine_semihard(dist: PairDistance, c: Candidates) -> tuple[Tensor, Tensor, Tensor]:
    """C.2 semi-hard (TF-Addons): for every positive pair (a, p) whose anchor has a negative, the closest negative
    with ``d(a,n) > d(a,p)``, else the farthest negative; ties to the lowest index. Returns ``(a, p, n*)`` in
    lexicographic (a, p) order.

    No [pairs, m] matrix: per anchor, the K positive distances are sorted and every negative falls in the bucket
    "number of positive distances strictly below it"; the closest negative beyond the k-th positive distance is
    the minimum over buckets >= k (a suffix minimum over K+1 buckets).
    """
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    lo, hi = c.rows
    prepared = dist.prepare(c.r)
    for s, e in row_blocks(hi, c.m, c.x.device, lo):
        has = (c.npos[s:e] > 0) & (c.nneg[s:e] > 0)
        if not bool(has.any()):
            continue
        d, _ = dist.matrix(c.x[s:e], c.r, prepared, self_col=c.self_col(s))
        same, pos = block_masks(c, s, e)
        pos &= has[:, None]
        a_loc, p = pos.nonzero(as_tuple=True)
        del pos
        buckets = _ThresholdBuckets(a_loc, e - s, d[a_loc, p])
        d_neg = d.masked_fill(same, _INF)
        b = _bucketize(buckets.sorted, d_neg, right=False)  # positives strictly closer than each candidate
        nb = buckets.sorted.shape[1] + 1
        bmin = torch.full((e - s, nb), _INF, dtype=d.dtype, device=d.device).scatter_reduce_(
            1, b, d_neg, "amin")
        # Lowest index among the entries at their bucket's minimum (equal distances share a bucket). A bucket
        # without negatives has minimum +inf and is never chosen, so the other-label rows need no mask here.
        index = torch.arange(c.m, device=d.device).expand_as(b)
        at_min = torch.where(d_neg == bmin.gather(1, b), index, c.m)
        bidx = torch.full((e - s, nb), c.m, dtype=torch.int64, device=d.device).scatter_reduce_(
            1, b, at_min, "amin")
        del at_min, index, b, d_neg
        suffix_val, suffix_pos = torch.cummin(bmin.flip(1), dim=1)
        col = nb - 1 - buckets.position  # flipped column of bucket `position` (= sorted rank + 1)
        n_star = bidx[a_loc, nb - 1 - suffix_pos[a_loc, col]]
        fallback = (suffix_val[a_loc, col] == _INF).nonzero(as_tuple=True)[0]
        if fallback.numel():
            # no negative beyond d(a,p): the farthest negative; argmax returns the first maximum = lowest index
            rows, inv = torch.unique(a_loc[fallback], return_inverse=True)
            farthest = d[rows].masked_fill(same[rows], -_INF).argmax(1)
            n_star[fallback] = farthest[inv]
        out.append((a_loc + s, p, n_star))
    return _cat3(out, c.x.device)


def _bucketize(sorted_thr: Tensor, values: Tensor, right: bool) -> Tensor:
    """Per row, how many thresholds are below each value (``<=`` if ``right``, else ``<``): ``[B, m]`` int64.

    For the few thresholds of a PK batch, kmax fused compare-and-add passes beat a batched binary search
    (torch's per-row ``searchsorted`` costs tens of ns per element on CPU); many thresholds use the search.
    """
    kmax = sorted_thr.shape[1]
    if kmax > 32:
        return torch.searchsorted(sorted_thr, values, right=right)
    count = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    hit = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    compare = torch.ge if right else torch.gt
    for k in range(kmax):
        compare(values, sorted_thr[:, k:k + 1], out=hit)
        count += hit.view(torch.uint8)  # a bool is a 0/1 byte: no conversion pass
    return count.to(torch.int64)


class _ThresholdBuckets:
    """Per-anchor sorted values of the anchor's positive pairs (``[B, kmax]``, +inf padded), and for each pair its
    1-based rank in that order (``position``)."""

    def __init__(self, a_loc: Tensor, n_rows: int, values: Tensor) -> None:
        table, rank = _pad_by_row(a_loc, n_rows, values, _INF)
        self.sorted, order = table.sort(dim=1)
        inverse = torch.empty_like(order)
        inverse.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        self.position = inverse[a_loc, rank] + 1
        self.count = torch.bincount(a_loc, minlength=n_rows)


def _cat3(parts: list[tuple[Tensor, Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, empty
    return tuple(torch.cat([q[i] for q in parts]) for i in range(3))  # type: ignore[return-value]


@dataclass
class TripletEval:
    loss_sum: float  # Σ ℓ_t (float64 accumulation)
    grad: Tensor  # [n, d] ∂(Σ ℓ_t)/∂x
    values: Tensor  # [k] ℓ_t
    d_ap: Tensor  # [k]
    d_an: Tensor  # [k] (after swap)
    grad_ref: Tensor | None = None  # [m, d] ∂(Σ ℓ_t)/∂r with a reference set (None without)


def _anchor_side(c: Candidates, grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows the anchor indices point into and the gradient buffer of those rows: the candidates themselves
    (the batch is their first ``n`` rows) and ``grad``, or with a reference set the batch and its own buffer."""
    if c.ref:
        return c.x, torch.zeros_like(c.x)
    return c.r, grad


def _split_grads(c: Candidates, grad: Tensor, grad_a: Tensor) -> tuple[Tensor, Tensor | None]:
    """(∂/∂x [n, d], ∂/∂ref [m, d] or None) from the candidates' buffer and the anchors'."""
    return (grad_a, grad) if c.ref else (grad[:c.n], None)


def evaluate_triplets(dist: PairDistance, c: Candidates, a: Tensor, p: Tensor, neg: Tensor, *, margin: float,
                      soft: bool = False, swap: bool = False, unique_anchors: bool = False) -> TripletEval:
    """Per-triplet losses ``[margin + d(a,p) - d(a,n)]_+`` (or ``softplus(d(a,p) - d(a,n))``) and the gradient of
    their sum, exactly from the gathered rows' differences, in bounded chunks.

    ``swap`` replaces ``d(a,n)`` by ``d(p,n)`` when strictly smaller (a tie keeps ``d(a,n)``, LOSSES.md C.3).
    A hinge at exactly 0 has zero gradient (relu). The distances with a closed-form gradient
    (``PairDistance.pairs_grad``: B.1's clamped euclidean, ``pairwise_distance`` with p = 2, squared euclidean)
    are differentiated by hand, the others (cosine, other p) by autograd through ``dist.pairs``; both give
    autograd's numbers. ``unique_anchors``: ``a`` is ascending without repeats (one triplet per anchor, batch-hard),
    so a run of consecutive anchors is read and written as a slice.

    Many triplets per anchor (semi-hard: one per positive pair) are evaluated by anchor rows instead
    (``_evaluate_by_rows``): the distances of each block of anchors to every candidate (Gram form, near entries
    exact, as the miners see them), and the gradient from a ``[rows, m]`` coefficient matrix through
    ``dist.backward`` (matmuls), which costs less than gathering ``3·k`` rows of width ``d`` once ``k`` is more than
    about ``rows·m/ROWS_PATH_RATIO``.
    """
    r = c.r
    k = a.numel()
    d = r.shape[1]
    closed = dist.closed_form
    if closed and not swap and k and dist.gram:
        rows = torch.unique(a)
        if k * d > ROWS_PATH_RATIO * rows.numel() * r.shape[0]:
            return _evaluate_by_rows(dist, c, a, p, neg, rows, margin, soft)
    grad = torch.zeros_like(r)
    xa, grad_a = _anchor_side(c, grad)
    values = torch.empty(k, dtype=r.dtype, device=r.device)
    d_ap = torch.empty_like(values)
    d_an = torch.empty_like(values)
    total = torch.zeros((), dtype=torch.float64, device=r.device)
    step = max(1, CHUNK_ELEMS // max(d, 1))
    for s in range(0, k, step):
        e = min(k, s + step)
        ia, ip, ineg = a[s:e], p[s:e], neg[s:e]
        if closed:
            run = None
            if unique_anchors and e > s and int(ia[-1]) - int(ia[0]) == e - s - 1:
                run = int(ia[0])
            ell, dap, dan = _triplet_chunk_closed(dist, r, grad, ia, ip, ineg, margin, soft, swap, run, xa, grad_a)
        else:
            ell, dap, dan = _triplet_chunk_autograd(dist, r, grad, ia, ip, ineg, margin, soft, swap, xa, grad_a)
        values[s:e] = ell
        d_ap[s:e] = dap
        d_an[s:e] = dan
        total += ell.sum(dtype=torch.float64)
    gx, gr = _split_grads(c, grad, grad_a)
    return TripletEval(float(total), gx, values, d_ap, d_an, gr)


# evaluate_triplets works on anchor rows (matmuls) instead of gathered rows when k·d > ROWS_PATH_RATIO·rows·m:
# gathering and differencing costs ~15 memory-bound passes over [k, d], the rows path two [rows, m, d] matmuls and
# a few passes over [rows, m] (measured on CPU: semi-hard at n = 256 is 2-5x faster by rows, at n = 1024 by rows
# for d = 512 and by gathering for d = 128).
ROWS_PATH_RATIO = 4


def _evaluate_by_rows(dist: PairDistance, c: Candidates, a: Tensor, p: Tensor, neg: Tensor, rows: Tensor,
                      margin: float, soft: bool) -> TripletEval:
    """``evaluate_triplets`` by blocks of the distinct anchors ``rows`` (ascending): their distance rows, the
    triplets' ``d(a,p)``, ``d(a,n)`` read from them, and the gradient of ``Σ ℓ`` as ``dist.backward`` of the
    coefficients ``∂Σℓ/∂d`` (accumulated: a pair in several triplets adds up)."""
    r = c.r
    k = a.numel()
    dev = r.device
    order = torch.argsort(a, stable=True)
    a_s, p_s, n_s = a[order], p[order], neg[order]
    grad = torch.zeros_like(r)
    xa, grad_a = _anchor_side(c, grad)
    values = torch.empty(k, dtype=r.dtype, device=dev)
    d_ap = torch.empty_like(values)
    d_an = torch.empty_like(values)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    prepared = dist.prepare(r)
    step = max(1, _budget(dev) // max(r.shape[0], 1))
    bounds = torch.searchsorted(a_s, rows[::step].contiguous()).tolist() + [k]  # each block's triplet range
    for blk_i, i0 in enumerate(range(0, rows.numel(), step)):
        cancellation.check()
        rows_b = rows[i0:i0 + step]
        t0, t1 = bounds[blk_i], bounds[blk_i + 1]
        x_b = xa.index_select(0, rows_b)
        dmat, aux = dist.matrix(x_b, r, prepared)
        loc = torch.searchsorted(rows_b, a_s[t0:t1])
        pb, nb = p_s[t0:t1], n_s[t0:t1]
        dap, dan = dmat[loc, pb], dmat[loc, nb]
        ell, cf = _hinge(dap, dan, margin, soft)
        coef = torch.zeros_like(dmat)
        coef.index_put_((loc, pb), cf, accumulate=True)
        coef.index_put_((loc, nb), -cf, accumulate=True)
        gx, gr = dist.backward(x_b, r, coef, dmat, aux)
        grad_a.index_add_(0, rows_b, gx)
        grad += gr
        idx = order[t0:t1]
        values[idx] = ell
        d_ap[idx] = dap
        d_an[idx] = dan
        total += ell.sum(dtype=torch.float64)
    gx, gr = _split_grads(c, grad, grad_a)
    return TripletEval(float(total), gx, values, d_ap, d_an, gr)


def _hinge(dap: Tensor, dan: Tensor, margin: float, soft: bool) -> tuple[Tensor, Tensor]:
    """``(ℓ, ∂ℓ/∂d_ap)``; ``∂ℓ/∂d_an`` is its negative."""
    if soft:
        arg = dap - dan
        return torch.logaddexp(arg, torch.zeros_like(arg)), torch.sigmoid(arg)  # softplus; σ also at 0
    arg = (margin + dap) - dan
    return torch.relu(arg), (arg > 0).to(arg.dtype)  # relu: zero gradient at exactly 0


def _triplet_chunk_closed(dist: PairDistance, r: Tensor, grad: Tensor, ia: Tensor, ip: Tensor, ineg: Tensor,
                          margin: float, soft: bool, swap: bool, run: int | None = None, xa: Tensor | None = None,
                          grad_a: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk differentiated by hand; ``run``: the anchors are the rows ``run, run + 1, ...`` (a slice).
    Anchors index ``xa`` (gradient into ``grad_a``; default ``r`` and ``grad``), positives and negatives ``r``
    (into ``grad``)."""
    xa = r if xa is None else xa
    grad_a = grad if grad_a is None else grad_a
    ua = xa.index_select(0, ia) if run is None else xa[run:run + ia.numel()]
    up, un = r.index_select(0, ip), r.index_select(0, ineg)
    dap, g_ap = dist.pairs_grad(ua, up)  # type: ignore[misc]
    dan, g_an = dist.pairs_grad(ua, un)  # type: ignore[misc]
    use = None
    if swap:
        dpn, g_pn = dist.pairs_grad(up, un)  # type: ignore[misc]
        use = dpn < dan
        dan = torch.where(use, dpn, dan)
    ell, coef = _hinge(dap, dan, margin, soft)
    # ∂ℓ/∂a = c(G_ap − G_an), ∂ℓ/∂p = −c·G_ap, ∂ℓ/∂n = c·G_an (G = ∂d/∂first argument); swapped: d_pn instead
    c_ = coef[:, None]
    g_ap.mul_(c_)
    if use is None:
        g_an.mul_(c_)
        if run is None:
            grad_a.index_add_(0, ia, g_ap - g_an)
        else:
            grad_a[run:run + ia.numel()] += g_ap - g_an
        grad.index_add_(0, ip, g_ap, alpha=-1)
        grad.index_add_(0, ineg, g_an)
    else:
        keep = (coef * ~use)[:, None]
        moved = (coef * use)[:, None]
        g_an.mul_(keep)
        g_pn.mul_(moved)
        grad_a.index_add_(0, ia, g_ap - g_an)
        grad.index_add_(0, ip, g_ap + g_pn, alpha=-1)
        grad.index_add_(0, ineg, g_an + g_pn)
    return ell, dap, dan


def _triplet_chunk_autograd(dist: PairDistance, r: Tensor, grad: Tensor, ia: Tensor, ip: Tensor, ineg: Tensor,
                            margin: float, soft: bool, swap: bool, xa: Tensor | None = None,
                            grad_a: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    xa = r if xa is None else xa
    grad_a = grad if grad_a is None else grad_a
    with torch.enable_grad():
        ua = xa[ia].requires_grad_(True)
        up = r[ip].requires_grad_(True)
        un = r[ineg].requires_grad_(True)
        dap = dist.pairs(ua, up)
        dan = dist.pairs(ua, un)
        if swap:
            dpn = dist.pairs(up, un)
            dan = torch.where(dpn < dan, dpn, dan)
        if soft:
            ell = torch.logaddexp(dap - dan, torch.zeros_like(dap))  # softplus, gradient sigmoid (also at 0)
        else:
            ell = torch.relu((margin + dap) - dan)
        ga, gp, gn = torch.autograd.grad(ell.sum(), (ua, up, un))
    grad_a.index_add_(0, ia, ga)
    grad.index_add_(0, ip, gp)
    grad.index_add_(0, ineg, gn)
    return ell.detach(), dap.detach(), dan.detach()


# ---- all valid triplets -------------------------------------------------------------------------------------------

@dataclass
class AllTriplets:
    loss_sum: float
    selected: int
    active: int
    valid_anchors: int
    grad: Tensor  # [n, d] ∂(Σ ℓ)/∂x
    per_anchor: Tensor | None  # [n] Σ_{p,n} ℓ per anchor
    values: Tensor | None  # per-triplet ℓ in lexicographic (a, p, n) order
    sum_d_ap: float
    sum_d_an: float
    grad_ref: Tensor | None = None  # [m, d] ∂(Σ ℓ)/∂r with a reference set (None without)


def all_triplets(dist: PairDistance, c: Candidates, sink: TripletSink, *, margin: float, soft: bool = False,
                 swap: bool = False, want_values: bool = False, want_per_anchor: bool = False) -> AllTriplets:
    """Every valid triplet ``(a, p, n)``: ``p != a`` with the anchor's label, ``n`` with another label (B.3, C.2 "all").

    Returns the sum of ``ℓ = [margin + D_ap - D_an]_+`` (``softplus(D_ap - D_an)`` if soft; ``D_an`` swapped with
    ``D_pn`` if smaller), the number of selected and active triplets, and the gradient of the sum. Active
    triplets go to ``sink`` in lexicographic order.

    The gradient goes through ``∂Σℓ/∂D``: a ``[B, m]`` coefficient matrix per anchor block (count of active
    negatives on ``D(a,p)``, minus count of active positives on ``D(a,n)``), turned into row gradients by
    ``dist.backward``. For the plain hinge the counts and sums come from bucketing each anchor's negatives by its
    K sorted thresholds (O(m log K) per anchor instead of O(K·m)); the soft, swap and per-triplet variants
    evaluate ``[pairs_chunk, m]`` hinge matrices.

    Only the anchors ``c.rows`` are taken (shard mode): the counts and sums are theirs, the gradient (still
    ``[n, d]``) is their terms' part, and ``per_anchor`` (still ``[n]``) is zero outside them.
    """
    n, m = c.n, c.m
    dev, dt = c.x.device, c.x.dtype
    grad = torch.zeros_like(c.r)
    grad_a = torch.zeros_like(c.x) if c.ref else grad
    per_anchor = torch.zeros(n, dtype=torch.float64, device=dev) if want_per_anchor else None
    values: list[Tensor] = []
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    active = torch.zeros((), dtype=torch.int64, device=dev)
    sum_dap = torch.zeros((), dtype=torch.float64, device=dev)
    sum_dan = torch.zeros((), dtype=torch.float64, device=dev)
    bucket_path = not (soft or swap or want_values)
    lo, hi = c.rows
    prepared = dist.prepare(c.r)
    for s, e in row_blocks(hi, m, dev, lo):
        has = (c.npos[s:e] > 0) & (c.nneg[s:e] > 0)
        if not bool(has.any()):
            continue
        d, aux = dist.matrix(c.x[s:e], c.r, prepared, self_col=c.self_col(s))
        same, pos = block_masks(c, s, e)
        pos &= has[:, None]
        a_loc, p = pos.nonzero(as_tuple=True)
        del pos
        d_neg = d.masked_fill(same, _INF)
        npos_b = c.npos[s:e].to(torch.float64)
        nneg_b = c.nneg[s:e]
        d_ap = d[a_loc, p]
        sum_dap += (d_ap.to(torch.float64) * nneg_b[a_loc]).sum()
        if bucket_path:
            thr = d_ap + margin
            buckets = _ThresholdBuckets(a_loc, e - s, thr)
            # active (a,p,n) <=> D_an < margin + D_ap. Bucket b(n) = #thresholds <= D_an: the k-th smallest
            # threshold is beaten by the negatives with b < k; negative n beats count - b(n) thresholds.
            b = _bucketize(buckets.sorted, d_neg, right=True)
            nb = buckets.sorted.shape[1] + 1
            hist = torch.zeros(e - s, nb, dtype=torch.float64, device=dev)
            one = torch.ones((), dtype=torch.float64, device=dev).expand(b.shape)
            cum_cnt = hist.scatter_add(1, b, one).cumsum_(1)
            neg64 = d.to(torch.float64, copy=True).masked_fill_(same, 0.0)  # other-label rows weigh 0
            cum_sum = hist.scatter_add_(1, b, neg64).cumsum_(1)
            del neg64
            sum_dan += (cum_sum[:, -1] * npos_b).sum()
            cnt = cum_cnt[a_loc, buckets.position - 1]
            pair_loss = cnt * thr.to(torch.float64) - cum_sum[a_loc, buckets.position - 1]
            del hist, cum_cnt, cum_sum
            loss_sum += pair_loss.sum()
            if per_anchor is not None:
                per_anchor.index_add_(0, a_loc + s, pair_loss)
            cnt = cnt.to(torch.int64)
            active += cnt.sum()
            coef = (b - buckets.count[:, None].to(dt)).masked_fill_(same, 0.0)  # -(count - b) on the negatives
            coef[a_loc, p] = cnt.to(dt)
            del b, same
            if sink.room > 0:
                _list_sorted(sink, d_neg, a_loc, p, thr, cnt, s)
            else:
                sink.total += int(cnt.sum())
        else:
            sum_dan += (d.masked_fill(same, 0).sum(1, dtype=torch.float64) * npos_b).sum()
            del same
            coef = torch.zeros_like(d)
            if swap:
                p_uniq, p_inv = torch.unique(p, return_inverse=True)
                d_p, aux_p = dist.matrix(c.r[p_uniq], c.r, prepared)
                d_pneg = d_p.masked_fill(c.yr[p_uniq][:, None] == c.yr[None, :], _INF)  # y_p = y_a
                coef_p = torch.zeros_like(d_p)
            step = max(1, _budget(dev) // max(m, 1))
            for q in range(0, a_loc.numel(), step):
                ac, pc = a_loc[q:q + step], p[q:q + step]
                dan = d_neg[ac]
                if swap:
                    dpn = d_pneg[p_inv[q:q + step]]
                    use_pn = dpn < dan
                    dan = torch.where(use_pn, dpn, dan)
                if soft:
                    arg = d_ap[q:q + step, None] - dan
                    ell = torch.logaddexp(arg, torch.zeros((), dtype=dt, device=dev))
                    g = torch.sigmoid(arg)
                    act = arg > -_INF  # every selected triplet is active with the soft margin
                else:
                    arg = (margin + d_ap[q:q + step])[:, None] - dan
                    ell = torch.relu(arg)
                    act = arg > 0
                    g = act.to(dt)
                loss_sum += ell.sum(dtype=torch.float64)
                if per_anchor is not None:
                    per_anchor.index_add_(0, ac + s, ell.sum(1, dtype=torch.float64))
                if want_values:
                    values.append(ell[arg > -_INF])
                coef.index_put_((ac, pc), g.sum(1), accumulate=True)
                if swap:
                    coef.index_add_(0, ac, g * ~use_pn, alpha=-1)
                    coef_p.index_add_(0, p_inv[q:q + step], g * use_pn, alpha=-1)
                else:
                    coef.index_add_(0, ac, g, alpha=-1)
                count = int(act.sum())
                active += count
                if sink.room > 0:
                    rows, cols = act.nonzero(as_tuple=True)
                    sink.add(torch.stack([ac[rows] + s, pc[rows], cols], 1), count)
                else:
                    sink.total += count
                del dan, arg, ell, g, act
            if swap:
                gp, gr = dist.backward(c.r[p_uniq], c.r, coef_p, d_p, aux_p)
                grad.index_add_(0, p_uniq, gp)
                grad += gr
                del d_p, d_pneg, coef_p
        del d_neg
        gx, gr = dist.backward(c.x[s:e], c.r, coef, d, aux)
        grad_a[s:e] += gx
        grad += gr
    npos, nneg = (c.npos, c.nneg) if c.anchor_range is None else (c.npos[lo:hi], c.nneg[lo:hi])
    valid = (npos > 0) & (nneg > 0)
    selected = int((npos * nneg)[valid].sum()) if npos.numel() else 0
    gx_all, gr_all = _split_grads(c, grad, grad_a)
    return AllTriplets(
        loss_sum=float(loss_sum), selected=selected, active=int(active), valid_anchors=int(valid.sum()),
        grad=gx_all, per_anchor=per_anchor,
        values=(torch.cat(values) if values else torch.zeros(0, dtype=dt, device=dev)) if want_values else None,
        sum_d_ap=float(sum_dap), sum_d_an=float(sum_dan), grad_ref=gr_all)


def _list_sorted(sink: TripletSink, d_neg: Tensor, a_loc: Tensor, p: Tensor, thr: Tensor, cnt: Tensor,
                 s: int) -> None:
    """List the active triplets of the leading pairs until the sink is full; count the rest."""
    cum = torch.cumsum(cnt, 0)
    upto = min(int(torch.searchsorted(cum, torch.tensor(sink.room, device=cum.device))) + 1, a_loc.numel())
    step = max(1, _budget(d_neg.device) // max(d_neg.shape[1], 1))
    listed = 0
    for q in range(0, upto, step):
        ac, pc = a_loc[q:min(q + step, upto)], p[q:min(q + step, upto)]
        rows, cols = (d_neg[ac] < thr[q:q + ac.numel(), None]).nonzero(as_tuple=True)
        sink.add(torch.stack([ac[rows] + s, pc[rows], cols], 1))
        listed += rows.numel()
    sink.total += int(cum[-1]) - listed if cum.numel() else 0


# ---- outputs ------------------------------------------------------------------------------------------------------

def make_output(embeddings: Tensor, loss: float, grad: Tensor, ctx: ComputeContext, triplets: Tensor | None,
                total: int, per_item: Tensor | None, stats: dict[str, float], ref: Tensor | None = None,
                grad_ref: Tensor | None = None) -> LossOutput:
    """A ``LossOutput`` with explicitly computed gradients, in the embeddings' dtype (``per_item`` as given); with
    a reference set ``ref`` also its gradient ``grad_ref``, in its dtype."""
    gradients = {"embeddings": grad.to(embeddings.dtype)}
    if ref is not None and grad_ref is not None:
        gradients["ref_emb"] = grad_ref.to(ref.dtype)
    return LossOutput(
        loss=torch.tensor(loss, dtype=embeddings.dtype, device=embeddings.device),
        gradients=gradients,
        triplets=triplets if ctx.want_triplets else None,
        triplets_total=int(total),
        per_item=per_item.to(embeddings.dtype) if per_item is not None else None,
        stats=stats)


def empty_output(embeddings: Tensor, ctx: ComputeContext, stats: dict[str, float] | None = None,
                 per_item: bool = False) -> LossOutput:
    """LOSSES.md §0.2: nothing selected -> loss 0, gradient 0, no triplets (never NaN)."""
    zeros = torch.zeros(0, dtype=embeddings.dtype, device=embeddings.device)
    base = {"valid_anchors": 0.0, "selected_triplets": 0.0, "active_triplets": 0.0, "mean_d_ap": 0.0,
            "mean_d_an": 0.0}
    return make_output(embeddings, 0.0, torch.zeros_like(embeddings.detach()), ctx,
                       torch.zeros(0, 3, dtype=torch.int64, device=embeddings.device), 0,
                       zeros if per_item or ctx.want_per_item else None, base | (stats or {}))


__all__ = [
    "REF_EMB", "REF_LABELS", "AllTriplets", "Candidates", "PairRows", "TripletEval", "TripletSink", "all_triplets",
    "block_masks", "check_labels", "check_reference", "check_triplets", "empty_output", "evaluate_triplets",
    "finalize_triplets", "make_candidates", "make_output", "mine_batch_hard", "mine_semihard", "pair_rows",
    "reference_rows", "refuse_memory_with_reference", "row_blocks",
]
