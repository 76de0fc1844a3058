"""Group steps: W members each send their slice of step s of a session; the step is computed once, on the slices
concatenated in rank order, exactly as one process holding the whole batch would compute it, and each member is
answered with its part (the global loss and stats, the gradient rows of its own slice, the mined triplets that
touch its rows as global row indices, its row offset).

The coordinator (``GroupSteps``) lives on the event loop: it collects the slices of the pending step of each
session, starts the step when the last one arrives (on a worker, under the session's order) and aborts it when the
session's ``group_timeout`` passes first (every waiting member gets ABORTED naming the missing ranks; nothing is
applied). The functions below are the pure parts: per-row inputs, concatenation and splitting of results. The
losses never learn that a step had several members.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .compute import ComputeOptions, ComputeResult
from .errors import Aborted, FailedPrecondition, invalid
from .losses.base import Loss
from .metrics import Metrics
from .scheduler import Scheduler
from .validation import IDS_INPUT

# Inputs that have one row per embedding row, so that slices concatenate into the global batch.
PER_ROW_SHAPES = ("[n]", "[n, d]")


@dataclass
class Slice:
    """One member's validated part of a step (CPU tensors)."""

    rank: int
    step: int
    request_id: str
    inputs: dict[str, torch.Tensor]
    digest: bytes | None
    options: ComputeOptions

    @property
    def rows(self) -> int:
        return int(self.inputs["embeddings"].shape[0])


def per_row_inputs(cls: type[Loss]) -> set[str]:
    return {s.name for s in cls.inputs if s.shape in PER_ROW_SHAPES} | {IDS_INPUT}


def check_group_loss(cls: type[Loss]) -> None:
    """A loss can run group steps when every input it requires has one row per embedding row."""
    rows = per_row_inputs(cls)
    other = [s.name for s in cls.inputs if s.required and s.name not in rows]
    if other:
        raise invalid("config.group_size", f"loss {cls.name!r} needs {', '.join(other)}, which is not an input with "
                      "one row per embedding row, so its slices cannot be concatenated; use group_size 1")


def check_per_row(cls: type[Loss], raw: Mapping[str, Any]) -> None:
    rows = per_row_inputs(cls)
    for name in raw:
        if name not in rows and name in {s.name for s in cls.inputs}:
            raise invalid(f"inputs.{name}", "not an input with one row per embedding row: a group step "
                          f"concatenates its slices, so it takes only {', '.join(sorted(rows))}")


def common_options(slices: list[Slice]) -> ComputeOptions:
    first = slices[0]
    for s in slices[1:]:
        if s.options != first.options:
            raise invalid("options", f"rank {s.rank} asked for {s.options}, rank {first.rank} for {first.options}; "
                          "the members of a step must ask for the same return options")
    return first.options


def concatenate(slices: list[Slice]) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    """The global batch (slices in rank order) and each rank's row offset. A single slice is used as it is."""
    ordered = sorted(slices, key=lambda s: s.rank)
    offsets, start = {}, 0
    for s in ordered:
        offsets[s.rank] = start
        start += s.rows
    if len(ordered) == 1:
        return ordered[0].inputs, offsets
    first = ordered[0]
    names = set(first.inputs)
    out = {}
    for s in ordered[1:]:
        if set(s.inputs) != names:
            raise invalid("inputs", f"rank {s.rank} sent {sorted(s.inputs)}, rank {first.rank} {sorted(names)}; the "
                          "members of a step must send the same inputs")
    for name in sorted(names):
        parts = [s.inputs[name] for s in ordered]
        ref = parts[0]
        for s, t in zip(ordered, parts):
            if t.dtype != ref.dtype or t.shape[1:] != ref.shape[1:]:
                raise invalid(f"inputs.{name}", f"rank {s.rank} sent {str(t.dtype).removeprefix('torch.')} "
                              f"{list(t.shape)}, rank {first.rank} {str(ref.dtype).removeprefix('torch.')} "
                              f"{list(ref.shape)}; the slices of a step must agree in dtype and width")
        out[name] = torch.cat(parts)
    return out, offsets


def split(result: ComputeResult, slices: list[Slice], offsets: Mapping[int, int]) -> dict[int, ComputeResult]:
    """Each member's part of the step's result: its gradient rows, the triplets that touch its rows (global row
    indices) and their ids; the loss, per-item losses and stats are the global ones."""
    if len(slices) == 1:
        return {slices[0].rank: result}
    out = {}
    for s in slices:
        lo, hi = offsets[s.rank], offsets[s.rank] + s.rows
        grads = {name: g[lo:hi] for name, g in result.gradients.items()}
        triplets, ids = result.triplets, result.triplet_ids
        if triplets is not None:
            mine = ((triplets >= lo) & (triplets < hi)).any(1)
            triplets = triplets[mine]
            ids = ids[mine] if ids is not None else None
        out[s.rank] = replace(result, gradients=grads, triplets=triplets, triplet_ids=ids, n=s.rows)
    return out


# ---- the coordinator ---------------------------------------------------------------------------------------

@dataclass
class _Pending:
    """A step being collected: the slices so far and the futures of the members waiting for its answers."""

    step: int
    size: int
    slices: dict[int, Slice] = field(default_factory=dict)
    answers: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    first_arrival: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    started: bool = False  # the step is computing: slices can no longer be withdrawn

    def missing(self) -> list[int]:
        return [r for r in range(self.size) if r not in self.slices]


class GroupSteps:
    """Collects the slices of each group session's pending step and runs it once they are all there.

    ``prepare(session)`` -> slice or a kept answer, and ``commit(session, slices)`` -> answers by rank, run on the
    workers (the service's ``slice_of`` and ``commit_step``); this object only decides when.
    """

    def __init__(self, scheduler: Scheduler, metrics: Metrics) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self._pending: dict[str, _Pending] = {}
        self._running: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, session: Any, part: Slice, budget_check: Callable[[list[Slice]], None],
                     commit: Callable[[Any, list[Slice]], dict[int, bytes]]) -> bytes:
        """Add a member's slice to the session's pending step and wait for the step's answer to it."""
        sid = session.id
        pending = self._pending.get(sid)
        if pending is None:
            pending = self._pending[sid] = _Pending(part.step, session.spec.group_size)
            pending.timer = asyncio.get_running_loop().call_later(session.spec.group_timeout, self._abort, sid,
                                                                  pending)
        elif part.step != pending.step:
            raise FailedPrecondition(f"step: step {pending.step} is being collected (ranks {pending.missing()} "
                                     f"still missing); expected {pending.step}, got {part.step}", field="step")
        self.metrics.group_slices.inc()
        if part.rank in pending.slices:
            if pending.slices[part.rank].digest != part.digest:
                raise FailedPrecondition(f"rank: rank {part.rank} already sent a different slice for step "
                                         f"{part.step}", field="rank")
            return await asyncio.shield(pending.answers[part.rank])  # a resend while the step is collected
        budget_check([*pending.slices.values(), part])
        pending.slices[part.rank] = part
        answer = pending.answers[part.rank] = asyncio.get_running_loop().create_future()
        if not pending.missing():
            self.metrics.group_wait_seconds.observe(time.monotonic() - pending.first_arrival)
            task = asyncio.ensure_future(self._run(session, pending, commit))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            self._withdraw(sid, pending, part.rank)
            raise

    def _withdraw(self, sid: str, pending: _Pending, rank: int) -> None:
        """A member gave up before the step started: its slice leaves the step (the others keep waiting)."""
        if pending.started or self._pending.get(sid) is not pending:
            return
        pending.slices.pop(rank, None)
        future = pending.answers.pop(rank, None)
        if future is not None and not future.done():
            future.cancel()
        if not pending.slices:
            if pending.timer is not None:
                pending.timer.cancel()
            del self._pending[sid]

    async def _run(self, session: Any, pending: _Pending, commit: Callable[[Any, list[Slice]], dict[int, bytes]]
                   ) -> None:
        pending.started = True
        if pending.timer is not None:
            pending.timer.cancel()
        try:
            answers = await self.scheduler.run(commit, session, list(pending.slices.values()), session_id=session.id)
        except BaseException as exc:  # noqa: BLE001 - every member gets the step's error
            for future in pending.answers.values():
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            self.metrics.group_steps.labels("failed").inc()
        else:
            for rank, future in pending.answers.items():
                if not future.done():
                    future.set_result(answers[rank])
            self.metrics.group_steps.labels("committed").inc()
        finally:
            if self._pending.get(session.id) is pending:
                del self._pending[session.id]

    def _abort(self, sid: str, pending: _Pending) -> None:
        if pending.started or self._pending.get(sid) is not pending:
            return
        del self._pending[sid]
        missing = pending.missing()
        err = Aborted(f"step {pending.step} aborted: ranks {', '.join(map(str, missing))} did not send their slices "
                      f"within the session's group_timeout; nothing was applied; resend the whole step",
                      missing_ranks=missing)
        for future in pending.answers.values():
            if not future.done():
                future.set_exception(err)
        self.metrics.group_steps.labels("aborted").inc()


__all__ = ["GroupSteps", "Slice", "check_group_loss", "check_per_row", "common_options",
           "concatenate", "split"]
