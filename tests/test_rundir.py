"""The server's hold on its run directory: one server at a time (``run.lock``), and a run
directory that already holds a run is refused unless the run resumes it. Through the
ServerApp's own entry point, so that every way of starting a server (``fedrec simulate``,
``fedrec deploy local``, ``flwr run`` by hand) gets the same checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedrec.server.app import main
from fedrec.server.rundir import LOCK, RunDir, RunDirBusy, RunDirError

HOLD = textwrap.dedent(
    """
    import sys, time
    from fedrec.server.rundir import RunDir
    with RunDir(sys.argv[1]).locked("the holder under test"):
        print("held", flush=True)
        time.sleep(120)
    """
)


def _context(run_dir: Path, **extra: object) -> Context:
    config = {"run-dir": str(run_dir), "data-dir": str(run_dir / "no-data"), **extra}
    return Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=config)


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the run directory's lock; killed at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_server_on_a_locked_run_dir_is_refused_naming_the_holder(
    tmp_path: Path, holder: subprocess.Popen
) -> None:
    # Execute / Assert: refused at once (before the catalogues), the holder named
    with pytest.raises(RunDirBusy) as caught:
        main(None, _context(tmp_path / "run"))  # type: ignore[arg-type]
    message = str(caught.value)
    assert "the holder under test" in message and f"pid {holder.pid} " in message
    assert str(tmp_path / "run" / LOCK) in message and "another run-dir" in message
    assert RunDir(tmp_path / "run").used() == []  # it wrote nothing


def test_the_lock_of_a_killed_server_does_not_block_the_next(
    tmp_path: Path, holder: subprocess.Popen
) -> None:
    # Prepare: the holder dies without releasing anything (its note stays in run.lock)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert "the holder under test" in (tmp_path / "run" / LOCK).read_text()

    # Execute: the kernel dropped its flock, so the next server takes the lock
    with RunDir(tmp_path / "run").locked("the next server"):
        note = (tmp_path / "run" / LOCK).read_text()

    # Assert
    assert note.startswith("the next server, pid ") and "holder" not in note


def test_two_holds_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    # Prepare
    run = RunDir(tmp_path / "run")

    # Execute / Assert: flock is per open file, so a second hold in this process is refused
    with run.locked("first"):
        with pytest.raises(RunDirBusy, match="first, pid"):
            with RunDir(tmp_path / "run").locked("second"):
                pass
    with run.locked("third"):  # released on leaving the block
        pass


def test_a_run_dir_holding_a_run_is_refused_without_resume(tmp_path: Path) -> None:
    # Prepare: a run was started there
    RunDir(tmp_path / "run").start({}, ["ecommerce"], {"w": (2,)})

    # Execute / Assert: the ServerApp refuses it before any work, and says how to continue it
    with pytest.raises(RunDirError) as caught:
        main(None, _context(tmp_path / "run"))  # type: ignore[arg-type]
    message = str(caught.value)
    assert "already holds a run" in message and "config.json" in message
    assert "resume = true" in message and caught.value.exit_code == 2


def test_a_new_run_dir_is_not_used(tmp_path: Path) -> None:
    # Prepare: what RunDir and a server's lock create, and simulate's own files
    run = RunDir(tmp_path / "run")
    with run.locked():
        pass
    (run.path / "flower.log").write_text("")

    # Execute / Assert
    assert run.used() == []
    run.refuse_used()
