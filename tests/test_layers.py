"""The layer contract (``make check`` runs import-linter on it) covers the whole core."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_core_contract_lists_every_core_module_and_ignores_no_import():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = config["contracts"]
    assert all("ignore_imports" not in c for c in contracts)  # no exceptions anywhere
    (core,) = (
        c
        for c in contracts
        if "heterofl_edge.cli" in c["forbidden_modules"]
        and c["source_modules"][0].startswith("heterofl_edge.")
    )
    package = REPO / "heterofl_edge"
    modules = {
        f"heterofl_edge.{p.stem}"
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
        or (p.is_dir() and (p / "__init__.py").is_file() and p.name != "cli")
    }
    assert set(core["source_modules"]) == modules, "list a new core module in pyproject.toml"
    assert {"exporter", "coordinator", "device_sim"} <= set(core["forbidden_modules"])
