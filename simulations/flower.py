"""Drive Flower's own engines from fedrec commands, and leave nothing running.

``run_simulation`` calls ``flwr run <app> --stream`` with a private ``FLWR_HOME`` (so the
managed SuperLink, its state and its installed apps belong to this run only), from a neutral
working directory (Ray puts the SuperLink's cwd on workers' sys.path, research/flower.md
§1.4), with runtime dependency installation off (§9.1); afterwards it stops every process
that carries that ``FLWR_HOME``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent.parent


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


def run_simulation(
    run_dir: Path,
    run_config: dict[str, Any],
    num_nodes: int,
    *,
    on_line: Callable[[str], None] | None = None,
    timeout: float = 1800,
) -> None:
    """Run the fedrec app in Flower's Simulation Engine; raise with the log tail on failure."""
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    overrides = write_overrides(run_dir / "run-config.toml", run_config)
    flwr = Path(sys.executable).with_name("flwr")
    # One Ray actor per node (up to twice the cores): a round's nodes then run at once instead
    # of the third queueing behind the two actors Ray gives 2 cores (research/flower.md §3.3),
    # and a phase's wall time minus its slowest node is Flower's own overhead.
    actors = min(num_nodes, 2 * (os.cpu_count() or 1))
    cmd = [
        str(flwr),
        "run",
        str(APP_DIR),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_nodes} client-resources-num-cpus=1 init-args-num-cpus={actors}",
        "--run-config",
        str(overrides),
    ]
    log_path = run_dir / "flower.log"
    tail: list[str] = []
    previous = signal.signal(signal.SIGTERM, _raise_exit)  # so that `finally` stops Flower
    try:
        with log_path.open("w", encoding="utf-8") as log_fh:
            proc = subprocess.Popen(
                cmd,
                cwd=run_dir,
                env=flower_env(flwr_home),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            start = time.monotonic()
            for line in proc.stdout:
                log_fh.write(f"{time.monotonic() - start:8.2f}s {line}")  # seconds since launch
                tail = (tail + [line.rstrip()])[-40:]
                if on_line is not None:
                    on_line(line.rstrip())
                if time.monotonic() - start > timeout:
                    proc.kill()
                    raise TimeoutError(f"simulation exceeded {timeout}s; log: {log_path}")
            proc.wait()
        failed = proc.returncode != 0 or not (run_dir / "results.json").exists()
        if failed:
            raise RuntimeError(
                f"Flower simulation failed (exit {proc.returncode}); full log: {log_path}\n"
                + "\n".join(tail[-25:])
            )
    finally:
        stop_processes(flwr_home)
        signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
