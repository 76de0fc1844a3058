"""The pipeline example in a bounded form: worker processes feed one session's group steps; the dataset-level
triplets they collect by id are exactly those of one Compute on each step's whole batch."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

import embtrain
from tests.conftest import ServerHandle

# The example's workers are spawned processes: its module must be importable by name.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "pipeline"))
import pipeline  # noqa: E402


@pytest.fixture(scope="module")
def server(module_server: ServerHandle) -> ServerHandle:
    """This module's own server (its tests create many sessions)."""
    return module_server


@pytest.mark.timeout(300)
def test_pipeline_workers_collect_the_triplets_of_the_whole_step(server: ServerHandle,
                                                                 client: embtrain.Client) -> None:
    workers, steps, batch = 3, 3, 30
    found = pipeline.run(server.target, workers, steps, batch)
    x, y = load_digits(return_X_y=True)
    ref = client.create_session(pipeline.LOSS, pipeline.PARAMS)
    for step in range(1, steps + 1):
        rows = pipeline.step_rows(step, batch, len(x))
        ids = np.concatenate([pipeline.shard(rows, r, workers) for r in range(workers)])  # rank order
        want = ref.compute(pipeline.embed(x[ids]), y[ids], ids=ids.astype(np.int64))
        assert found[step] == set(map(tuple, want.triplet_ids.tolist()))
        assert len(found[step]) > 0
