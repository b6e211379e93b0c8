"""Run fedrec in Flower's Simulation Engine, and leave nothing running.

``run_simulation`` calls ``flwr run <app> --stream`` with a private ``FLWR_HOME`` (so the
managed SuperLink, its state and its installed apps belong to this run only), from a neutral
working directory (Ray puts the SuperLink's working directory on its workers' ``sys.path``,
where a stray ``fedrec`` module or folder would shadow the installed package), with runtime
dependency installation off (everything is installed already); afterwards it stops every
process that carries that ``FLWR_HOME``, in a teardown no signal cuts short, and a reaper
(:mod:`fedrec.deploy.reaper`) stops this launch's processes if this process dies before it
could. A launch waits for what a killed earlier launch of the same run left.

Must not: leave a Flower process running after it returns or raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrec.deploy.flower import (
    LAUNCH_ENV,
    app_project,
    flower_env,
    new_launch,
    signals_held,
    signals_interrupt,
    stop_processes,
    wait_gone,
    write_overrides,
)
from fedrec.deploy.reaper import Reaper
from fedrec.shared.errors import FedrecError
from fedrec.shared.policy import POLICY_ENV, NodePolicy, write_policy

NODE_POLICY = "node-policy.toml"  # the policy every simulated node of the run held


def run_simulation(
    run_dir: Path,
    run_config: dict[str, Any],
    num_nodes: int,
    *,
    on_line: Callable[[str], None] | None = None,
    timeout: float = 1800,
    node_policy: NodePolicy | None = None,
) -> None:
    """Run the fedrec app in Flower's Simulation Engine; raise with the log tail on failure.

    Every simulated node holds ``node_policy`` (the built-in default if None): it is written
    to ``<run_dir>/node-policy.toml`` and named by the node processes' own environment
    (:data:`~fedrec.shared.policy.POLICY_ENV`), never by the run config.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    overrides = write_overrides(run_dir / "run-config.toml", run_config)
    policy_file = run_dir / NODE_POLICY
    write_policy(policy_file, node_policy or NodePolicy())
    launch = new_launch()
    env = {**flower_env(flwr_home), POLICY_ENV: str(policy_file), LAUNCH_ENV: launch}
    flwr = Path(sys.executable).with_name("flwr")
    # One Ray actor per node (up to twice the cores): a round's nodes then run at once instead
    # of the third queueing behind the two actors Ray gives 2 cores by default, and a phase's
    # wall time minus its slowest node is Flower's own overhead.
    actors = min(num_nodes, 2 * (os.cpu_count() or 1))
    cmd = [
        str(flwr),
        "run",
        str(app_project(flwr_home / "app")),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_nodes} client-resources-num-cpus=1 init-args-num-cpus={actors}",
        "--run-config",
        str(overrides),
    ]
    log_path = run_dir / "flower.log"
    tail: list[str] = []
    # SIGTERM/SIGHUP as Ctrl-C, so `finally` stops Flower; the reaper if we die before that.
    # A killed launch of this run may have left processes that its reaper is still stopping
    left = wait_gone("FLWR_HOME", str(flwr_home))
    if left:
        raise SimulationFailed(
            f"processes of another launch of this run are still running (PIDs "
            f"{', '.join(map(str, left))}, FLWR_HOME={flwr_home}): another 'fedrec simulate' "
            "on this run directory, or leftovers its reaper could not stop. Wait for it to "
            "end or stop those processes, then run again."
        )
    with signals_interrupt():
        reaper = Reaper.start(LAUNCH_ENV, launch)
        try:
            with log_path.open("a", encoding="utf-8") as log_fh:  # a resumed run appends
                proc = subprocess.Popen(
                    cmd,
                    cwd=run_dir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    bufsize=1,
                )
                assert proc.stdout is not None
                start = time.monotonic()
                for line in proc.stdout:
                    log_fh.write(f"{time.monotonic() - start:8.2f}s {line}")  # since launch
                    tail = (tail + [line.rstrip()])[-40:]
                    if on_line is not None:
                        on_line(line.rstrip())
                    if time.monotonic() - start > timeout:
                        proc.kill()
                        raise TimeoutError(f"simulation exceeded {timeout}s; log: {log_path}")
                proc.wait()
            failed = proc.returncode != 0 or not (run_dir / "results.json").exists()
            if failed:
                raise SimulationFailed(
                    f"Flower simulation failed (exit {proc.returncode}); full log: {log_path}\n"
                    + "\n".join(tail[-25:])
                )
        except BaseException:
            _teardown(flwr_home, reaper, drop=True)  # a signal must not replace this error
            raise
        _teardown(flwr_home, reaper, drop=False)


def _teardown(flwr_home: Path, reaper: Reaper, *, drop: bool) -> None:
    with signals_held(drop=drop):
        stop_processes(flwr_home)
        reaper.release()


class SimulationFailed(FedrecError, RuntimeError):
    """Flower's simulation ended without results; the message holds its log's tail."""
