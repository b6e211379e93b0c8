"""The reaper: a watchdog process that stops a run's Flower processes if fedrec dies first.

Owns: the watchdog (``python -m fedrec.deploy.reaper --parent PID --env KEY=VALUE``) and
:class:`Reaper`, the parent's handle on it. The parent starts it before it starts Flower and
tells it ``done`` after its own teardown; the watchdog then exits and stops nothing. If instead
the parent goes away first (SIGKILL, a teardown cut short, a crash), the watchdog stops every
process whose environment carries ``KEY=VALUE`` (its launch's ``FEDREC_LAUNCH``, never the
run's own marker: a resume of the same run started meanwhile is another launch) and their
descendants, repeats until none has shown up for a few seconds, and exits.

It learns that the parent is gone from its stdin (a pipe only the parent holds: end of file
when the parent dies, however it dies) and from ``os.getppid()`` (it changes when the parent
dies); neither can mistake a recycled PID for the parent. It runs in its own session, so the
signals sent to fedrec's process group (Ctrl-C, ``timeout``) do not reach it.

Must not: import anything beyond the standard library and :mod:`.flower` (it starts once per
run and must start fast), or stop a process that lacks the marker.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time

from fedrec.deploy.flower import processes_with_env, terminate

DONE = b"done\n"
POLL = 0.2  # seconds between checks of the parent; the pipe wakes it at once in any case


class Reaper:
    """The parent's handle on its watchdog: :meth:`start` before starting Flower,
    :meth:`release` after stopping it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @classmethod
    def start(cls, key: str, value: str) -> Reaper:
        """Start the watchdog for processes carrying ``key=value``, in its own session and
        without that marker in its own environment."""
        env = {k: v for k, v in os.environ.items() if k != key}
        cmd = [sys.executable, "-m", "fedrec.deploy.reaper", "--parent", str(os.getpid())]
        popen = subprocess.Popen(
            [*cmd, "--env", f"{key}={value}"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        return cls(popen)

    def release(self) -> None:
        """Teardown is done: the watchdog exits without stopping anything."""
        if self.popen.stdin is None or self.popen.stdin.closed:
            return
        try:
            self.popen.stdin.write(DONE)
            self.popen.stdin.close()
        except OSError:  # BrokenPipeError: the watchdog is gone already
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def wait_for_parent(parent: int, poll: float = POLL) -> bool:
    """Block until the parent says ``done`` (False) or is gone (True)."""
    while True:
        ready, _, _ = select.select([0], [], [], poll)
        if ready:
            data = os.read(0, len(DONE))
            if not data:
                return True
            if data == DONE:
                return False
        elif os.getppid() != parent:
            return True


def sweep(
    key: str, value: str, grace: float = 5.0, deadline: float = 60.0, settle: float = 2.0
) -> int:
    """Stop every process carrying ``key=value`` (and their descendants), again while new
    ones appear (a dying SuperLink may still be starting children); done once scans have
    found none for ``settle`` seconds, or at ``deadline``. Returns how many were signalled."""
    stopped = 0
    now = time.monotonic()
    end, quiet_since = now + deadline, now
    while (now := time.monotonic()) < end:
        pids = processes_with_env(key, value)
        if pids:
            terminate(pids, grace=grace, kill_wait=3.0)
            stopped += len(pids)
            quiet_since = time.monotonic()
        elif now - quiet_since >= settle:
            break
        else:
            time.sleep(0.2)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedrec.deploy.reaper", description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="PID of the process to watch")
    parser.add_argument("--env", required=True, help="KEY=VALUE carried by what to stop")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to KILL")
    args = parser.parse_args(argv)
    key, sep, value = args.env.partition("=")
    if not (key and sep and value):
        parser.error(f"--env must be KEY=VALUE. Found {args.env!r}.")
    for s in (signal.SIGINT, signal.SIGHUP):  # the parent's Ctrl-C or hang-up is its business
        signal.signal(s, signal.SIG_IGN)
    if not wait_for_parent(args.parent):
        return 0
    stopped = sweep(key, value, grace=args.grace)
    if stopped:
        print(
            f"fedrec reaper: process {args.parent} died; stopped {stopped} processes "
            f"carrying {key}={value}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
