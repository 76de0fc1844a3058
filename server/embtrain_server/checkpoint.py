"""Checkpoints: a session's state encoded as (JSON record, tensors) and back, and the files that hold them.

One safetensors file per session (tensors + the JSON record in the header metadata), never pickle. A SHA-256 over
the record and every tensor's bytes detects corruption and truncation. Writes are atomic: temporary file, fsync,
rename, fsync of the directory. When to write is ``persistence.Checkpointer``'s decision."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import secrets
import struct
import time
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import steps, training
from .sessions import Session, SessionSpec

log = logging.getLogger("embtrain.checkpoint")
SUFFIX = ".safetensors"
FORMAT = "embtrain-checkpoint-1"


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (truncated, damaged, or not one of ours); the message says why."""


def _digest(record: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(record.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    text = json.dumps(record, sort_keys=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "record": text, "sha256": _digest(text, cpu)}
    return st_save(cpu, metadata=meta)


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse and verify a checkpoint. Raises ``CorruptCheckpoint`` with the reason."""
    if len(data) < 8:
        raise CorruptCheckpoint(f"file too short ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CorruptCheckpoint(f"header claims {n} bytes, file has {len(data) - 8} after the length (truncated)")
    try:
        header = json.loads(data[8:8 + n])
        meta = header["__metadata__"]
        if meta.get("format") != FORMAT:
            raise CorruptCheckpoint(f"unknown format {meta.get('format')!r}")
        text = meta["record"]
        tensors = st_load(data)
    except CorruptCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure means the file is damaged
        raise CorruptCheckpoint(f"unreadable ({type(exc).__name__}: {exc})") from None
    if _digest(text, tensors) != meta.get("sha256"):
        raise CorruptCheckpoint("checksum mismatch")
    return json.loads(text), tensors


def peek_owner(data: bytes, session_id: str) -> str | None:
    """The owner of a (possibly damaged) checkpoint, for reporting it to that principal: only when its record is
    readable and names the session the file is named after (a file swapped in under another id has no owner)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        record = json.loads(json.loads(data[8:8 + n])["__metadata__"]["record"])
        return str(record["owner"]) if record.get("id") == session_id else None
    except Exception:  # noqa: BLE001
        return None


def ensure_dir(state_dir: pathlib.Path) -> None:
    """Create ``state_dir`` (0700: checkpoints hold every principal's state) and check that files can be created
    in it. Raises ``OSError`` with the reason."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not state_dir.is_dir():
        raise NotADirectoryError(f"state_dir {state_dir} is not a directory")
    probe = state_dir / f".probe.{secrets.token_hex(8)}.tmp"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    probe.unlink()


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file created exclusively (never through a symlink, mode
    0600, an unpredictable name), fsync, rename, fsync of the directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. disk full: the previous checkpoint stays as it was
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(state_dir: pathlib.Path) -> int:
    """Delete temporary files left by a write that was interrupted (a crash between write and rename); the
    checkpoint they were replacing is still complete. Returns how many were removed."""
    removed = 0
    for tmp in state_dir.glob(f".*{SUFFIX}.*.tmp"):
        try:
            tmp.unlink(missing_ok=True)
            removed += 1
        except OSError as exc:  # e.g. a read-only state_dir: the file is ignored, never loaded
            log.warning("could not remove the stale temporary file %s: %s", tmp, exc)
    return removed


def move_aside(path: pathlib.Path) -> pathlib.Path:
    """Move a damaged checkpoint to ``<state_dir>/corrupt/`` so it is kept for inspection and not loaded again."""
    dest_dir = path.parent / "corrupt"
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / path.name
    i = 1
    while dest.exists():
        dest = dest_dir / f"{path.stem}.{i}{SUFFIX}"
        i += 1
    os.replace(path, dest)
    return dest


# ---- a session's state <-> (JSON record, tensors) -------------------------------------------------------------
VERSION = 1


def session_to_checkpoint(sess: Session) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON record, tensors): configuration, step, head, loss state, optimiser state (its tensors and its
    scalars), dropout generator state and memory bank. The schedule position is the step."""
    tensors: dict[str, torch.Tensor] = {f"initial.{k}": v for k, v in sess.initial_state.items()}
    ts = sess.state
    record: dict[str, Any] = {
        "version": VERSION, "id": sess.id, "owner": sess.owner, "spec": sess.spec.to_dict(), "step": sess.step,
        "created_time": sess.created_time, "in_dim": ts.in_dim if ts is not None else None,
        "dtype": ts.dtype if ts is not None else None, "saved_time": time.time(),
    }
    if sess.last is not None:
        record["answer"] = {"step": sess.last.step, "parts": {
            str(rank): {"digest": part.digest.hex() if part.digest else None, "row_offset": part.row_offset}
            for rank, part in sess.last.parts.items()}}
        for rank, part in sess.last.parts.items():
            tensors[f"answer.{rank}"] = torch.frombuffer(bytearray(part.body(sess.last.step)), dtype=torch.uint8)
    if ts is None:
        return record, tensors
    if ts.head is not None:
        tensors.update({f"head.{k}": v for k, v in ts.head.state_dict().items()})
    tensors.update({f"loss.{k}": v for k, v in ts.loss.state_tensors().items()})
    tensors["rng.generator"] = ts.generator.get_state()
    if ts.optimizer is not None:
        sd = ts.optimizer.state_dict()
        scalars: dict[str, Any] = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"optim.{idx}.{key}"] = val
                else:
                    scalars[f"{idx}.{key}"] = val
        record["optimizer"] = {"param_groups": sd["param_groups"], "scalars": scalars}
    if ts.memory is not None:
        mt, mm = ts.memory.state()
        tensors.update(mt)
        record["memory"] = mm
    return record, tensors


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def session_from_checkpoint(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                            device: torch.device) -> Session:
    """Rebuild a session exactly as it was saved. Raises on any inconsistency (the caller reports it)."""
    if record.get("version", VERSION) != VERSION:
        raise ValueError(f"checkpoint version {record.get('version')!r}, expected {VERSION}")
    spec = SessionSpec.from_dict(record["spec"])
    sess = Session(id=record["id"], owner=record["owner"], spec=spec, device=device,
                   initial_state=_prefixed(tensors, "initial."), step=int(record["step"]),
                   created_time=float(record["created_time"]))
    sess.last_checkpoint_step = sess.step
    sess.last_checkpoint_time = float(record.get("saved_time", 0.0))
    if record.get("answer") is not None:
        kept = record["answer"]
        sess.last = steps.Answer(int(kept["step"]), {
            int(rank): steps.Part(bytes.fromhex(p["digest"]) if p["digest"] else None,
                                  encoded=tensors[f"answer.{rank}"].numpy().tobytes(), row_offset=int(p["row_offset"]))
            for rank, p in kept["parts"].items()})
    if record.get("in_dim") is None:
        return sess
    ts = training.build(spec, sess.initial_state, int(record["in_dim"]), device, optimizer=False)
    ts.dtype = record.get("dtype")
    if ts.head is not None:
        ts.head.load_state_dict(_prefixed(tensors, "head."))
    state = {k: v.to(device) for k, v in _prefixed(tensors, "loss.").items()}
    if state:
        ts.loss.load_state_tensors(state)
    ts.build_optimizer(spec)  # over the parameter objects as loaded (a loss may have replaced its own)
    ts.generator.set_state(tensors["rng.generator"])
    if ts.optimizer is not None:
        saved = record["optimizer"]
        st: dict[int, dict[str, Any]] = {}
        for k, v in _prefixed(tensors, "optim.").items():
            idx, key = k.split(".", 1)
            st.setdefault(int(idx), {})[key] = v
        for k, v in saved["scalars"].items():
            idx, key = k.split(".", 1)
            st.setdefault(int(idx), {})[key] = v
        # load_state_dict moves the state tensors to each parameter's device (``step`` stays on the CPU).
        ts.optimizer.load_state_dict({"state": st, "param_groups": saved["param_groups"]})
    if ts.memory is not None:
        ts.memory.load(tensors, record["memory"])
    sess.state = ts
    return sess
