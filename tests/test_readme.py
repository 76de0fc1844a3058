"""The README's loss catalog is generated from the registry and must be current; its configuration table names
every setting."""

from __future__ import annotations

import pathlib

from embtrain_server import catalog
from embtrain_server.config import ServerConfig, fields

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_loss_catalog_in_readme_is_current() -> None:
    assert catalog.section(README.read_text()) == catalog.markdown(), \
        "README loss catalog is stale: run `python -m embtrain_server.catalog --write`"


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
