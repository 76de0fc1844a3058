"""When and where sessions are checkpointed: ``Checkpointer`` owns the policy (every N steps, every T seconds,
on close, on shutdown, on request) and the saving, next to the session store. The step path, the periodic task,
``SaveCheckpoint``, ``CloseSession`` and shutdown all call it. Encoding is in ``checkpoint``.

A failed write never fails the batch whose step was applied: it is logged, counted
(``embtrain_checkpoints_total{result="error"}``) and retried at the next due point, and the previous checkpoint
stays as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time

import torch

from . import checkpoint, losses
from .config import ServerConfig
from .errors import FailedPrecondition
from .metrics import Metrics
from .scheduler import Scheduler
from .sessions import CorruptEntry, Session, SessionStore

log = logging.getLogger("embtrain.persistence")


class Checkpointer:
    def __init__(self, config: ServerConfig, store: SessionStore, metrics: Metrics) -> None:
        self.state_dir = pathlib.Path(config.state_dir) if config.persist else None
        self.every_steps = config.checkpoint_every_steps
        self.every_seconds = config.checkpoint_every_seconds
        self.store = store
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return self.state_dir is not None

    def path(self, session_id: str) -> pathlib.Path:
        assert self.state_dir is not None
        return self.state_dir / f"{session_id}{checkpoint.SUFFIX}"

    # ---- saving (the caller holds the session's order) -----------------------------------------------------
    def save(self, sess: Session) -> int:
        """Write the session's checkpoint now; returns its step. Raises ``OSError`` (logged and counted)."""
        if self.state_dir is None or sess.closed:
            return sess.step
        try:
            record, tensors = checkpoint.session_to_checkpoint(sess)
            checkpoint.write_atomic(self.path(sess.id), checkpoint.encode(record, tensors))
        except OSError:
            self.metrics.checkpoints.labels("error").inc()
            log.exception("writing the checkpoint of session %s failed", sess.id)
            raise
        self.metrics.checkpoints.labels("ok").inc()
        sess.last_checkpoint_step = sess.step
        sess.last_checkpoint_time = float(record["saved_time"])
        sess.steps_since_checkpoint = 0
        return sess.step

    def try_save(self, sess: Session) -> bool:
        """``save`` for the paths that must not fail because of it (a step already applied, shutdown)."""
        try:
            self.save(sess)
            return True
        except OSError:
            return False

    def due(self, sess: Session, now: float | None = None) -> bool:
        if self.state_dir is None or not sess.steps_since_checkpoint:
            return False
        if self.every_steps and sess.steps_since_checkpoint >= self.every_steps:
            return True
        now = time.time() if now is None else now
        return bool(self.every_seconds) and now - max(sess.last_checkpoint_time, sess.created_time) >= \
            self.every_seconds

    def after_step(self, sess: Session) -> None:
        if self.due(sess):
            self.try_save(sess)

    def on_request(self, sess: Session) -> int:
        """SaveCheckpoint: write now, or say why nothing can be written."""
        if self.state_dir is None:
            raise FailedPrecondition("session_id: the server runs without a state_dir (persist: false), so there "
                                     "is nowhere to write a checkpoint", field="session_id")
        return self.save(sess)

    def on_close(self, sess: Session, keep: bool) -> None:
        """CloseSession: keep the checkpoint up to date (the next start restores it), or delete it."""
        if keep:
            if self.state_dir is None:
                raise FailedPrecondition("keep_checkpoint: the server runs without a state_dir (persist: false); "
                                         "nothing can be kept", field="keep_checkpoint")
            self.save(sess)
        elif self.state_dir is not None:
            self.path(sess.id).unlink(missing_ok=True)

    # ---- on the event loop: each save runs on a worker under the session's order ------------------------------
    async def save_due(self, scheduler: Scheduler) -> int:
        now = time.time()
        return await self._save_each(scheduler, [s for s in self.store.all() if self.due(s, now)])

    async def save_all(self, scheduler: Scheduler) -> tuple[int, int]:
        """Shutdown: every session with unsaved steps (or never saved). Returns (saved, failed)."""
        todo = [s for s in self.store.all() if s.steps_since_checkpoint or s.last_checkpoint_step < 0]
        saved = await self._save_each(scheduler, todo)
        return saved, len(todo) - saved

    async def _save_each(self, scheduler: Scheduler, sessions: list[Session]) -> int:
        saved = 0
        for sess in sessions:
            saved += bool(await scheduler.run(self.try_save, sess, session_id=sess.id))
        return saved

    async def run_periodic(self, scheduler: Scheduler) -> None:
        """The timer behind ``checkpoint_every_seconds`` (checks at least every 5 s)."""
        while True:
            await asyncio.sleep(min(self.every_seconds, 5.0))
            with contextlib.suppress(Exception):
                await self.save_due(scheduler)

    # ---- start --------------------------------------------------------------------------------------------
    def check_state_dir(self) -> None:
        """Refuse to start with a state_dir that cannot hold checkpoints (``ValueError`` with the reason)."""
        if self.state_dir is None:
            return
        try:
            checkpoint.ensure_dir(self.state_dir)
        except OSError as exc:
            raise ValueError(f"state_dir: {self.state_dir} cannot hold checkpoints ({exc}); give a writable "
                             "directory (--state-dir) or run without persistence (--no-persist)") from None

    def restore_all(self, device: torch.device) -> tuple[int, int]:
        """Load every checkpoint in ``state_dir`` into the store; damaged ones are reported and moved aside.
        Returns (loaded, not loaded)."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return 0, 0
        losses.load_all()  # a checkpoint names its loss: the whole catalog must be registered first
        checkpoint.remove_stale_temporaries(self.state_dir)
        loaded = bad = 0
        for path in sorted(self.state_dir.glob(f"*{checkpoint.SUFFIX}")):
            sid = path.name[: -len(checkpoint.SUFFIX)]
            if path.is_symlink() or not path.is_file():
                log.warning("skipping %s: not a regular checkpoint file", path)
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.error("skipping %s: %s", path, exc)
                bad += 1
                continue
            try:
                record, tensors = checkpoint.decode(data)
                if record.get("id") != sid:
                    raise checkpoint.CorruptCheckpoint(f"the record names session {record.get('id')!r}, the file "
                                                       f"{sid!r}")
                sess = checkpoint.session_from_checkpoint(record, tensors, device)
            except FailedPrecondition as exc:
                # Intact, but its loss needs an extra this server lacks: keep the file so that it loads once the
                # extra is installed, and report it.
                log.error("checkpoint %s not loaded: %s", path, exc.message)
                self.store.add_unavailable(CorruptEntry(sid, checkpoint.peek_owner(data, sid), str(path),
                                                        exc.message, status="unavailable"))
                bad += 1
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                reason = str(exc) if isinstance(exc, checkpoint.CorruptCheckpoint) else f"{type(exc).__name__}: {exc}"
                try:
                    moved = str(checkpoint.move_aside(path))
                except OSError as move_exc:
                    moved = f"nowhere ({move_exc}); it stays at {path}"
                log.error("checkpoint %s is corrupt (%s); moved to %s", path, reason, moved)
                self.store.add_unavailable(CorruptEntry(sid, checkpoint.peek_owner(data, sid), moved, reason))
                bad += 1
                continue
            self.store.add_restored(sess)
            loaded += 1
        self.metrics.unloaded_checkpoints.set(bad)
        return loaded, bad
