"""Run ``embtrain-server`` as a child process, for the benchmarks, the digits demo and the tests that need a real
process (signals, restarts): a free loopback port, a wait until the health service says SERVING, and a graceful
stop (SIGTERM, then SIGKILL after a grace period); ``ReplicaGroup``, R replicas of one group."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import embtrain


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, alive: Callable[[], bool], seconds: float = 120.0,
                 client_options: Sequence[tuple[str, Any]] = (), poll: float = 0.05,
                 describe: Callable[[], str] = lambda: "") -> None:
    """Return once the server at ``target`` answers SERVING; raise ``RuntimeError`` if ``alive()`` turns false
    (the process exited) or ``seconds`` pass. ``describe()`` adds context (e.g. the log's tail) to the error."""
    deadline = time.monotonic() + seconds
    with embtrain.Client(target, timeout=2.0, options=client_options) as client:
        while True:
            if not alive():
                raise RuntimeError(f"embtrain-server at {target} exited while starting. {describe()}")
            with contextlib.suppress(embtrain.EmbtrainError):
                if client.health(timeout=1.0) == "SERVING":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"embtrain-server at {target} did not report SERVING in {seconds:.0f} s. "
                                   f"{describe()}")
            time.sleep(poll)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """SIGTERM (the server drains and checkpoints), then SIGKILL if it has not exited after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def running(args: Sequence[str] = (), *, log_path: pathlib.Path | None = None,
            env: Mapping[str, str | None] | None = None,
            startup_seconds: float = 120.0, grace: float = 30.0,
            cwd: str | os.PathLike[str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """An ``embtrain-server`` child on a free loopback port with extra flags ``args``; yields (target, process)
    once it is SERVING and stops it on exit. Its output goes to ``log_path`` (default: discarded). ``env`` changes
    this process's environment for the child (a value of None removes the variable)."""
    port = free_port()
    cmd = [sys.executable, "-m", "embtrain_server.main", "--host", "127.0.0.1", "--port", str(port), *args]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path if log_path is not None else os.devnull, "wb") as log:
        child_env = None
        if env is not None:
            child_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
            for k in (k for k, v in env.items() if v is None):
                child_env.pop(k, None)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=child_env)
        target = f"127.0.0.1:{port}"

        def tail() -> str:
            if log_path is None or not log_path.exists():
                return ""
            return f"Log {log_path}:\n" + log_path.read_text(errors="replace")[-2000:]

        try:
            wait_serving(target, lambda: proc.poll() is None, startup_seconds, describe=tail)
            yield target, proc
        finally:
            stop(proc, grace)


class ReplicaGroup:
    """R ``embtrain-server`` replicas of one group on loopback, each with its own state_dir and log under
    ``root`` (``replica<k>.log``); ``extra`` flags go to every replica. For the tests and benchmarks of replicas:
    ``kill(k)`` (SIGKILL) and ``spawn(k)`` + ``wait(k)`` restart one; ``close()`` stops them all."""

    def __init__(self, root: pathlib.Path, replicas: int, *extra: str, startup_seconds: float = 120.0) -> None:
        self.root, self.size, self.extra = root, replicas, extra
        self.master_port = free_port()
        self.ports = [free_port() for _ in range(replicas)]
        self.procs: list[subprocess.Popen | None] = [None] * replicas
        try:
            for k in range(replicas):
                self.spawn(k)
            for k in range(replicas):
                self.wait(k, startup_seconds)
        except BaseException:
            self.close(grace=0)
            raise

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def spawn(self, k: int) -> None:
        argv = [sys.executable, "-m", "embtrain_server.main", "--host", "127.0.0.1", "--port", str(self.ports[k]),
                "--state-dir", str(self.root / f"state{k}"), "--world-size", str(self.size), "--rank", str(k),
                "--master-addr", "127.0.0.1", "--master-port", str(self.master_port), *self.extra]
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"replica{k}.log", "ab") as log:
            self.procs[k] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, k: int, seconds: float = 120.0) -> None:
        proc = self.procs[k]
        assert proc is not None
        wait_serving(self.addresses[k], lambda: proc.poll() is None, seconds, describe=lambda: self.log(k)[-3000:])

    def log(self, k: int) -> str:
        path = self.root / f"replica{k}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, k: int) -> None:
        proc = self.procs[k]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def close(self, grace: float = 15.0) -> None:
        """SIGTERM to every replica (they drain together), SIGKILL to those still running after ``grace``."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM if grace else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def client(self, **kwargs: Any) -> embtrain.Client:
        """A client that knows every replica (member r goes to replica r mod R)."""
        return embtrain.Client(self.addresses, **kwargs)


@contextlib.contextmanager
def replica_group(root: pathlib.Path, replicas: int, *extra: str) -> Iterator[ReplicaGroup]:
    group = ReplicaGroup(root, replicas, *extra)
    try:
        yield group
    finally:
        group.close()
