"""Type-check every fedrec package with mypy, under the names they are imported by.

The folders install as ``fedrec.<folder>`` (pyproject ``[tool.setuptools.package-dir]``), a
mapping mypy cannot read: run on the folders themselves it would call them ``server``,
``client``, … and find no ``fedrec.*`` module to follow. So this script lays out a temporary
``fedrec/`` of symbolic links to the folders, exactly as the mapping says, and runs
``mypy -p fedrec`` there with the project's ``[tool.mypy]`` settings.

Usage: ``.venv/bin/python scripts/typecheck.py [extra mypy arguments]``; exits with mypy's code.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    pyproject = ROOT / "pyproject.toml"
    mapping = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-dir"
    ]
    with tempfile.TemporaryDirectory(prefix="fedrec-typecheck-") as tmp:
        for name, folder in sorted(mapping.items()):
            link = Path(tmp, *name.split("."))
            if link.parent.exists() and link.parent.is_symlink():
                continue  # a subpackage already reached through its parent's link
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ROOT / folder, target_is_directory=True)
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(pyproject), "-p", "fedrec"]
        return subprocess.run([*cmd, *argv], cwd=tmp, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
