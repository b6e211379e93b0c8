"""Fault injection for the deployment tests: what happens to a :class:`LocalDeployment` when a
host dies, a node is stopped, a platform comes back, or a node is misconfigured.

Owns: the faults tests/test_deploy.py injects into a running deployment. ``fedrec deploy local``
never does any of this, so none of it lives in ``fedrec.deploy``.

Must not: stop a process that is not this deployment's (every kill is narrowed to processes
carrying the deployment's ``FEDREC_DEPLOYMENT`` marker or started by it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from fedrec.deploy.commands import node_config, supernode_command
from fedrec.deploy.flower import free_ports, processes_with_env, terminate
from fedrec.deploy.local import DEPLOYMENT_ENV, DeployError, LocalDeployment, Proc


def crash(d: LocalDeployment, name: str) -> None:
    """SIGKILL process ``name`` and everything it started, as if its machine died.

    Kills the process group (each process of a deployment leads its own session) and then any
    process left with that process's ``FLWR_HOME`` (a child that moved to a new session), so no
    orphaned ClientApp finishes a round after its node is gone.
    """
    proc = d.procs[name]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.popen.wait(timeout=15)
    ours = set(processes_with_env(DEPLOYMENT_ENV, str(d.root)))
    left = [pid for pid in processes_with_env("FLWR_HOME", str(d.home(name))) if pid in ours]
    terminate(left, grace=0.5)


def stop(d: LocalDeployment, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop process ``name`` (SIGTERM: graceful; SIGKILL: a crash) and wait for it."""
    proc = d.procs[name]
    if proc.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=5)


def node_status(d: LocalDeployment, channel: str) -> str:
    """``registered``, ``online`` or ``offline`` as the SuperLink sees ``channel``'s node."""
    want = str(d.node_ids[channel])
    return next((str(n["status"]) for n in d.nodes() if str(n["node-id"]) == want), "")


def restart_node(d: LocalDeployment, channel: str, data_dir: Path, timeout: float = 120.0) -> Proc:
    """Start a crashed platform again, once the SuperLink has noticed it is gone.

    After a crash (no goodbye) the SuperLink keeps the node online until its heartbeat lapses
    (2 x 30 s in flwr 1.42); activating the same key before that is refused ("[code: 2004]
    Failed to activate SuperNode", exit code 305).
    """
    deadline = time.monotonic() + timeout
    while node_status(d, channel) == "online":
        if time.monotonic() > deadline:
            raise DeployError(f"{channel}'s node still online after {timeout:.0f}s")
        time.sleep(1.0)
    return d.start_node(channel, data_dir)


def start_misconfigured_node(
    d: LocalDeployment,
    name: str,
    channel: str,
    data_dir: Path,
    *,
    root_certificates: Path | None,
    private_key: Path | None,
    extra: Sequence[str] = (),
) -> Proc:
    """Start a ``flower-supernode`` against ``d``'s SuperLink with the CA and key given here
    (``root_certificates=None``: ``--insecure``; ``private_key=None``: no key), not the
    deployment's own, on a fresh Runtime API port."""
    cmd = supernode_command(
        superlink=d.address,
        port=free_ports(1)[0],
        config=node_config(channel, data_dir, d.state_dir(channel)),
        root_certificates=root_certificates,
        private_key=private_key,
        extra=extra,
    )
    d.state_dir(channel).mkdir(parents=True, exist_ok=True)
    return d.spawn(name, cmd, name, cwd=d.state_dir(channel))
