"""The README's loss catalog is generated from the registry and must be current; its configuration table names
every setting. The pytorch-metric-learning part of the catalog can only be generated with the pml extra; the rest
is checked without it."""

from __future__ import annotations

import pathlib

import pytest

from embtrain_server import catalog
from embtrain_server.config import ServerConfig, fields

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PML_HEADING = "#### pytorch-metric-learning losses"
STALE = "README loss catalog is stale: run `python -m embtrain_server.catalog --write`"


def _without_pml(catalog_text: str) -> str:
    """The catalog up to its pytorch-metric-learning table (all of it when there is none)."""
    cut = catalog_text.find(PML_HEADING)
    return (catalog_text if cut < 0 else catalog_text[:cut]).rstrip() + "\n"


def test_native_and_torch_catalog_in_readme_is_current() -> None:
    """The native and torch.* tables in the README equal what the registry generates (no extra needed)."""
    assert _without_pml(catalog.section(README.read_text())) == _without_pml(catalog.markdown()), STALE


def test_loss_catalog_in_readme_is_current() -> None:
    """The whole catalog, the pml.* table included, equals what the registry generates."""
    pytest.importorskip("pytorch_metric_learning", reason="needs the pml extra: pip install 'embtrain[pml]'")
    assert catalog.section(README.read_text()) == catalog.markdown(), STALE


def test_every_registered_loss_is_listed() -> None:
    from embtrain_server import losses
    losses.load_all()
    text = catalog.section(README.read_text())
    missing = [n for n in losses.names() if f"| `{n}` |" not in text]
    assert not missing


def test_configuration_reference_names_every_setting() -> None:
    text = README.read_text()
    missing = [f.name for f in fields(ServerConfig) if f"`{f.name}`" not in text]
    assert not missing, missing
