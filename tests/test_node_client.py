"""examples/node/client.js, a Node.js client written from proto/ and docs/protocol.md, against an in-process server:
it lists the losses, computes one batch (float32 embeddings, int64 labels) and gets the loss and the gradient bit for
bit as the Python SDK does, and decodes the BadRequest of a bad request as the SDK does.

Its dependencies (@grpc/grpc-js, @grpc/proto-loader, protobufjs, pinned by package-lock.json) are installed with
`npm ci` into the git-ignored examples/node/node_modules/. Skipped only where node or npm is missing."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import embtrain
from tests.conftest import ServerHandle

NODE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(NODE is None or NPM is None,
                                reason="the Node.js example needs node and npm (Node 18 or later), which are not "
                                       "installed here")


@pytest.fixture(scope="module")
def node_example() -> pathlib.Path:
    """examples/node with its dependencies installed (once; again when package-lock.json changes)."""
    lock = NODE_DIR / "package-lock.json"
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        r = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"npm ci in {NODE_DIR} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    return NODE_DIR / "client.js"


def _batch() -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(11)
    y = np.repeat(np.arange(6), 4)
    x = g.standard_normal((24, 16)) + 0.5 * y[:, None]
    return x.astype(np.float32), y.astype(np.int64)


def _run_node(script: pathlib.Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODE, str(script), target, *args], capture_output=True, text=True, timeout=120)


def test_node_client_matches_the_python_sdk_bit_for_bit(node_example: pathlib.Path, server: ServerHandle,
                                                        client: embtrain.Client, tmp_path: pathlib.Path) -> None:
    x, y = _batch()
    loss, params = "batch_hard_triplet", {"margin": 0.2}
    batch = tmp_path / "batch.json"
    # float32 values are exact as JSON doubles, and Node's writeFloatLE stores them exactly.
    batch.write_text(json.dumps({"embeddings": x.tolist(), "labels": y.tolist(), "loss": loss, "params": params}))
    r = _run_node(node_example, server.target, "--input", str(batch), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)

    # ListLosses: the same catalog the SDK sees, ids listed for the losses that mine triplets.
    sdk_losses = client.losses()
    assert got["losses"] == [li.name for li in sdk_losses]
    assert got["inputs"] == {li.name: [i["name"] for i in li.inputs] for li in sdk_losses}
    assert "ids" in got["inputs"]["batch_hard_triplet"]
    assert got["max_dist_default"] == "Infinity"

    # Compute: loss and gradient bit for bit.
    ref = client.compute(x, labels=y, loss=loss, params=params)
    c = got["compute"]
    assert c["loss_hex"] == np.float64(ref.loss).tobytes().hex() and c["loss"] == ref.loss
    assert ref.gradient.dtype == np.float32 and c["gradient_shape"] == list(ref.gradient.shape)
    assert c["gradient_hex"] == np.ascontiguousarray(ref.gradient).tobytes().hex()
    assert np.array_equal(np.array(c["gradient"], np.float64), ref.gradient.astype(np.float64).ravel())
    assert c["triplets_total"] == ref.triplets_total and c["request_id"] == "node-example"

    # The bad request (one label short): the same status and field violation as the SDK reports.
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(x, labels=y[1:], loss=loss, params=params)
    bad = got["bad_request"]
    assert bad["code"] == "INVALID_ARGUMENT" and bad["message"] == info.value.message
    assert bad["violations"] == [{"field": v.field, "description": v.description} for v in info.value.violations]
    assert bad["violations"] == [{"field": "inputs.labels",
                                  "description": "length 23, expected 24 (one per embedding row)"}]


def test_node_client_runs_with_its_built_in_batch(node_example: pathlib.Path, server: ServerHandle) -> None:
    r = _run_node(node_example, server.target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "batch_hard_triplet: loss" in r.stdout
    assert "inputs.labels: length 7, expected 8 (one per embedding row)" in r.stdout
