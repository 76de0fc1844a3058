"""Checkpoint files: one safetensors file per session (tensors + a JSON record in the header metadata), never
pickle. A SHA-256 over the record and every tensor's bytes detects corruption and truncation. Writes are atomic:
temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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


def peek_owner(data: bytes) -> str | None:
    """Best-effort owner of a (possibly damaged) checkpoint, for reporting it to the right principal."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(json.loads(data[8:8 + n])["__metadata__"]["record"])["owner"]
    except Exception:  # noqa: BLE001
        return None


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
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
        tmp.unlink(missing_ok=True)
        removed += 1
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
