"""Ordering and workers: the batches of one session run one at a time, in arrival order; torch work runs on
worker threads, not on the event loop (except a small stateless batch while the workers are idle: ``idle``,
``ServerConfig.inline_compute_seconds``).

A session's order is kept on the worker side: when a call of the session finishes, the worker that ran it hands
the next one to the pool at once, without a round trip through the event loop, so back-to-back batches of a
session (a stream) leave no worker idle between them. A call may come with a ``prepare`` step (decoding and the
checks that need no session state). When the workers are busy or the session has earlier calls, it runs at once on
a prepare thread, outside the order, so that batch k+1 is decoded and checked while batch k computes; its ordered
part follows in arrival order. When the workers are idle and the session has nothing before it, both run as one
piece of work on one worker (no hand-over between threads).

A cancelled or expired call frees what it holds: if its ordered part has not started it leaves the queue (its
prepare step too, if that has not started); once it runs it cannot be stopped, so the caller waits for it before
the cancellation goes through, and the session's order covers the whole run (the next batch never overlaps it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import cancellation
from .errors import ResourceExhausted
from .metrics import Metrics

T = TypeVar("T")


class _Call:
    """One ordered call of a session: waiting (for its prepare step or its turn), handed to a pool, running, done.
    Its state changes under the scheduler's lock."""

    __slots__ = ("fn", "args", "stop", "pool", "prepare", "prepared", "failed", "ready", "submitted", "started",
                 "abandoned", "future", "prepare_future", "prepare_on_workers")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], stop: threading.Event | None,
                 pool: ThreadPoolExecutor, prepare: Callable[[], Any] | None) -> None:
        self.fn, self.args, self.stop, self.pool, self.prepare = fn, args, stop, pool, prepare
        self.prepared: Any = None
        self.failed: BaseException | None = None  # what the prepare step raised: the call's outcome, in order
        self.ready = prepare is None  # its prepare step is done (or it has none)
        self.submitted = False  # its ordered part was handed to a pool (or runs right after its prepare step)
        self.started = False
        self.abandoned = False  # its caller is gone: if it has not started, it never will
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.prepare_future: concurrent.futures.Future[Any] | None = None
        self.prepare_on_workers = False

    def gone(self) -> bool:
        return self.abandoned or (self.stop is not None and self.stop.is_set())


class Scheduler:
    def __init__(self, workers: int, metrics: Metrics) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embtrain-worker")
        # Prepare steps (decoding, checks) of batches that would otherwise wait for a worker.
        self.prepare_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embtrain-prepare")
        self.metrics = metrics
        # The calls of each session with calls waiting or running, in arrival order (the first may be running):
        # the entry goes with the last of them, so ids that name no session leave nothing behind.
        self._orders: dict[str, collections.deque[_Call]] = {}
        self._busy = 0  # pieces of work handed to the workers (``executor``) and not finished
        self._lock = threading.Lock()
        self._local = threading.local()  # on a pool thread: the count of the piece of work it runs

    async def run(self, fn: Callable[..., T], *args: Any, session_id: str | None = None,
                  cancelled: Callable[[], bool] = lambda: False, stop: threading.Event | None = None,
                  pool: ThreadPoolExecutor | None = None, prepare: Callable[[], Any] | None = None) -> T:
        """``fn(*args)`` on a worker; with ``session_id``, after every earlier call of that session has finished.
        With ``prepare``, ``fn(*args, prepared=prepare())``: ``prepare`` may run before the call's turn, on another
        thread (it must not touch session state); what it raises is raised in order, without calling ``fn``. A
        call given up while it waits (the task cancelled, ``cancelled()`` true when it arrives, or ``stop`` set
        when its turn comes) never runs; ``stop``, once set, also ends a long computation at its next block
        (``cancellation``). ``pool``: run on those threads instead of the workers (the replicas' collectives,
        which must not queue behind other sessions' work)."""
        pool = pool or self.executor
        if session_id is None:
            if prepare is None:
                return await self._work(fn, *args, stop=stop, pool=pool)
            if pool is not self.executor or not self._busy:  # nothing to overlap with: one piece of work
                return await self._work(_prepared_then, prepare, fn, *args, stop=stop, pool=pool)
            # The workers are busy: prepared now on a prepare thread, then handed to a worker from there (an
            # order of its own, so the hand-over does not go through the event loop).
            session_id = _Alone()  # type: ignore[assignment]
        if cancelled():
            raise asyncio.CancelledError
        call = _Call(fn, args, stop, pool, prepare)
        with self._lock:
            order = self._orders.setdefault(session_id, collections.deque())
            order.append(call)
            alone = len(order) == 1 and not (pool is self.executor and self._busy)
            start = None if prepare is not None else self._next(session_id)
        if prepare is not None:
            self._submit(call, session_id, self._prepare_then_run, session_id, call, alone,
                         pool=call.pool if alone else self.prepare_pool, prepare_step=True)
        elif start is not None:
            self._submit(start, session_id, self._execute, session_id, start)
        fut = asyncio.wrap_future(call.future)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if stop is not None:  # the caller is gone: the work stops at its next block
                stop.set()
            if not self._abandon(session_id, call):  # it runs: wait for it, the session's order covers it
                await _wait_out(fut)
            raise

    def idle(self) -> bool:
        """Nothing handed to the workers or waiting in a session's order."""
        return not self._busy and not self._orders

    def busy(self, session_id: str) -> bool:
        """Whether a call of the session is queued or running."""
        return session_id in self._orders

    # ---- the session order (worker side) ---------------------------------------------------------------------
    def _next(self, session_id: str) -> _Call | None:
        """Under the lock: the session's first call, marked submitted, when it may start now (ready, its
        predecessors done); None otherwise. Drops given-up calls at the front, and the entry once it is empty."""
        order = self._orders.get(session_id)
        while order and order[0].abandoned and not order[0].submitted:
            order.popleft()
        if not order:
            self._orders.pop(session_id, None)
            return None
        head = order[0]
        if head.submitted or not head.ready:
            return None
        head.submitted = True
        return head

    def _submit(self, call: _Call, session_id: str, fn: Callable[..., Any], *args: Any,
                pool: ThreadPoolExecutor | None = None, prepare_step: bool = False) -> None:
        """Hand ``fn(*args)`` (a step of ``call``) to ``pool`` (default: the call's)."""
        pool = pool or call.pool
        main = pool is self.executor
        self.metrics.worker_calls.inc()
        if main:
            with self._lock:
                self._busy += 1
        try:
            cf = pool.submit(self._counted, main, fn, *args)
        except RuntimeError as exc:  # the pool was shut down (the server stops): the call fails, the order moves on
            self._release([main])
            self._finish_call(call, exc=exc)
            with self._lock:
                call.abandoned = True
                order = self._orders.get(session_id)
                if not prepare_step and order and order[0] is call:
                    order.popleft()
                nxt = self._next(session_id)
            if nxt is not None:
                self._submit(nxt, session_id, self._execute, session_id, nxt)
            return
        if prepare_step:
            call.prepare_future, call.prepare_on_workers = cf, main

    def _counted(self, main: bool, fn: Callable[..., Any], *args: Any) -> None:
        """A piece of work on a pool thread; it stops counting as handed to the workers when it ends, or just
        before it publishes a call's outcome (``_finish_call``), whichever comes first: whoever sees the answer
        sees the work gone."""
        token = [main]
        previous = getattr(self._local, "token", None)
        self._local.token = token
        try:
            fn(*args)
        finally:
            self._local.token = previous
            self._release(token)

    def _release(self, token: list[bool]) -> None:
        if token:  # not released yet
            main = token.pop()
            self.metrics.worker_calls.dec()
            if main:
                with self._lock:
                    self._busy -= 1

    def _prepare_then_run(self, session_id: str, call: _Call, inline: bool) -> None:
        """The call's prepare step, then (``inline``: on this worker) its ordered part if its turn has come."""
        if not call.gone():
            try:
                with cancellation.scope(call.stop):
                    call.prepared = call.prepare()  # type: ignore[misc]
            except BaseException as exc:  # noqa: BLE001 - handed to the caller in order
                call.failed = exc
        with self._lock:
            call.ready = True
            start = self._next(session_id)
        if start is call and inline:
            self._execute(session_id, call)
        elif start is not None:
            self._submit(start, session_id, self._execute, session_id, start)

    def _execute(self, session_id: str, call: _Call) -> None:
        """A worker: the call's ordered part (unless its caller is gone), then the session's next call is handed
        to its pool."""
        try:
            with self._lock:
                skip = call.gone()
                call.started = not skip
            if skip:
                self._finish_call(call, exc=asyncio.CancelledError())
            elif call.failed is not None:
                self._finish_call(call, exc=call.failed)
            else:
                try:
                    with cancellation.scope(call.stop):
                        extra = {} if call.prepare is None else {"prepared": call.prepared}
                        result = call.fn(*call.args, **extra)
                except BaseException as exc:  # noqa: BLE001 - the caller's outcome
                    self._finish_call(call, exc=exc)
                else:
                    self._finish_call(call, result=result)
        finally:
            call.prepared = None  # the decoded batch is not kept alive by the order
            with self._lock:
                order = self._orders.get(session_id)
                if order and order[0] is call:
                    order.popleft()
                nxt = self._next(session_id)
            if nxt is not None:
                self._submit(nxt, session_id, self._execute, session_id, nxt)

    def _finish_call(self, call: _Call, result: Any = None, exc: BaseException | None = None) -> None:
        token = getattr(self._local, "token", None)
        if token is not None:
            self._release(token)
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

    def _abandon(self, session_id: str, call: _Call) -> bool:
        """The caller of ``call`` is gone (on the event loop). True if the call never runs (it left the order),
        False if it runs or already ran."""
        with self._lock:
            if call.started or (call.submitted and call.future.done()):
                return False
            call.abandoned = True
            if call.submitted:  # handed to a pool and not started: the worker skips it and moves the order on
                return True
            order = self._orders.get(session_id)
            if order is not None:
                with contextlib.suppress(ValueError):
                    order.remove(call)
            start = self._next(session_id)
        if call.prepare_future is not None and call.prepare_future.cancel():  # never ran: nothing else counts it
            self._release([call.prepare_on_workers])
        if start is not None:
            self._submit(start, session_id, self._execute, session_id, start)
        return True

    # ---- calls outside any order -----------------------------------------------------------------------------
    async def _work(self, fn: Callable[..., T], *args: Any, stop: threading.Event | None = None,
                    pool: ThreadPoolExecutor | None = None) -> T:
        pool = pool or self.executor
        main = pool is self.executor
        if main:
            with self._lock:
                self._busy += 1
        cf = pool.submit(_in_scope, stop, fn, *args)
        fut = asyncio.wrap_future(cf)
        self.metrics.worker_calls.inc()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if stop is not None:  # the caller is gone: the work stops at its next block
                stop.set()
            if not cf.cancel():
                await _wait_out(fut)
            raise
        finally:
            self.metrics.worker_calls.dec()
            if main:
                with self._lock:
                    self._busy -= 1

    def shutdown(self) -> None:
        self.prepare_pool.shutdown(wait=True)
        self.executor.shutdown(wait=True)


class _Alone:
    """The order of a call outside any session's (compared by identity)."""

    __slots__ = ()


async def _wait_out(fut: asyncio.Future[Any]) -> None:
    """Wait until work that has started ends, whatever its outcome and however often this task is cancelled
    meanwhile (its caller is gone: the outcome has nowhere to go)."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except Exception:  # noqa: BLE001 - the caller is gone; the outcome has nowhere to go
            break


def _in_scope(stop: threading.Event | None, fn: Callable[..., T], *args: Any) -> T:
    with cancellation.scope(stop):
        return fn(*args)


def _prepared_then(prepare: Callable[[], Any], fn: Callable[..., T], *args: Any) -> T:
    return fn(*args, prepared=prepare())


class Admission:
    """Server-wide admission by the bytes of the requests in flight (received and not yet answered, unary and
    stream, waiting for a worker or computing), against the memory budget: a request that does not fit waits in a
    bounded queue, and is refused with RESOURCE_EXHAUSTED when the queue is full or it could never fit. (Each
    batch's own working memory is estimated against the same budget once it is decoded; see ``validation``.)"""

    def __init__(self, budget: int, max_waiting: int, metrics: Metrics) -> None:
        self.budget = budget
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.in_flight = 0
        self.waiting = 0
        self._changed = asyncio.Condition()

    def hold(self, nbytes: int) -> _Held:
        """``async with admission.hold(nbytes):`` the request's bytes count against the budget inside."""
        return _Held(self, nbytes)

    async def _enter(self, nbytes: int) -> None:
        if self.budget and nbytes > self.budget:
            raise ResourceExhausted(f"request: {nbytes} bytes, over the server's memory budget of {self.budget} "
                                    "bytes; send smaller batches", field="request")
        if not self.budget or self.in_flight + nbytes <= self.budget:  # fits now: no lock, no wait
            self.in_flight += nbytes
            self.metrics.admitted_bytes.set(self.in_flight)
            return
        async with self._changed:
            if self.in_flight + nbytes > self.budget:
                if self.waiting >= self.max_waiting:
                    raise ResourceExhausted(f"request: the server holds {self.in_flight} bytes of requests and "
                                            f"{self.waiting} more wait; retry later", field="request")
                self.waiting += 1
                try:
                    await self._changed.wait_for(lambda: self.in_flight + nbytes <= self.budget)
                finally:
                    self.waiting -= 1
            self.in_flight += nbytes
            self.metrics.admitted_bytes.set(self.in_flight)

    async def _exit(self, nbytes: int) -> None:
        self.in_flight -= nbytes
        self.metrics.admitted_bytes.set(self.in_flight)
        if self.waiting:
            async with self._changed:
                self._changed.notify_all()


class _Held:
    """One request's bytes held against the admission budget (``Admission.hold``)."""

    __slots__ = ("admission", "nbytes")

    def __init__(self, admission: Admission, nbytes: int) -> None:
        self.admission, self.nbytes = admission, nbytes

    async def __aenter__(self) -> None:
        await self.admission._enter(self.nbytes)

    async def __aexit__(self, *exc: object) -> None:
        await self.admission._exit(self.nbytes)


class WorkingMemory:
    """The estimated working memory of the batches computing at the same time (several workers share a GPU)
    against the memory budget: a batch waits on its worker until the running ones leave room for it. Each batch
    alone fits (``validation`` refused any that does not), so the first to find the device idle always runs."""

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics
        self.in_use = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = min(nbytes, self.budget) if self.budget else 0
        with self._changed:
            while self.in_use and self.in_use + nbytes > self.budget:
                self._changed.wait(0.05)
                cancellation.check()  # a caller that gives up while its batch waits frees the worker
            self.in_use += nbytes
            self.metrics.working_bytes.set(self.in_use)
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self.metrics.working_bytes.set(self.in_use)
                self._changed.notify_all()
