"""Replicas: R embtrain processes that serve replicated sessions together, on torch.distributed.

A server started with ``world_size`` R > 1 is replica ``rank`` of a group. Replica 0 keeps the group's
``TCPStore`` (``master_addr:master_port``); every replica joins a process group over it (gloo on a CPU device,
NCCL on CUDA). Ordinary sessions stay on the replica that created them; a *replicated* session exists on every
replica under one id, and its steps are computed by all of them.

Three rules keep the group healthy:

* **Nothing enters a collective unless every replica will.** All collective work is an *operation* in one log
  kept in the store (``seq`` hands out numbers, ``op/<t>`` holds operation t); each replica's executor thread
  runs the operations in log order, so the collectives of different sessions never interleave differently on
  different replicas.
* **A step is agreed through the store first.** A member may send its slice to any replica (rank r to replica
  ``r mod R`` spreads the load). The replica that receives a rank first counts it; the replica whose count
  completes the step writes the decision ``commit`` (compare-and-set, so exactly one decision per attempt) and
  appends the step to the log. A replica whose ``group_timeout`` passes first writes ``abort`` with the missing
  ranks instead: every replica answers its members ABORTED and nothing is applied anywhere; the resent step is
  the next attempt. A missing member costs an aborted step, never a broken process group.
* **A replica that is lost stops the replicated sessions, not the server.** Each replica writes a heartbeat into
  the store; one that is silent for ``replica_timeout`` (or a collective that fails) makes every other replica
  answer its replicated sessions UNAVAILABLE naming it, while ordinary sessions go on. When every replica beats
  again the group forms anew (a new *epoch*: a fresh process group and log under a new key prefix), and the
  replicated sessions are brought level: each takes the state of the replica with the highest step (its
  checkpoint bytes, broadcast), so a replica that restarted from an older checkpoint catches up.

Replicate mode (the default): the operation gathers every replica's slices (sizes first, then the bytes: uneven
slices are fine), and every replica computes the whole step on the concatenation in rank order with the same
code as one server (``Batches.commit_step``): loss, gradients, triplets and state are bit for bit one server's.
Before a step is applied the replicas vote (all or none applies it), and every ``digest_every_steps`` steps they
compare a digest of the session's state. Shard mode (``SessionSpec.shard``): the same, except that each replica
computes the loss terms of its share of the anchors and the partial results are summed (``sharding``).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .compute import ComputeOptions
from .config import ServerConfig
from .errors import Aborted, FailedPrecondition, ServiceError, Unavailable
from .groups import Slice
from .batches import Batches
from .metrics import Metrics
from .persistence import Checkpointer
from .scheduler import Scheduler
from .sessions import Session, SessionSpec, SessionStore

log = logging.getLogger("embtrain.replicas")

HEARTBEAT_SECONDS = 0.25
_POLL_FIRST, _POLL_MAX = 0.0005, 0.02  # seconds between looks at a store key that is not there yet


class _StoreGone(Exception):
    """The store could not be reached (replica 0 is down, or the network)."""

    def __init__(self, why: str) -> None:
        super().__init__(why.splitlines()[0] if why else "no answer")


def _backoff(delay: float) -> float:
    time.sleep(delay)
    return min(delay * 2, _POLL_MAX)


@dataclass
class _Pending:
    """This replica's part of a replicated step being agreed: the slices that arrived here and their waiters."""

    step: int
    size: int
    epoch: int
    attempt: int = -1
    slices: dict[int, Slice] = field(default_factory=dict)
    answers: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    ready: asyncio.Future[int] | None = None  # the attempt number, once looked up in the store
    timer: asyncio.TimerHandle | None = None
    watching: bool = False
    done: bool = False


class Replicas:
    """This process's place in the group of replicas (membership, the operation log, replicated steps)."""

    def __init__(self, config: ServerConfig, sessions: SessionStore, scheduler: Scheduler, metrics: Metrics,
                 device: torch.device, batches: Batches, checkpointer: Checkpointer) -> None:
        self.config = config
        self.rank = config.rank
        self.size = config.world_size
        self.sessions = sessions
        self.scheduler = scheduler
        self.metrics = metrics
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.batches = batches  # commits the steps
        self.checkpointer = checkpointer
        self.address = ""  # this replica's gRPC address, published for the others' messages
        self.incarnation = uuid.uuid4().hex[:12]
        self.formed = threading.Event()  # set once the group has formed the first time
        self._up = False
        self._reason = "the replicas' process group has not formed yet"
        self._epoch = -1  # the epoch whose process group this replica is in (-1: none)
        self._store_id = ""
        self._master: dist.TCPStore | None = None  # replica 0 hosts the store
        self._local = threading.local()  # one store client per thread
        self._store_generation = 0  # bumped when the store went away: every thread reconnects
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[str, _Pending] = {}  # by session id (loop thread)
        self._attempts: dict[tuple[str, int], int] = {}  # (session, step) -> next attempt to use
        self._waiting_ops: dict[str, Future[Any]] = {}  # operations this replica appended, by token
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="embtrain-replica-store")
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embtrain-replica-compute")
        self._threads: list[threading.Thread] = []
        self._executor: threading.Thread | None = None
        self._last_seen: dict[int, tuple[bytes, float]] = {}
        self._alive = False
        self._lost: list[int] = []
        self._addresses: dict[int, str] = {}  # the other replicas' gRPC addresses, for messages
        self._store_why = ""

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open (replica 0) or reach the store and start the heartbeat; the group forms in the background
        (``formed`` is set then). Raises ``ValueError`` when replica 0 cannot open the store's port."""
        self._loop = loop
        if self.rank == 0:
            try:
                self._master = dist.TCPStore(self.config.master_addr, self.config.master_port, None, True,
                                             timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
            except (RuntimeError, OSError) as exc:
                raise ValueError(f"master_port: replica 0 could not open the group's store on "
                                 f"{self.config.master_addr}:{self.config.master_port}: {exc}") from None
            self._master.set("store_id", uuid.uuid4().hex[:12])
        for target, name in ((self._beat, "heartbeat"), (self._watch, "monitor")):
            thread = threading.Thread(target=target, name=f"embtrain-replica-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Leave the group (the others see this replica lost once its heartbeat stops)."""
        self._stopping.set()
        self._up = False
        for thread in self._threads:
            thread.join(timeout=2)
        if not any(t.is_alive() for t in self._threads):  # a thread still forming a group keeps it
            self._leave()
        self._io.shutdown(wait=False, cancel_futures=True)
        self._compute.shutdown(wait=False, cancel_futures=True)

    @property
    def up(self) -> bool:
        return self._up

    def describe(self) -> str:
        return (f"replica {self.rank} of {self.size} (store {self.config.master_addr}:{self.config.master_port}, "
                f"{self.backend})")

    def require_up(self) -> None:
        if not self._up:
            raise Unavailable(self._reason)

    # ---- the store -----------------------------------------------------------------------------------------
    def _store(self) -> dist.Store:
        """This thread's client of the store (reconnecting after the store went away)."""
        local = self._local
        if getattr(local, "store", None) is None or local.generation != self._store_generation:
            local.generation = self._store_generation
            try:
                local.store = dist.TCPStore(self.config.master_addr, self.config.master_port, None, False,
                                            timeout=datetime.timedelta(seconds=max(2.0, self.config.replica_timeout)))
            except (RuntimeError, OSError) as exc:
                local.store = None
                raise _StoreGone(str(exc)) from None
        return local.store

    def _call(self, fn: Callable[[dist.Store], Any]) -> Any:
        try:
            return fn(self._store())
        except _StoreGone:
            raise
        except (RuntimeError, OSError) as exc:  # DistNetworkError, DistStoreError are RuntimeErrors
            self._local.store = None
            raise _StoreGone(str(exc)) from None

    def _key(self, *parts: Any) -> str:
        return "/".join([self._store_id, f"e{self._epoch}", *map(str, parts)])

    def _get_if(self, store: dist.Store, key: str) -> bytes | None:
        return store.get(key) if store.check([key]) else None

    # ---- membership (the heartbeat and monitor threads) ----------------------------------------------------
    def _beat(self) -> None:
        """Write this replica's heartbeat and read the others' (its own thread, so that forming a group, which
        blocks, never silences it)."""
        beat = 0
        while not self._stopping.is_set():
            beat += 1
            try:
                self._alive, self._lost = self._heartbeat(beat)
            except _StoreGone as exc:
                self._alive, self._lost = False, ([0] if self.rank != 0 else [])
                self._store_why = str(exc)
                self._store_generation += 1
                self._stopping.wait(HEARTBEAT_SECONDS * 4)
                continue
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("replica heartbeat")
            self._stopping.wait(HEARTBEAT_SECONDS)

    def _watch(self) -> None:
        """Break the group when a replica is lost or the epoch moved on; form it when every replica beats."""
        while not self._stopping.is_set():
            try:
                lost = self._lost
                if self._up and lost:
                    why = (f"it keeps the group's store, which does not answer: {self._store_why}"
                           if lost == [0] and self._store_why else "")
                    self._break(self._lost_text(lost, why))
                elif self._up and self._epoch_now() != self._epoch:
                    self._break("a replica rejoined the group; it is forming again")
                if not self._up and self._alive and self._store_id:
                    self._form()
            except _StoreGone:
                pass  # the heartbeat reports it
            except Exception:  # noqa: BLE001 - the monitor must outlive any one failure
                log.exception("replica monitor")
            self._stopping.wait(HEARTBEAT_SECONDS)

    def _heartbeat(self, beat: int) -> tuple[bool, list[int]]:
        """Write this replica's heartbeat, read the others'. Returns (every replica beating, the lost ones)."""
        def run(store: dist.Store) -> dict[int, bytes | None]:
            store_id = store.get("store_id").decode()
            if store_id != self._store_id:
                if self._store_id:
                    log.warning("the group's store was restarted (replica 0 came back); forming the group anew")
                    self._break(self._lost_text([0], "it restarted"))
                self._last_seen.clear()
                self._epoch = -1
                self._store_id = store_id
            self._store_why = ""
            store.set(f"{self._store_id}/hb/{self.rank}", f"{self.incarnation}:{beat}")
            store.set(f"{self._store_id}/addr/{self.rank}", self.address)
            for k in range(self.size):
                if k != self.rank and not self._addresses.get(k):
                    self._addresses[k] = (self._get_if(store, f"{self._store_id}/addr/{k}") or b"").decode()
            return {k: self._get_if(store, f"{self._store_id}/hb/{k}") for k in range(self.size) if k != self.rank}
        beats = self._call(run)
        now = time.monotonic()
        lost = []
        for k, value in beats.items():
            seen = self._last_seen.get(k)
            if value is not None and (seen is None or seen[0] != value):
                self._last_seen[k] = (value, now)
            elif seen is not None and now - seen[1] > self.config.replica_timeout:
                lost.append(k)
        return not lost and all(v is not None for v in beats.values()), lost

    def _epoch_now(self) -> int:
        return int(self._call(lambda s: s.add(f"{self._store_id}/epoch", 0)))

    def _store_unavailable(self, exc: _StoreGone) -> Unavailable:
        return Unavailable(self._lost_text([0], f"it keeps the group's store, which does not answer: {exc}"))

    def _lost_text(self, lost: list[int], why: str = "") -> str:
        names = [f"replica {k}" + (f" ({self._addresses[k]})" if self._addresses.get(k) else "") for k in lost]
        seen = {k: self._last_seen.get(k) for k in lost}
        ago = [f"{time.monotonic() - s[1]:.1f} s" for s in seen.values() if s is not None]
        detail = why or (f"no heartbeat for {', '.join(ago)}" if ago else "never seen")
        return (f"{', '.join(names)} of the {self.size} replicas is unavailable ({detail}); the replicated sessions "
                "answer again once the group has formed anew (resend step-numbered batches then)")

    def _form(self) -> None:
        """Join the current epoch's process group (bumping the epoch when that one formed without this replica or
        broke), bring the replicated sessions level and start the executor."""
        self._leave()
        store_key = f"{self._store_id}/epoch"

        def pick(store: dist.Store) -> int:
            epoch = int(store.add(store_key, 0))
            if store.check([f"{self._store_id}/formed/{epoch}"]):  # formed without us, or broken: a new epoch
                store.compare_set(store_key, str(epoch), str(epoch + 1))
                epoch = int(store.add(store_key, 0))
            return epoch
        epoch = self._call(pick)
        log.info("replica %d of %d: forming the process group (epoch %d)", self.rank, self.size, epoch)
        try:
            own = dist.TCPStore(self.config.master_addr, self.config.master_port, None, False,
                                timeout=datetime.timedelta(seconds=self.config.collective_timeout))
        except (RuntimeError, OSError) as exc:
            raise _StoreGone(str(exc)) from None
        prefix = dist.PrefixStore(f"{self._store_id}/e{epoch}/pg/", own)
        try:
            dist.init_process_group(self.backend, store=prefix, rank=self.rank, world_size=self.size,
                                    timeout=datetime.timedelta(seconds=self.config.collective_timeout))
        except Exception as exc:  # noqa: BLE001 - not every replica joined this epoch: try again
            log.warning("replica %d: the process group of epoch %d did not form (%s); retrying", self.rank, epoch,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._leave()
            return
        self._epoch = epoch
        if self.rank == 0:
            self._call(lambda s: s.set(f"{self._store_id}/formed/{epoch}", "1"))
        try:
            synced = self._level_sessions()
        except Exception as exc:  # noqa: BLE001 - a replica failed while the sessions were levelled
            log.warning("replica %d: levelling the replicated sessions failed (%s); forming again", self.rank, exc)
            self._leave()
            return
        if self.formed.is_set():
            self.metrics.replica_reforms.inc()
        self._executor = threading.Thread(target=self._execute, args=(epoch,), name="embtrain-replica-ops",
                                          daemon=True)
        self._up = True
        self.metrics.replica_up.set(1)
        self._executor.start()
        self.formed.set()
        log.info("replica %d of %d: process group formed (epoch %d, %s); %d replicated session(s) levelled",
                 self.rank, self.size, epoch, self.backend, synced)

    def _break(self, reason: str) -> None:
        """The group is no longer whole: replicated sessions answer UNAVAILABLE until it forms again."""
        if not self._up:
            return
        self._up = False
        self._reason = reason
        self.metrics.replica_up.set(0)
        log.warning("replica %d: %s", self.rank, reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_pending, reason)
        for token, fut in list(self._waiting_ops.items()):
            if not fut.done():
                fut.set_exception(Unavailable(reason))
            self._waiting_ops.pop(token, None)

    def _leave(self) -> None:
        executor = self._executor
        if executor is not None and executor is not threading.current_thread():
            executor.join(timeout=self.config.collective_timeout + 5)
        self._executor = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
                log.debug("destroying the process group", exc_info=True)

    # ---- collectives (the executor's threads only) ---------------------------------------------------------
    def _coll_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _gather_bytes(self, data: bytes) -> list[bytes]:
        """Every replica's bytes, in replica order (sizes first, then the padded bytes)."""
        dev = self._coll_device()
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.size)]
        dist.all_gather(sizes, n)
        lengths = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(dev)
        outs = [torch.empty_like(buf) for _ in range(self.size)]
        dist.all_gather(outs, buf)
        return [o[:k].cpu().numpy().tobytes() for o, k in zip(outs, lengths)]

    def _flags(self, ok: bool) -> list[int]:
        """The replicas that said no (an all-gather of one flag each)."""
        dev = self._coll_device()
        flags = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.size)]
        dist.all_gather(flags, torch.tensor([int(ok)], dtype=torch.int64, device=dev))
        return [k for k, f in enumerate(flags) if not int(f.item())]

    def _broadcast_bytes(self, data: bytes, source: int) -> bytes:
        dev = self._coll_device()
        n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(n, source)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8)
        if self.rank == source:
            buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(dev)
        dist.broadcast(buf, source)
        return buf.cpu().numpy().tobytes()

    # ---- levelling the replicated sessions after the group formed ------------------------------------------
    def _level_sessions(self) -> int:
        """Every replica holds every replicated session at the highest step any replica has (its state, answers
        and checkpoint bytes come from the lowest-numbered replica at that step). Returns how many were copied."""
        mine = {s.id: s.step for s in self.sessions.all() if s.spec.replicated}
        held = json.loads(b"[" + b",".join(self._gather_bytes(json.dumps(mine).encode())) + b"]")
        copied = 0
        for sid in sorted(set().union(*held)):
            steps = {k: h[sid] for k, h in enumerate(held) if sid in h}
            best = max(steps.values())
            source = min(k for k, st in steps.items() if st == best)
            if len(steps) == self.size and len(set(steps.values())) == 1:
                continue
            data = b""
            if self.rank == source:
                data = checkpoint.encode(*checkpoint.session_to_checkpoint(self.sessions.peek(sid)))
            data = self._broadcast_bytes(data, source)
            if self.rank != source and steps.get(self.rank) != best:
                sess = checkpoint.session_from_checkpoint(*checkpoint.decode(data), self.device)
                self.sessions.add_restored(sess)
                self.checkpointer.try_save(sess)
                copied += 1
                log.info("replicated session %s: took step %d from replica %d (had %s)", sid, best, source,
                         steps.get(self.rank, "none"))
        return copied

    # ---- the operation log ---------------------------------------------------------------------------------
    def _append(self, record: dict[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> Future[Any]:
        """Append an operation for every replica's executor; the future gets this replica's outcome of it."""
        token = uuid.uuid4().hex
        record = {**record, "token": token}
        fut: Future[Any] = Future()
        self._waiting_ops[token] = fut
        data = checkpoint.encode(record, tensors or {})

        def run(store: dist.Store) -> None:
            t = store.add(self._key("seq"), 1)
            store.set(self._key("op", t), data)
        try:
            self._call(run)
        except _StoreGone as exc:
            self._waiting_ops.pop(token, None)
            raise self._store_unavailable(exc) from None
        return fut

    def _execute(self, epoch: int) -> None:
        """Run the operations of ``epoch`` in log order until the group breaks or the epoch ends."""
        t = 0
        while self._up and self._epoch == epoch and not self._stopping.is_set():
            t += 1
            data = None
            delay = _POLL_FIRST
            while data is None and self._up and self._epoch == epoch and not self._stopping.is_set():
                try:
                    data = self._call(lambda s: self._get_if(s, self._key("op", t)))
                except _StoreGone:
                    return  # the monitor notices
                if data is None:
                    delay = _backoff(delay)
            if data is None:
                return
            record, tensors = checkpoint.decode(data)
            outcome: Any = None
            failed: BaseException | None = None
            try:
                outcome = {"step": self._op_step, "create": self._op_create, "close": self._op_close}[
                    record["kind"]](record, tensors)
            except ServiceError as exc:
                failed = exc
            except Exception as exc:  # noqa: BLE001 - a collective failed: the group is broken
                failed = Unavailable(f"replica {self.rank}: a collective of the replicas failed ({exc}); the group "
                                     "is forming anew")
                self._break(str(failed))
            if self.rank == 0 and failed is None:
                # Every replica has read it (the operation's collectives completed): the key can go.
                self._call(lambda s: s.delete_key(self._key("op", t)))
            fut = self._waiting_ops.pop(record.get("token", ""), None)
            if fut is not None and not fut.done():
                fut.set_exception(failed) if failed is not None else fut.set_result(outcome)

    def _on_loop(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- operations ----------------------------------------------------------------------------------------
    def create(self, spec: SessionSpec, owner: str, initial: Mapping[str, torch.Tensor]) -> Session:
        """A replicated session on every replica (or on none). Called on a worker of the replica asked."""
        self.require_up()
        self.sessions.check_room(owner)
        sid = self.sessions.new_id()
        record = {"kind": "create", "id": sid, "owner": owner, "spec": spec.to_dict()}
        self._wait(self._append(record, {f"initial.{k}": v for k, v in initial.items()}))
        return self.sessions.get(sid, owner)

    def _wait(self, fut: Future[Any]) -> Any:
        try:
            return fut.result(timeout=2 * self.config.collective_timeout + self.config.replica_timeout)
        except TimeoutError:
            raise Unavailable("the replicas did not carry out the operation in time; the group may be forming "
                              "anew; retry") from None

    def _op_create(self, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        sid, owner = record["id"], record["owner"]
        initial = {k.removeprefix("initial."): v for k, v in tensors.items()}
        error: ServiceError | None = None
        try:
            sess = self.sessions.create(SessionSpec.from_dict(record["spec"]), owner, initial, session_id=sid)
            self.checkpointer.save(sess)
        except ServiceError as exc:
            error = exc
        except OSError:
            error = Unavailable("the new session's checkpoint could not be written")
        refused = self._flags(error is None)
        if refused:
            if error is None:
                self._drop(sid, owner)
            raise error or Unavailable(f"replica(s) {', '.join(map(str, refused))} could not create the session "
                                       "(their logs say why); no session was created")
        self.metrics.open_sessions.set(len(self.sessions))

    def close(self, session: Session, keep: bool) -> None:
        self.require_up()
        self._wait(self._append({"kind": "close", "id": session.id, "owner": session.owner, "keep": keep}))

    def _op_close(self, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self._drop(record["id"], record["owner"], keep=bool(record.get("keep")))
        self.metrics.open_sessions.set(len(self.sessions))
        self._flags(True)  # answered once every replica has dropped it

    def _drop(self, sid: str, owner: str, keep: bool = False) -> None:
        try:
            sess = self.sessions.get(sid, owner)
        except ServiceError:
            return
        self.checkpointer.on_close(sess, keep=keep)
        self.sessions.remove(sid, owner)

    # ---- replicated steps ----------------------------------------------------------------------------------
    async def submit(self, session: Session, part: Slice, budget_check: Callable[[list[Slice]], None]) -> bytes:
        """A member's slice of a replicated session's step: agreed with the other replicas through the store, then
        computed by all of them (the executor); returns this member's answer."""
        self.require_up()
        loop = asyncio.get_running_loop()
        sid = session.id
        pending = self._pending.get(sid)
        if pending is None or pending.done or pending.epoch != self._epoch:
            pending = self._pending[sid] = _Pending(part.step, session.spec.group_size, self._epoch)
            pending.ready = asyncio.ensure_future(self._io_call(self._attempt_of, sid, part.step))
            pending.timer = loop.call_later(session.spec.group_timeout, self._timed_out, sid, pending)
        elif part.step != pending.step:
            raise FailedPrecondition(f"step: step {pending.step} is being collected; expected {pending.step}, got "
                                     f"{part.step}", field="step")
        self.metrics.group_slices.inc()
        if part.rank in pending.slices:
            if pending.slices[part.rank].digest != part.digest:
                raise FailedPrecondition(f"rank: rank {part.rank} already sent a different slice for step "
                                         f"{part.step}", field="rank")
            return await asyncio.shield(pending.answers[part.rank])
        budget_check([*pending.slices.values(), part])
        pending.slices[part.rank] = part
        answer = pending.answers[part.rank] = loop.create_future()
        try:
            attempt = await asyncio.shield(pending.ready)
        except _StoreGone as exc:
            self._finish(pending, self._store_unavailable(exc))
            return await answer
        pending.attempt = attempt
        try:
            await self._io_call(self._arrive, sid, pending.step, attempt, part.rank, pending.size)
        except _StoreGone as exc:
            self._finish(pending, self._store_unavailable(exc))
        if not pending.watching:
            pending.watching = True
            asyncio.ensure_future(self._watch_decision(sid, pending))
        return await asyncio.shield(answer)

    async def _io_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _attempt_of(self, sid: str, step: int) -> int:
        """The attempt of (session, step) that is still open: attempts aborted earlier are skipped."""
        attempt = self._attempts.get((sid, step), 0)
        while True:
            decided = self._call(lambda s, a=attempt: self._get_if(s, self._key("step", sid, step, a, "decide")))
            if decided is None:
                return attempt
            if decided == b"commit":
                raise Unavailable(f"step {step} is being applied by the replicas; resend it to get its answer")
            attempt += 1
            self._attempts[(sid, step)] = attempt

    async def committed(self, sid: str, step: int) -> bool:
        """Whether the group decided to commit (session, step) (this replica may not have applied it yet)."""
        def run(store: dist.Store) -> bool:
            attempt = self._attempts.get((sid, step), 0)
            while (decided := self._get_if(store, self._key("step", sid, step, attempt, "decide"))) is not None:
                if decided == b"commit":
                    return True
                attempt += 1
            return False
        try:
            return bool(await self._io_call(self._call, run))
        except _StoreGone:
            return False

    def _arrive(self, sid: str, step: int, attempt: int, rank: int, size: int) -> None:
        """Count a rank of (session, step, attempt) the first time any replica holds it; the replica completing
        the count decides ``commit`` and appends the step to the operation log."""
        def run(store: dist.Store) -> None:
            base = self._key("step", sid, step, attempt)
            if store.add(f"{base}/rank/{rank}", 1) != 1 or store.add(f"{base}/count", 1) != size:
                return
            if store.compare_set(f"{base}/decide", "", "commit") == b"commit":
                t = store.add(self._key("seq"), 1)
                store.set(self._key("op", t), checkpoint.encode(
                    {"kind": "step", "id": sid, "step": step, "attempt": attempt}, {}))
        self._call(run)

    def _timed_out(self, sid: str, pending: _Pending) -> None:
        async def abort() -> None:
            if pending.ready is not None:
                await asyncio.wait([pending.ready])
            if not pending.done and pending.attempt >= 0:
                await self._io_call(self._abort, sid, pending)
        asyncio.ensure_future(abort())

    def _abort(self, sid: str, pending: _Pending) -> None:
        def run(store: dist.Store) -> None:
            base = self._key("step", sid, pending.step, pending.attempt)
            missing = [r for r in range(pending.size) if not store.check([f"{base}/rank/{r}"])]
            store.compare_set(f"{base}/decide", "", "abort:" + ",".join(map(str, missing)))
        try:
            self._call(run)
        except _StoreGone:
            pass  # the monitor breaks the group; the pending step fails with it

    async def _watch_decision(self, sid: str, pending: _Pending) -> None:
        """Wait for the decision on this replica's pending step: an abort answers its members here; a commit is
        answered by the executor."""
        key = self._key("step", sid, pending.step, pending.attempt, "decide")
        delay = _POLL_FIRST
        while not pending.done:
            try:
                decided = await self._io_call(lambda: self._call(lambda s: self._get_if(s, key)))
            except _StoreGone:
                return
            if decided is not None and decided.startswith(b"abort"):
                missing = [int(r) for r in decided.decode().partition(":")[2].split(",") if r]
                self._attempts[(sid, pending.step)] = pending.attempt + 1
                self.metrics.group_steps.labels("aborted").inc()
                self._finish(pending, Aborted(
                    f"step {pending.step} aborted: ranks {', '.join(map(str, missing))} did not send their slices "
                    "within the session's group_timeout; nothing was applied on any replica; resend the whole step",
                    missing_ranks=missing))
                return
            if decided is not None:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)

    def _finish(self, pending: _Pending, outcome: BaseException | Mapping[int, bytes]) -> None:
        """Answer this replica's members of a pending step (loop thread)."""
        pending.done = True
        if pending.timer is not None:
            pending.timer.cancel()
        for rank, fut in pending.answers.items():
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            elif rank in outcome:
                fut.set_result(outcome[rank])
            else:  # a resend that arrived while the step was computed: the kept answer is there now
                fut.set_exception(Unavailable(f"step {pending.step} was applied while this slice arrived; resend it "
                                              "to get its answer"))
        for sid, p in list(self._pending.items()):
            if p is pending:
                del self._pending[sid]

    def _fail_pending(self, reason: str) -> None:
        for pending in list(self._pending.values()):
            self._finish(pending, Unavailable(reason))

    def _op_step(self, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Operation ``step``: gather the slices of every replica, compute and apply the step (all or none), answer
        this replica's members."""
        sid, step = record["id"], int(record["step"])
        session = self.sessions.peek(sid)
        pending = self._pending.get(sid)
        if pending is not None and (pending.step != step or pending.attempt != record["attempt"]):
            pending = None
        local = list(pending.slices.values()) if pending is not None else []
        if session is None:  # cannot happen while the replicas agree on the sessions; nothing to compute
            raise Unavailable(f"session_id: replica {self.rank} does not hold session {sid!r}")
        try:
            answers = self._on_loop(self.scheduler.run(self._commit, session, local, session_id=sid,
                                                       pool=self._compute))
        except BaseException as exc:
            # Refused on every replica, nothing applied: a resend of the step is its next attempt.
            self._attempts[(sid, step)] = int(record["attempt"]) + 1
            if pending is not None:
                self._loop.call_soon_threadsafe(self._finish, pending, exc)  # type: ignore[union-attr]
            self.metrics.group_steps.labels("failed").inc()
            raise
        self.metrics.group_steps.labels("committed").inc()
        if pending is not None:
            self._loop.call_soon_threadsafe(self._finish, pending, answers)  # type: ignore[union-attr]
        self._attempts.pop((sid, step), None)
        if self.rank == 0:  # every replica has applied it (the vote): its agreement keys can go
            size = session.spec.group_size
            keys = [self._key("step", sid, step, a, name) for a in range(int(record["attempt"]) + 1)
                    for name in ("decide", "count", *(f"rank/{r}" for r in range(size)))]
            self._call(lambda s: [s.delete_key(k) for k in keys])

    def _commit(self, session: Session, local: list[Slice]) -> dict[int, bytes]:
        """On the replicas' compute thread, under the session's order: the step on every replica's slices."""
        blobs = self._gather_bytes(_encode_slices(local))
        slices: dict[int, Slice] = {}
        for blob in blobs:
            for s in _decode_slices(blob):
                slices.setdefault(s.rank, s)
        step = next(iter(slices.values())).step
        voted = False

        def vote(ok: bool = True) -> None:
            nonlocal voted
            voted = True
            refused = self._flags(ok)
            if ok and refused:
                raise Unavailable(f"replica(s) {', '.join(map(str, refused))} could not compute step {step} (their "
                                  "logs say why); nothing was applied on any replica; resend the step")
        shard = None
        if session.spec.shard:
            from . import sharding
            shard = sharding.from_process_group()
        try:
            answers = self.batches.commit_step(session, sorted(slices.values(), key=lambda s: s.rank), vote=vote,
                                               shard=shard)
        except ServiceError:
            if not voted:
                vote(False)
            raise
        self._compare_digests(session)
        mine = {}
        for s in local:
            used = slices[s.rank]
            mine[s.rank] = (answers[s.rank] if used.request_id == s.request_id
                            else session.last.parts[s.rank].response(s.request_id, step))  # type: ignore[union-attr]
        return mine

    def _compare_digests(self, session: Session) -> None:
        every = self.config.digest_every_steps
        if not every or session.step % every:
            return
        digests = self._gather_bytes(state_digest(session))
        if len(set(digests)) > 1:
            odd = [k for k, d in enumerate(digests) if d != digests[0]]
            self.metrics.replica_divergence.inc()
            log.error("replicated session %s: the state at step %d differs between replicas (replica(s) %s differ "
                      "from replica 0)", session.id, session.step, ", ".join(map(str, odd)))


def state_digest(session: Session) -> bytes:
    """A fingerprint of everything a checkpoint of the session holds except the times it was created and saved:
    replicas that applied the same steps have the same one."""
    record, tensors = checkpoint.session_to_checkpoint(session)
    for volatile in ("saved_time", "created_time"):
        record.pop(volatile, None)
    h = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + repr(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def _encode_slices(slices: list[Slice]) -> bytes:
    record = {"slices": [{"rank": s.rank, "step": s.step, "request_id": s.request_id,
                          "digest": s.digest.hex() if s.digest else None, "options": asdict(s.options),
                          "inputs": sorted(s.inputs)} for s in slices]}
    tensors = {f"{i}.{name}": t for i, s in enumerate(slices) for name, t in s.inputs.items()}
    return checkpoint.encode(record, tensors)


def _decode_slices(data: bytes) -> list[Slice]:
    if not data:
        return []
    record, tensors = checkpoint.decode(data)
    return [Slice(rank=int(r["rank"]), step=int(r["step"]), request_id=r["request_id"],
                  inputs={name: tensors[f"{i}.{name}"] for name in r["inputs"]},
                  digest=bytes.fromhex(r["digest"]) if r["digest"] else None, options=ComputeOptions(**r["options"]))
            for i, r in enumerate(record["slices"])]


__all__ = ["Replicas", "state_digest"]
