"""Code rules as tests (torchrec style): server/ and client/ never import each other, shared/
imports neither, and nothing under them imports simulations/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "server": {"client", "simulations"},
    "client": {"server", "simulations"},
    "shared": {"server", "client", "simulations"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_packages(package: str) -> None:
    # Prepare
    files = sorted((ROOT / package).rglob("*.py"))
    assert files

    # Execute
    bad = {
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in _imports(f) & FORBIDDEN[package]
    }

    # Assert
    assert not bad, sorted(bad)
