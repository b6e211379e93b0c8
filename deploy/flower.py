"""Flower's processes as fedrec starts them, in simulation, deployment and audits alike.

Owns: the Flower app project handed to ``flwr run`` (:func:`app_project`), the environment of
one run's Flower processes, free loopback ports, run-config override files, and finding and
stopping every process a run started.

Must not: import ``client/`` or ``simulations/``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedrec.shared.fsio import atomic_write_text

SERVER_APP = "fedrec.server.app:app"
CLIENT_APP = "fedrec.client.app:app"


def app_project(folder: Path) -> Path:
    """Write the Flower app project (a ``pyproject.toml``) that ``flwr run`` builds into a FAB.

    The FAB carries no code: its components name the installed ``fedrec`` package, so the
    same project works from a source checkout and from a wheel. Its run-config defaults are
    :class:`fedrec.shared.config.FedrecConfig`'s, which a test keeps equal to the repository's
    ``[tool.flwr.app.config]``.
    """
    from fedrec.shared.config import FedrecConfig

    defaults = FedrecConfig().to_run_config()
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedrec"',
        f"version = {_toml_value(version('fedrec'))}",
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedrec"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {_toml_value(SERVER_APP)}",
        f"clientapp = {_toml_value(CLIENT_APP)}",
        "",
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in sorted(defaults.items())),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "pyproject.toml", "\n".join(lines) + "\n")
    return folder


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for one run's Flower processes: its own FLWR_HOME and its own local
    SuperLink ports (the managed SuperLink otherwise always takes 39091/39093, and two runs
    at once would share it)."""
    env = dict(os.environ)
    http_port, control_port = free_ports(2)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        RAY_DEDUP_LOGS="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if not (isinstance(v, float) and v != v) else "nan"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_overrides(path: Path, run_config: dict[str, Any]) -> Path:
    lines = [f'"{k}" = {_toml_value(v)}' for k, v in sorted(run_config.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment has ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            pids.append(int(entry.name))
    return pids


def stop_processes(flwr_home: Path, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process started for this FLWR_HOME; returns how many."""
    pids = processes_with_env("FLWR_HOME", str(flwr_home))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]
            if not pids:
                return 0
            time.sleep(0.2)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
