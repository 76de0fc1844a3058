"""The DDP example in a bounded form: two gloo processes train an encoder with ``RemoteLoss`` on a group session;
their loss, encoder gradients and parameters after every step equal one process training on the concatenated
batches (float64: within 1e-12 relative; float32: within float32 round-off, the all-reduce sums in another
order). The example's own comparison decides; this test runs it, bounded, and reads its verdict."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from tests.conftest import ServerHandle

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ddp" / "train.py"


@pytest.fixture(scope="module")
def server(module_server: ServerHandle) -> ServerHandle:
    """This module's own server (its tests create many sessions)."""
    return module_server


@pytest.mark.timeout(400)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_ranks_train_like_one_process(server: ServerHandle, dtype: str) -> None:
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--target", server.target, "--steps", "4",
                             "--dtype", dtype], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()  # its rank processes are daemons of it and die with it
            proc.wait(30)
    assert proc.returncode == 0, out[-4000:]
    assert out.strip().splitlines()[-1].startswith("OK: largest relative difference"), out[-2000:]
    assert out.count("step ") == 4
