"""Imports point down only: core/ < the roles (seeds, generator, filters, outputs, tuner) < engine/.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"seeds", "generator", "filters", "outputs", "tuner"}
ALLOWED = {"core": {"core"}, "engine": {"core", "engine"} | ROLES, **{r: {"core"} | ROLES for r in ROLES}}


def _imported_layers(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for m in mods:
            parts = m.split(".")
            if parts[0] == "synthloop" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer):
    bad = {f"{p.relative_to(ROOT)} imports synthloop.{m}"
           for p in (ROOT / layer).rglob("*.py") for m in _imported_layers(p) - ALLOWED[layer]}
    assert not bad, sorted(bad)


def test_every_folder_is_a_layer():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert {f'"synthloop.{layer}" = "{layer}"' for layer in ALLOWED} <= set(pyproject.splitlines())
