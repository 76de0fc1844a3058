"""Without the pml extra the server still starts its catalog: no ``pml.*`` loss is listed, and asking for one is
FAILED_PRECONDITION naming the extra to install. Runs whether or not the extra is installed here (the import of
pytorch-metric-learning is blocked in a subprocess), so it is kept apart from ``test_pml_losses.py``, which is
skipped without the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "pytorch_metric_learning" or name.startswith("pytorch_metric_learning."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Block())
    from embtrain_server.errors import FailedPrecondition, InvalidArgument
    from embtrain_server.losses import get, load_all, names
    load_all()
    assert not [n for n in names() if n.startswith("pml.")], names()
    assert "torch.MSELoss" in names()
    try:
        get("pml.ArcFaceLoss")
    except FailedPrecondition as exc:
        assert "pml" in exc.message and "embtrain[pml]" in exc.message, exc.message
    else:
        raise AssertionError("no FailedPrecondition for pml.ArcFaceLoss")
    try:
        get("pmlx.Nothing")
    except InvalidArgument:
        pass
    else:
        raise AssertionError("no InvalidArgument for an unknown name that only starts like the extra")
    print("OK")
""")


def test_without_the_extra_pml_names_are_absent_and_failed_precondition() -> None:
    """The catalog loads without pytorch-metric-learning; pml.* names point to the extra, other names don't."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("OK")
