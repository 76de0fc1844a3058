"""The base install is the client with numpy only: the SDK imports, encodes, calls and decodes without torch
(checked in a subprocess where importing torch fails), and ``embtrain.torch`` names the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ServerHandle

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_numpy_client_works_without_torch(server: ServerHandle) -> None:
    proc = _run(f"""
        import numpy as np
        import embtrain
        assert "torch" not in sys.modules
        x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
        y = np.repeat(np.arange(4), 4)
        with embtrain.Client({server.target!r}) as c:
            assert c.health() == "SERVING"
            r = c.compute(x, y, loss="batch_hard_triplet")
            assert isinstance(r.gradient, np.ndarray) and r.gradient.shape == x.shape
            assert r.triplets.dtype == np.int64
            try:
                c.compute(x, y[:3], loss="batch_hard_triplet")
            except embtrain.InvalidArgument as err:
                assert err.fields == ["inputs.labels"]
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_torch_integration_names_the_extra() -> None:
    proc = _run("""
        try:
            import embtrain.torch
        except ImportError as exc:
            print(exc)
    """)
    assert "pip install 'embtrain[torch]'" in proc.stdout, proc.stderr[-2000:]
