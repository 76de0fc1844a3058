"""examples/node/client.js, a Node.js client written from proto/ and docs/protocol.md, against an in-process server,
compared with the Python SDK bit for bit: the health service, ListLosses, one Compute in float32 and one in bfloat16
(rounded to nearest even in JS, compared with torch's rounding of the same float32 values; the bfloat16 gradient
decoded in JS), a ComputeStream whose middle batch is bad (answered in-band with a google.rpc.Status and its
BadRequest while the others are answered normally), and the BadRequest of a bad unary request.

Its dependencies (@grpc/grpc-js, @grpc/proto-loader, protobufjs, pinned by package-lock.json) are installed with
`npm ci` into the git-ignored examples/node/node_modules/. Skipped only where node or npm is missing."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from typing import Any

import numpy as np
import pytest
import torch  # the in-process server needs it anyway; here it is the bfloat16 reference

import embtrain
from tests.conftest import ServerHandle

NODE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
LOSS, PARAMS = "batch_hard_triplet", {"margin": 0.2}

pytestmark = pytest.mark.skipif(NODE is None or NPM is None,
                                reason="the Node.js example needs node and npm (Node 18 or later), which are not "
                                       "installed here")

# float32 bit patterns for the first row, where bfloat16 rounding is easy to get wrong: ties go to the even
# neighbour (down for 0x3F80_8000, up for 0x3F81_8000 and its negative), and a carry runs into the exponent.
TIES = np.array([0x3F808000, 0x3F818000, 0xBF818000, 0x3FFFFFFF], np.uint32)
TIES_BF16 = np.array([0x3F80, 0x3F82, 0xBF82, 0x4000], np.uint16)


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
    x = (g.standard_normal((24, 16)) + 0.5 * y[:, None]).astype(np.float32)
    x[0, :len(TIES)] = TIES.view(np.float32)
    return x, y.astype(np.int64)


def _run_node(script: pathlib.Path, target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NODE, str(script), target, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def node_report(node_example: pathlib.Path, server: ServerHandle,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What client.js --json reports for _batch()."""
    x, y = _batch()
    batch = tmp_path_factory.mktemp("node") / "batch.json"
    # float32 values are exact as JSON doubles, and Node's writeFloatLE stores them exactly.
    batch.write_text(json.dumps({"embeddings": x.tolist(), "labels": y.tolist(), "loss": LOSS, "params": PARAMS}))
    r = _run_node(node_example, server.target, "--input", str(batch), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def _bf16_bytes(t: Any) -> bytes:
    assert t.dtype == torch.bfloat16
    return t.contiguous().view(torch.int16).numpy().tobytes()


def _same_f32(got: dict[str, Any], ref: embtrain.ComputeResult) -> None:
    """A float32 answer from Node equals the SDK's, bit for bit."""
    assert got["loss_hex"] == np.float64(ref.loss).tobytes().hex() and got["loss"] == ref.loss
    assert ref.gradient.dtype == np.float32 and got["gradient_dtype"] == "DTYPE_FLOAT32"
    assert got["gradient_shape"] == list(ref.gradient.shape)
    assert got["gradient_hex"] == np.ascontiguousarray(ref.gradient).tobytes().hex()
    assert np.array_equal(np.array(got["gradient"], np.float64), ref.gradient.astype(np.float64).ravel())
    assert got["triplets_total"] == ref.triplets_total


def test_health(node_report: dict[str, Any], client: embtrain.Client) -> None:
    assert node_report["health"] == client.health() == "SERVING"
    assert node_report["health_service"] == client.health("embtrain.v1.EmbeddingTrainer") == "SERVING"


def test_list_losses(node_report: dict[str, Any], client: embtrain.Client) -> None:
    sdk_losses = client.losses()
    assert node_report["losses"] == [li.name for li in sdk_losses]
    assert node_report["inputs"] == {li.name: [i["name"] for i in li.inputs] for li in sdk_losses}
    assert "ids" in node_report["inputs"]["batch_hard_triplet"]
    assert node_report["max_dist_default"] == "Infinity"


def test_compute_float32(node_report: dict[str, Any], client: embtrain.Client) -> None:
    x, y = _batch()
    c = node_report["compute"]
    _same_f32(c, client.compute(x, labels=y, loss=LOSS, params=PARAMS))
    assert c["request_id"] == "node-example"


def test_compute_bfloat16(node_report: dict[str, Any], client: embtrain.Client) -> None:
    x, y = _batch()
    c = node_report["compute_bf16"]
    xb = torch.from_numpy(x).to(torch.bfloat16)  # round to nearest even, as docs/protocol.md says producers do
    # JS rounded the same float32 values to the same bfloat16 bits as torch, ties and the carry included, and not
    # as a truncating encoder would.
    sent = bytes.fromhex(c["embeddings_hex"])
    assert sent == _bf16_bytes(xb)
    assert np.array_equal(np.frombuffer(sent, "<u2")[:len(TIES)], TIES_BF16)
    assert sent != (x.view(np.uint32) >> 16).astype("<u2").tobytes()

    ref = client.compute(xb, labels=torch.from_numpy(y), loss=LOSS, params=PARAMS)
    assert c["loss_hex"] == np.float64(ref.loss).tobytes().hex() and c["loss"] == ref.loss
    assert ref.gradient.dtype == torch.bfloat16 and c["gradient_dtype"] == "DTYPE_BFLOAT16"
    assert c["gradient_shape"] == list(ref.gradient.shape)
    assert c["gradient_hex"] == _bf16_bytes(ref.gradient).hex()
    # JS decoded the bfloat16 gradient to the same values (bfloat16 -> float32 is exact).
    assert np.array_equal(np.array(c["gradient"], np.float64), ref.gradient.double().numpy().ravel())
    assert c["triplets_total"] == ref.triplets_total and c["request_id"] == "node-bfloat16"
    # and bfloat16 is not float32 here: the answers differ.
    assert c["loss_hex"] != node_report["compute"]["loss_hex"]


def test_compute_stream_with_a_bad_batch_in_the_middle(node_report: dict[str, Any], client: embtrain.Client) -> None:
    x, y = _batch()
    bad = x.copy()
    bad[1, 2] = np.nan
    half = (len(x) + 1) // 2  # client.js: Math.ceil(n / 2)
    ref = list(client.compute_stream([(x, y), (bad, y), (x[:half], y[:half])], loss=LOSS, params=PARAMS))
    got = node_report["stream"]
    assert [r["request_id"] for r in got] == ["node-stream-0", "node-stream-1", "node-stream-2"]
    assert [r.ok for r in ref] == [True, False, True]

    # the good batches: answered normally, bit for bit the SDK's (and the first one the unary call's)
    _same_f32(got[0], ref[0])
    _same_f32(got[2], ref[2])
    assert got[0]["loss_hex"] == node_report["compute"]["loss_hex"] != got[2]["loss_hex"]
    assert "error" not in got[0] and "error" not in got[2]

    # the bad one: in-band, a google.rpc.Status with the SDK's code, message and BadRequest field violations
    err, sdk = got[1]["error"], ref[1].error
    assert err["code"] == sdk.code.name == "INVALID_ARGUMENT" and err["message"] == sdk.message
    assert err["violations"] == [{"field": v.field, "description": v.description} for v in sdk.violations]
    assert [v["field"] for v in err["violations"]] == ["inputs.embeddings"]
    assert err["message"] == f"inputs.embeddings: {err['violations'][0]['description']}"
    assert "non-finite" in err["message"] and err["info"] == []


def test_unary_bad_request(node_report: dict[str, Any], client: embtrain.Client) -> None:
    """One label short: the same status and BadRequest field violation as the SDK reports."""
    x, y = _batch()
    with pytest.raises(embtrain.InvalidArgument) as info:
        client.compute(x, labels=y[1:], loss=LOSS, params=PARAMS)
    bad = node_report["bad_request"]
    assert bad["code"] == "INVALID_ARGUMENT" and bad["message"] == info.value.message
    assert bad["violations"] == [{"field": v.field, "description": v.description} for v in info.value.violations]
    assert bad["violations"] == [{"field": "inputs.labels",
                                  "description": "length 23, expected 24 (one per embedding row)"}]


def test_node_client_runs_with_its_built_in_batch(node_example: pathlib.Path, server: ServerHandle) -> None:
    r = _run_node(node_example, server.target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "health: SERVING" in r.stdout
    assert "batch_hard_triplet (DTYPE_FLOAT32): loss" in r.stdout
    assert "batch_hard_triplet (DTYPE_BFLOAT16): loss" in r.stdout
    assert "stream node-stream-1: INVALID_ARGUMENT: inputs.embeddings:" in r.stdout
    assert "stream node-stream-2: loss" in r.stdout
    assert "inputs.labels: length 7, expected 8 (one per embedding row)" in r.stdout
