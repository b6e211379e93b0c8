"""The distribution: one import root (``fedrec``), nothing else at the top of site-packages, and
a wheel that runs without the source checkout.

The wheel is built from this checkout with the project's own build backend, then imported in a
Python started with ``-S`` (no site processing, so the editable install's import finder is off)
whose path holds only the unpacked wheel and the virtualenv's third-party packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedrec.deploy.flower import app_project
from fedrec.shared.config import FedrecConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of the files git would commit: setuptools keeps a build/ folder in the
    # source tree, whose leftovers (a deleted module) would otherwise end up in the wheel.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(source)],
        check=True,
        capture_output=True,
        cwd=out,
    )
    (found,) = out.glob("fedrec-*.whl")
    return found


def test_the_wheel_installs_one_import_root(wheel: Path) -> None:
    # Execute
    names = zipfile.ZipFile(wheel).namelist()

    # Assert: every file is under fedrec/ or the wheel's metadata; every package is there.
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedrec"}
    for package in ("server", "client", "shared", "serving", "deploy", "audit", "cli"):
        assert f"fedrec/{package}/__init__.py" in names
    assert "fedrec/simulations/bench/dp.py" in names
    assert not [n for n in names if n.startswith("fedrec/tests/")]


def test_the_wheel_imports_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    # Prepare: unpack the wheel (what pip does for a pure-Python wheel) beside nothing else.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    third_party = sysconfig.get_paths()["purelib"]
    code = (
        "import importlib.util, fedrec.server.app, fedrec.client.app, fedrec.cli.main\n"
        "print(fedrec.server.app.__file__)\n"
        "print([m for m in ('server', 'client', 'shared', 'simulations') "
        "if importlib.util.find_spec(m)])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), third_party])}

    # Execute: -S skips site-packages' .pth files (the editable install's finder among them).
    run = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )

    # Assert
    assert run.returncode == 0, run.stderr[-2000:]
    where, bare = run.stdout.splitlines()
    assert Path(where).is_relative_to(site)
    assert bare == "[]"


def test_the_flower_app_project_names_the_installed_apps(tmp_path: Path) -> None:
    # Execute
    project = tomllib.loads((app_project(tmp_path) / "pyproject.toml").read_text())

    # Assert: components under the import root, the dataclass defaults, no code in the bundle.
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedrec.server.app:app",
        "clientapp": "fedrec.client.app:app",
    }
    assert app["config"] == FedrecConfig().to_run_config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml"]


def test_the_checkout_flower_section_matches_the_generated_one(tmp_path: Path) -> None:
    # The repository's [tool.flwr.app] serves `flwr run .` by hand: same apps, same defaults.
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    generated = tomllib.loads((app_project(tmp_path) / "pyproject.toml").read_text())
    assert ours["components"] == generated["tool"]["flwr"]["app"]["components"]
    assert ours["config"] == generated["tool"]["flwr"]["app"]["config"]
