"""Code rules as tests (torchrec style): the import boundaries of docs/architecture.md.

Every package is imported as ``fedrec.<folder>``; a bare ``import server`` (the old layout) is
refused everywhere, and each package may import only the packages its row allows.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "server", "client", "serving", "deploy", "audit", "simulations", "cli")
# What each package must never import (docs/architecture.md, "Import rules").
FORBIDDEN = {
    "shared": {"server", "client", "serving", "deploy", "audit", "simulations", "cli"},
    "server": {"client", "serving", "deploy", "audit", "simulations", "cli"},
    "client": {"server", "serving", "deploy", "audit", "simulations", "cli"},
    "serving": {"client", "deploy", "audit", "simulations", "cli"},
    "deploy": {"client", "server", "serving", "audit", "cli"},
    "audit": {"serving", "deploy", "cli"},
    "simulations": {"cli"},
    "cli": set(),
}
# The one exception: the empirical audit trains canaried runs in the Simulation Engine.
ALLOWED = {("audit/empirical.py", "simulations")}


def _imports(path: Path) -> set[str]:
    """Top-level names imported: ``fedrec.X`` gives ``X``; anything else its first part."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            found.add(parts[1] if parts[0] == "fedrec" and len(parts) > 1 else f"bare:{parts[0]}")
    return found


def test_every_package_has_a_row_and_is_installed() -> None:
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    folders = {p.parent.relative_to(ROOT).as_posix() for p in ROOT.glob("*/**/__init__.py")}
    folders -= {f for f in folders if f.startswith(("tests", ".venv", "build"))}

    # Execute
    missing = sorted(f for f in folders if f"fedrec.{f.replace('/', '.')}" not in mapping)

    # Assert
    assert set(FORBIDDEN) == set(PACKAGES)
    assert not missing, f"packages not installed under fedrec (pyproject package-dir): {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_its_row_allows(package: str) -> None:
    # Prepare
    files = sorted((ROOT / package).rglob("*.py"))
    assert files

    # Execute
    bad = set()
    for f in files:
        rel = f.relative_to(ROOT).as_posix()
        for m in _imports(f):
            if m.startswith("bare:") and m[5:] in PACKAGES:
                bad.add(f"{rel} imports {m[5:]} outside the fedrec root")
            elif m in FORBIDDEN[package] and (rel, m) not in ALLOWED:
                bad.add(f"{rel} imports fedrec.{m}")

    # Assert
    assert not bad, sorted(bad)


def test_tests_import_fedrec_not_bare_folders() -> None:
    bad = {
        f"{f.name} imports {m[5:]}"
        for f in sorted((ROOT / "tests").glob("*.py"))
        for m in _imports(f)
        if m.startswith("bare:") and m[5:] in PACKAGES
    }
    assert not bad, sorted(bad)
