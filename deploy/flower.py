"""Flower's processes as fedrec starts them, in simulation, deployment and audits alike.

Owns: the Flower app project handed to ``flwr run`` (:func:`app_project`), the path of Flower's
executables in this environment, the environment of one run's Flower processes, free loopback
ports, TOML values and run-config override files, finding and stopping processes (the one
:func:`terminate`, used by simulation and deployment alike), and the signal handling around
them: SIGTERM/SIGHUP as Ctrl-C (:func:`signals_interrupt`) and a teardown no signal cuts short
(:func:`signals_held`). The watchdog that stops them if fedrec dies is :mod:`.reaper`.

Must not: import ``client/`` or ``simulations/``, or know what a deployment or a simulation
does with the processes it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedrec.shared.fsio import atomic_write_text

SERVER_APP = "fedrec.server.app:app"
CLIENT_APP = "fedrec.client.app:app"
LOOPBACK = "127.0.0.1"
# Marks every process of one launch (one fedrec process's start of Flower): a killed launch's
# reaper stops what carries its own launch's marker, never a later launch of the same run.
LAUNCH_ENV = "FEDREC_LAUNCH"


def new_launch() -> str:
    """A fresh value for :data:`LAUNCH_ENV`."""
    return uuid.uuid4().hex


def app_project(folder: Path) -> Path:
    """Write the Flower app project (a ``pyproject.toml``) that ``flwr run`` builds into a FAB.

    The FAB carries no code: its components name the installed ``fedrec`` package, so the
    same project works from a source checkout and from a wheel. Its run-config defaults are
    :class:`fedrec.shared.config.FedrecConfig`'s, which a test keeps equal to the repository's
    ``[tool.flwr.app.config]``.
    """
    from importlib.metadata import version  # here, not at the top: the reaper imports us

    from fedrec.shared.config import FedrecConfig

    defaults = FedrecConfig().to_run_config()
    lines = [  # nothing builds this project: Flower reads [project] and [tool.flwr.app] only
        "[project]",
        'name = "fedrec"',
        f"version = {toml_value(version('fedrec'))}",
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedrec"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {toml_value(SERVER_APP)}",
        f"clientapp = {toml_value(CLIENT_APP)}",
        "",
        "[tool.flwr.app.config]",
        *(f'"{k}" = {toml_value(v)}' for k, v in sorted(defaults.items())),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "pyproject.toml", "\n".join(lines) + "\n")
    return folder


def flower_bin(name: str) -> str:
    """Path of Flower's executable ``name`` (``flwr``, ``flower-superlink``, ...) installed
    next to this Python, so every process runs the same environment's Flower."""
    return str(Path(sys.executable).with_name(name))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def process_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment for a Flower process with its own ``FLWR_HOME``: no runtime
    dependency installation (everything is installed already), one OpenMP thread, unbuffered
    output, and this environment's executables first on ``PATH``."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for one simulation run's Flower processes: its own FLWR_HOME and its own
    local SuperLink ports (the managed SuperLink otherwise always takes 39091/39093, and two
    runs at once would share it)."""
    env = process_env(flwr_home)
    http_port, control_port = free_ports(2)
    env.update(
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        RAY_DEDUP_LOGS="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
    )
    return env


def toml_value(v: Any) -> str:
    """``v`` as a TOML value: booleans, numbers (NaN as ``nan``), anything else a quoted string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if not (isinstance(v, float) and v != v) else "nan"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_overrides(path: Path, run_config: dict[str, Any]) -> Path:
    lines = [f'"{k}" = {toml_value(v)}' for k, v in sorted(run_config.items())]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs whose environment has ``key=value``, and every live descendant of theirs (Linux
    /proc): a process may overwrite its own environment block, as Ray's agents do when they
    set their title over it, but its parent's marker still names it. This process is never
    listed."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    marked: list[int] = []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (pid := int(entry.name)) == me:
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[:2]
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if state != "Z":  # a zombie is gone already
            children.setdefault(int(ppid), []).append(pid)
        if needle in env:
            marked.append(pid)
    found, todo = set(marked), list(marked)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def terminate(pids: Sequence[int], grace: float = 8.0, kill_wait: float = 3.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL and wait up to ``kill_wait`` s; returns
    the PIDs still alive after both (a zombie counts as gone)."""
    left = list(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            left = [p for p in left if _alive(p)]
            if left:
                time.sleep(0.1)
        if not left:
            break
    return left


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised as Ctrl-C raises KeyboardInterrupt (so every ``except
    KeyboardInterrupt`` and every exit code for Ctrl-C applies to a CI cancel too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """During the block SIGTERM and SIGHUP raise :class:`Interrupted`, so the ``finally``
    blocks that stop Flower's processes run as they do on Ctrl-C. Outside the main thread
    (where Python cannot set handlers) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        _restore(old)


@contextlib.contextmanager
def signals_held(*, drop: bool = False) -> Iterator[None]:
    """A teardown that no signal cuts short: SIGINT, SIGTERM and SIGHUP are only recorded
    during the block. Afterwards the first one recorded is delivered again, unless an
    exception is leaving the block or ``drop`` says the teardown is for an error already on
    its way out (which the signal must not replace). A Python handler
    rather than ``SIG_IGN`` or a blocked mask, because children inherit those two across
    ``exec``. Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    except BaseException:
        got.clear()
        raise
    finally:
        _restore(old)
    if got and not drop:
        signal.raise_signal(got[0])


def _restore(old: dict[signal.Signals, Any]) -> None:
    for s, h in old.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python


def wait_gone(key: str, value: str, timeout: float = 60.0) -> list[int]:
    """Wait up to ``timeout`` s until no process carries ``key=value`` (what an earlier,
    killed launch of the same run left while its reaper stops it); returns the PIDs left."""
    deadline = time.monotonic() + timeout
    while (left := processes_with_env(key, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_processes(flwr_home: Path, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process started for this FLWR_HOME; returns how many
    survived both."""
    pids = processes_with_env("FLWR_HOME", str(flwr_home))
    return len(terminate(pids, grace=grace, kill_wait=grace))


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (Linux /proc; the state follows the last
    ``)``, since the command name in parentheses may itself contain one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
