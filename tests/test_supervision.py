"""Process supervision: nothing fedrec started outlives it, whatever signal ends it.

The fast tests check the pieces: the reaper (``fedrec.deploy.reaper``) stops what carries its
marker once its parent dies, and stops nothing once released; SIGTERM arrives as an
interrupt; a signal during teardown waits until the teardown is over.

The ``e2e`` tests run the real ``fedrec`` command in its own session on a tiny world, wait
until Flower's processes are up, then end it as a user or CI would: Ctrl-C again and again
to the process group, SIGTERM to a ``timeout`` wrapper, SIGKILL to fedrec itself. Each then asserts
that fedrec exited with the expected code and that, within a bounded time, no process carrying
the run's marker (``FLWR_HOME`` under the run directory, ``FEDREC_DEPLOYMENT``) is left, nor
its reaper. A failing test kills whatever it started, by marker, before it reports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedrec.deploy.flower import Interrupted, signals_held, signals_interrupt, terminate
from fedrec.deploy.reaper import Reaper, sweep
from tests.tiny import save_tiny_bert, write_small_world

FEDREC = str(Path(sys.executable).with_name("fedrec"))
GONE_WITHIN = 60.0  # seconds from fedrec's exit until its last process must be gone
UP_WITHIN = 240.0  # seconds until Flower's processes are up (2 busy cores shared)
# Ctrl-C's exit: 130, or death by SIGINT when the second Ctrl-C comes after fedrec's teardown,
# while Python shuts down (a shell reports both as 130)
CTRL_C = (130, -signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# Helpers


def _marked(key: str, prefix: str) -> dict[int, str]:
    """PID -> command line of every process whose ``key`` starts with ``prefix``, and of every
    reaper watching such a marker (as ``processes_with_env`` scans, by /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        needle = f"{key}={prefix}".encode()
        if any(e.startswith(needle) for e in env) or f"--env {key}={prefix}" in cmd:
            found[int(entry.name)] = cmd.strip()
    return found


def _wait_until(what: Callable[[], object], timeout: float, poll: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := what():
            return got
        time.sleep(poll)
    return what()


def _gone(key: str, prefix: str, timeout: float = GONE_WITHIN) -> dict[int, str]:
    """What still carries the marker after up to ``timeout`` s (empty: all gone)."""
    _wait_until(lambda: not _marked(key, prefix), timeout)
    return _marked(key, prefix)


@contextlib.contextmanager
def _started(cmd: list[str], log: Path, key: str, prefix: str) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` in its own session, output to ``log``; on the way out (a failed test too) its
    process group and everything carrying the marker are killed."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        terminate(list(_marked(key, prefix)), grace=1.0)


def _wait_for_process(key: str, prefix: str, name: str, proc: subprocess.Popen[bytes]) -> None:
    """Until a process whose command line contains ``name`` carries the marker."""
    found = _wait_until(
        lambda: proc.poll() is not None or any(name in c for c in _marked(key, prefix).values()),
        UP_WITHIN,
    )
    assert proc.poll() is None, f"fedrec exited early ({proc.returncode})"
    assert found, f"no {name} carrying {key}={prefix}* after {UP_WITHIN:.0f}s"


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


# ---------------------------------------------------------------------------------------------
# Fast: the pieces


def _parent_with_reaper(marker: str, *, release: bool) -> subprocess.Popen[bytes]:
    """A Python process that starts a reaper for ``PROBE=<marker>`` and a child carrying that
    marker, releases the reaper if ``release``, prints ``up`` and sleeps."""
    code = (
        "import os, subprocess, sys, time\n"
        "from fedrec.deploy.reaper import Reaper\n"
        f"r = Reaper.start('PROBE', {marker!r})\n"
        f"env = {{**os.environ, 'PROBE': {marker!r}}}\n"
        "subprocess.Popen(['sleep', '120'], env=env, stdout=subprocess.DEVNULL)\n"
        "if sys.argv[1:] == ['release']:\n"
        "    r.release()\n"
        "print('up', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *(["release"] if release else [])],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def test_reaper_stops_what_carries_its_marker_when_its_parent_dies(tmp_path: Path) -> None:
    # Prepare: a parent with a reaper and a marked child
    marker = str(tmp_path / "killed")
    parent = _parent_with_reaper(marker, release=False)
    assert len(_marked("PROBE", marker)) == 2  # the child and the reaper

    try:
        # Execute
        parent.kill()
        parent.communicate()
        left = _gone("PROBE", marker, timeout=20)
    finally:
        terminate(list(_marked("PROBE", marker)), grace=0.5)

    # Assert: the child and the reaper are gone
    assert left == {}


def test_a_sweep_stops_a_marked_process_that_appears_after_an_empty_scan(tmp_path: Path) -> None:
    # Prepare: an unmarked shell that becomes a marked process 1 s from now, after the
    # sweep's first scans have found nothing
    marker = str(tmp_path / "late")
    late = subprocess.Popen(["sh", "-c", f"sleep 1; PROBE='{marker}' exec sleep 120"])

    try:
        # Execute: the first scans find nothing
        stopped = sweep("PROBE", marker, grace=0.5, deadline=20, settle=3.0)
        left = _marked("PROBE", marker)
    finally:
        late.kill()
        late.wait()

    # Assert: the sweep waited for the quiet period and stopped the late process
    assert stopped == 1 and left == {}


def test_processes_with_env_lists_the_children_of_marked_processes() -> None:
    # Prepare: a marked process whose child starts with an empty environment (as a Ray agent
    # looks once it has written its title over its environment block)
    from fedrec.deploy.flower import processes_with_env

    marker = f"children-{os.getpid()}"
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env={})\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PROBE": marker})
    try:
        # Execute
        found = _wait_until(lambda: len(processes_with_env("PROBE", marker)) == 2, 20)
        listed = processes_with_env("PROBE", marker)
    finally:
        terminate(processes_with_env("PROBE", marker), grace=0.5)
        parent.wait()

    # Assert: the parent by its marker, the child as its descendant
    assert found and parent.pid in listed and len(listed) == 2
    assert processes_with_env("PROBE", marker) == []


def test_a_released_reaper_exits_and_stops_nothing(tmp_path: Path) -> None:
    # Prepare: the parent released its reaper before it died
    marker = str(tmp_path / "released")
    parent = _parent_with_reaper(marker, release=True)

    try:
        # Execute
        parent.kill()
        parent.communicate()
        time.sleep(1.0)  # a reaper still running would have started to stop the child
        left = _marked("PROBE", marker)
    finally:
        terminate(list(_marked("PROBE", marker)), grace=0.5)

    # Assert: the reaper exited on release; the marked child lives on
    assert len(left) == 1 and not any("reaper" in c for c in left.values()), left


def test_reaper_handle_is_idempotent(tmp_path: Path) -> None:
    # Prepare
    reaper = Reaper.start("PROBE", str(tmp_path))

    # Execute: released twice (close() after a failed close(), say)
    reaper.release()
    reaper.release()

    # Assert
    assert reaper.popen.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_interrupt_as_ctrl_c_does(sig: signal.Signals) -> None:
    # Prepare
    before = signal.getsignal(sig)

    # Execute
    with pytest.raises(KeyboardInterrupt) as caught, signals_interrupt():
        signal.raise_signal(sig)

    # Assert: an interrupt that names its signal; the handler before the block is back
    assert isinstance(caught.value, Interrupted) and caught.value.signum == sig
    assert signal.getsignal(sig) is before


def test_a_signal_during_teardown_waits_until_the_teardown_is_over() -> None:
    # Prepare
    steps = []

    # Execute: Ctrl-C twice in the middle of a teardown
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            steps.append("started")
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            steps.append("finished")
        steps.append("after the block")  # never: the held Ctrl-C arrives here

    # Assert
    assert steps == ["started", "finished"]


def test_a_signal_during_a_teardown_for_an_error_is_dropped() -> None:
    # Execute: the teardown runs because of an error; Ctrl-C arrives in the middle
    with pytest.raises(RuntimeError), signals_held():
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("the run failed")

    # Assert: the error propagated, not a KeyboardInterrupt; Python's handler is back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------
# End to end: the fedrec command


def test_a_deployment_process_killed_by_pid_leaves_no_child_behind(tmp_path: Path) -> None:
    # Prepare: a started process with a child of its own, as a SuperNode has its ClientApp
    from fedrec.deploy.flower import processes_with_env
    from fedrec.deploy.local import PROCESS_ENV, LocalDeployment

    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    with LocalDeployment(tmp_path / "dep", ("x",), secure=False) as d:
        proc = d.spawn("node-x", [sys.executable, "-c", child], "node-x")
        both = _wait_until(lambda: len(processes_with_env(PROCESS_ENV, proc.marker)) == 2, 30)

        # Execute: kill the parent by PID, as a fault or an operator would
        os.kill(proc.pid, signal.SIGKILL)
        left = _wait_until(lambda: not processes_with_env(PROCESS_ENV, proc.marker), 15)

        # Assert: its child went with it while the deployment still runs
        assert both and left, processes_with_env(PROCESS_ENV, proc.marker)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("supervision")
    return write_small_world(root / "world", people=100), save_tiny_bert(root / "bert")


def _simulate(world: tuple[Path, Path], out: Path) -> list[str]:
    data, bert = world
    return [
        FEDREC,
        "simulate",
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-baselines",
        "--no-dp",
        "--rounds",
        "2",
        "--set",
        f"encoder-dir={bert}",
        "--set",
        f"cache-dir={out.parent / 'cache'}",
        "--set",
        "model.dim=16",
        "--set",
        "eval.max-users=20",
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("up", ["flower-superlink", "ray::"])  # just started; workers up
def test_ctrl_c_twice_to_simulate_leaves_nothing_running(
    world: tuple[Path, Path], tmp_path: Path, up: str
) -> None:
    # Prepare: fedrec simulate, until the process `up` runs
    out, log = tmp_path / "out", tmp_path / "fedrec.log"
    with _started(_simulate(world, out), log, "FLWR_HOME", str(out)) as proc:
        _wait_for_process("FLWR_HOME", str(out), up, proc)

        # Execute: Ctrl-C, and again 0.5 s later
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=GONE_WITHIN)
        left = _gone("FLWR_HOME", str(out))

    # Assert
    assert left == {}, _tail(log)
    assert code in CTRL_C, _tail(log)


@pytest.mark.e2e
def test_sigterm_to_a_timeout_wrapper_leaves_nothing_running(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: `timeout -s TERM 600 fedrec simulate`, until Ray's workers are up
    out, log = tmp_path / "out", tmp_path / "fedrec.log"
    cmd = ["timeout", "-s", "TERM", "600", *_simulate(world, out)]
    with _started(cmd, log, "FLWR_HOME", str(out)) as proc:
        _wait_for_process("FLWR_HOME", str(out), "ray::", proc)

        # Execute: a CI cancel: SIGTERM to the wrapper, which sends it to its process group
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GONE_WITHIN)
        left = _gone("FLWR_HOME", str(out))

    # Assert: fedrec took SIGTERM as Ctrl-C (130), and `timeout` passes that on
    assert code == 130, _tail(log)
    assert left == {}, _tail(log)


@pytest.mark.e2e
def test_sigkill_to_fedrec_leaves_nothing_running(world: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: fedrec simulate, until Ray's workers are up
    out, log = tmp_path / "out", tmp_path / "fedrec.log"
    with _started(_simulate(world, out), log, "FLWR_HOME", str(out)) as proc:
        _wait_for_process("FLWR_HOME", str(out), "ray::", proc)
        before = len(_marked("FLWR_HOME", str(out)))

        # Execute: SIGKILL to fedrec alone: no teardown runs, only the reaper
        proc.kill()
        code = proc.wait(timeout=10)
        left = _gone("FLWR_HOME", str(out))

    # Assert
    assert code == -signal.SIGKILL
    assert before >= 4, "the run's processes were not all up"
    assert left == {}, _tail(log)


def _deploy_local(world: tuple[Path, Path], out: Path) -> list[str]:
    data, bert = world
    return [
        FEDREC,
        "deploy",
        "local",
        "--insecure",
        "--no-dp",
        "--rounds",
        "2",
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        f"encoder-dir={bert}",
        "--set",
        f"cache-dir={out.parent / 'cache'}",
        "--set",
        "model.dim=16",
    ]


@pytest.mark.e2e
def test_repeated_ctrl_c_to_deploy_local_leaves_nothing_running(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: fedrec deploy local --insecure, until its run's ServerApp is up
    out, log = tmp_path / "deploy", tmp_path / "fedrec.log"
    with _started(_deploy_local(world, out), log, "FEDREC_DEPLOYMENT", str(out)) as proc:
        _wait_for_process("FEDREC_DEPLOYMENT", str(out), "flwr-serverapp", proc)

        # Execute: Ctrl-C three times, 0.5 s apart: the second lands in `flwr stop`, the third
        # in the teardown (two were not enough to cut that teardown short before the fix)
        for i in range(3):
            time.sleep(0.5 if i else 0)
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=GONE_WITHIN)
        left = _gone("FEDREC_DEPLOYMENT", str(out))

    # Assert
    assert left == {}, _tail(log)
    assert code in CTRL_C, _tail(log)


@pytest.mark.e2e
def test_sigkill_to_deploy_local_leaves_nothing_running(
    world: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: fedrec deploy local --insecure, until its run's ServerApp is up
    out, log = tmp_path / "deploy", tmp_path / "fedrec.log"
    with _started(_deploy_local(world, out), log, "FEDREC_DEPLOYMENT", str(out)) as proc:
        _wait_for_process("FEDREC_DEPLOYMENT", str(out), "flwr-serverapp", proc)
        before = len(_marked("FEDREC_DEPLOYMENT", str(out)))

        # Execute: SIGKILL to fedrec alone: no teardown runs, only the reaper
        proc.kill()
        code = proc.wait(timeout=10)
        left = _gone("FEDREC_DEPLOYMENT", str(out))

    # Assert
    assert code == -signal.SIGKILL
    assert before >= 6, "the deployment's processes were not all up"
    assert left == {}, _tail(log)


def test_a_teardown_for_an_error_keeps_the_error_when_a_signal_arrives() -> None:
    # Execute: Ctrl-C lands in a teardown called for an error already on its way out
    with pytest.raises(TimeoutError, match="run exceeded"):
        try:
            raise TimeoutError("run exceeded 30s")
        except TimeoutError:
            with signals_held(drop=True):
                os.kill(os.getpid(), signal.SIGINT)
            raise
