"""``embtrain`` writing into a pipe whose reader stops early (``embtrain losses | head``) exits quietly, with the
status of a process killed by SIGPIPE, instead of printing a ``BrokenPipeError`` traceback. Real subprocesses and
real pipes against the in-process server."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from tests.conftest import ServerHandle

CLI = [sys.executable, "-m", "embtrain.cli"]
SIGPIPE_STATUS = 141  # 128 + SIGPIPE, what the shell reports for a tool killed by SIGPIPE


def _assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr and "Exception ignored" not in stderr, stderr


def test_losses_into_a_pipe_nobody_reads(server: ServerHandle) -> None:
    # The read end is closed before the command starts: its first write meets a broken pipe, deterministically
    # (with a reader that lags, output smaller than the pipe's buffer might all be written before it goes away).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*CLI, "losses", "--target", server.target], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    _assert_quiet(proc.stderr)
    assert proc.returncode == SIGPIPE_STATUS


def test_reader_that_stops_after_the_first_line(server: ServerHandle) -> None:
    # --json output is larger than a pipe's buffer, so the command is still writing when the reader closes its end.
    proc = subprocess.Popen([*CLI, "losses", "--json", "--target", server.target], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert first == "[\n"
    _assert_quiet(stderr)
    assert proc.returncode == SIGPIPE_STATUS


def test_piped_into_head(server: ServerHandle) -> None:
    cmd = shlex.join([*CLI, "losses", "--target", server.target])
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} | head -n 1"], capture_output=True, text=True,
                          timeout=120)
    _assert_quiet(proc.stderr)
    assert proc.returncode in (0, SIGPIPE_STATUS)  # 0 when all output fitted in the pipe before head exited
    assert proc.stdout.count("\n") == 1 and "[" in proc.stdout  # `name  [family, ...]`


def test_full_output_still_exits_zero(server: ServerHandle) -> None:
    proc = subprocess.run([*CLI, "losses", "--target", server.target], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "batch_hard_triplet" in proc.stdout
    _assert_quiet(proc.stderr)
