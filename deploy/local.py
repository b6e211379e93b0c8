"""``fedrec deploy local``: a whole deployment on 127.0.0.1, one process per platform.

Owns: :class:`LocalDeployment` (starting a SuperLink and one SuperNode per channel on loopback,
registering the platforms' keys, submitting a run and streaming its log, and stopping every
process it started) and :func:`deploy_local` (one federated run through it, then teardown).

Everything here drives Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``) with the command lines of :mod:`fedrec.deploy.commands`, exactly as
docs/deployment.md shows them; nothing is home-made on the wire. Every process started here
carries ``FEDREC_DEPLOYMENT=<run dir>`` in its environment, so teardown finds and stops all of
them (their ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` children included),
also after a crash or Ctrl-C; no signal cuts that teardown short, and a reaper
(:mod:`fedrec.deploy.reaper`) stops them (by their ``FEDREC_LAUNCH``) if this process dies
before its teardown ran. A new deployment of the same root first waits for what a killed one
left.

Must not: hold training logic the apps need, import ``server/`` or ``client/``, listen anywhere
but 127.0.0.1, or inject faults (crashing or restarting a process is the tests' business:
tests/deploy_faults.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from fedrec.deploy.certs import Certs, make_certs
from fedrec.deploy.commands import (
    LINK_NAME,
    node_config,
    superlink_command,
    supernode_command,
    write_flower_config,
)
from fedrec.deploy.flower import (
    LAUNCH_ENV,
    LOOPBACK,
    app_project,
    flower_bin,
    free_ports,
    new_launch,
    process_env,
    processes_with_env,
    signals_held,
    signals_interrupt,
    terminate,
    wait_gone,
    write_overrides,
)
from fedrec.deploy.reaper import Reaper
from fedrec.deploy.split import split_dataset
from fedrec.shared.errors import FedrecError, RunFailed

DEPLOYMENT_ENV = "FEDREC_DEPLOYMENT"  # marks every process of one deployment (for teardown)
PROCESS_ENV = "FEDREC_PROCESS"  # marks one started process and its children (orphan sweep)
SWEEP_EVERY = 0.5  # seconds between checks for a started process that died
# flwr's SuperExec polls its SuperNode/SuperLink for work every 1 s by default
# (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 0.01-60 s). Measured here: 0.2 s took idle CPU from 6 %
# to 17 % of a core (3 nodes) with no measurable gain per round, so Flower's default stays.
SUPEREXEC_POLL: str | None = None


class DeployError(FedrecError, RuntimeError):
    """A deployment step failed; the message names the process and the tail of its log."""


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a process's log, for an error message."""
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Proc:
    """One process this deployment started: its name, handle, log file and command line."""

    name: str
    popen: subprocess.Popen[bytes] | subprocess.Popen[str]
    log: Path
    cmd: list[str]
    marker: str = ""  # PROCESS_ENV of this start: its children carry it too

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None


_RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclass
class LocalDeployment:
    """One SuperLink and one SuperNode per platform on 127.0.0.1, each its own process.

    Every process gets ``FEDREC_DEPLOYMENT=<root>`` and its own ``FLWR_HOME`` (the SuperLink
    one, each platform one: as if on separate machines). Use as a context manager: leaving it
    stops every process it started, and every process that inherited the marker; if this
    process dies first, its reaper does that.

    Layout under ``root``::

        certs/                 test CA, SuperLink certificate, node key pairs (secure mode)
        data/coordinator/      public catalogues only (the ServerApp's data-dir)
        data/<channel>/        that platform's dataset, nothing else
        nodes/<channel>/       that platform's state-dir: item cache, privacy ledger
        flwr/<process>/        FLWR_HOME of each process (config.toml, installed apps)
        logs/<process>.log     stdout+stderr of each process
        superlink.db           SuperLink state (registered nodes, runs): survives a restart
    """

    root: Path
    channels: tuple[str, ...]
    secure: bool = True
    superexec_poll: str | None = SUPEREXEC_POLL
    link_port: int = 0
    procs: dict[str, Proc] = field(default_factory=dict)
    certs: Certs | None = None
    node_policy: Path | None = None  # every node's privacy policy file (None: built-in)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        if not self.link_port:
            self.link_port = free_ports(1)[0]
        if self.secure and self.certs is None:
            self.certs = make_certs(self.root / "certs", self.channels)
        self.node_ports: dict[str, int] = {}
        self.node_ids: dict[str, int] = {}
        self.reaper: Reaper | None = None
        self.launch = new_launch()  # this object's processes; a killed one's reaper spares us
        self._starts = itertools.count()
        self._swept: set[str] = set()
        self._sweep_lock = threading.Lock()
        self._stop_sweeper = threading.Event()
        self._sweeper: threading.Thread | None = None
        write_flower_config(self.home("cli"), self.address, self.ca)

    # -- environment ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime API share one port)."""
        return f"{LOOPBACK}:{self.link_port}"

    @property
    def ca(self) -> Path | None:
        """The CA certificate every process trusts (``None``: insecure)."""
        return self.certs.ca_cert if self.certs is not None else None

    def home(self, who: str) -> Path:
        """``FLWR_HOME`` of process ``who`` (created on first use)."""
        path = self.root / "flwr" / who
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, who: str) -> dict[str, str]:
        """Environment of process ``who``: its own ``FLWR_HOME``, no update check, and this
        deployment's marker."""
        env = process_env(self.home(who))
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env[DEPLOYMENT_ENV] = str(self.root)
        env[LAUNCH_ENV] = self.launch
        if self.superexec_poll:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = self.superexec_poll
        return env

    def state_dir(self, channel: str) -> Path:
        """``channel``'s node-local state: privacy ledger and item cache."""
        return self.root / "nodes" / channel

    # -- processes -----------------------------------------------------------------------

    def watch(self) -> None:
        """Start the reaper (once, before the first process): it stops every process this
        object started (and their children) if this process dies before :meth:`close`."""
        if self.reaper is None:
            # a killed earlier deployment of this root may have left processes its reaper
            # is still stopping
            left = wait_gone(DEPLOYMENT_ENV, str(self.root))
            if left:
                raise DeployError(
                    f"processes of another deployment in {self.root} are still running "
                    f"(PIDs {', '.join(map(str, left))}): wait for it to end or stop those "
                    "processes, then deploy again."
                )
            self.reaper = Reaper.start(LAUNCH_ENV, self.launch)

    def spawn(self, name: str, cmd: list[str], who: str, cwd: Path | None = None) -> Proc:
        """Start ``cmd`` as process ``name`` with ``who``'s environment, logging to
        ``logs/<name>.log``, in its own session (so Ctrl-C reaches this process only)."""
        old = self.procs.get(name)
        if old is not None and old.running():
            raise DeployError(f"{name} is already running (pid {old.pid})")
        if old is not None:  # what the last one left
            self._sweep(old)
        log = self.root / "logs" / f"{name}.log"
        self.watch()
        env = self.env(who)
        env[PROCESS_ENV] = f"{self.root}#{name}#{next(self._starts)}"
        with log.open("ab") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd,
                cwd=cwd or self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        proc = Proc(name, popen, log, cmd, env[PROCESS_ENV])
        self.procs[name] = proc
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_orphans, daemon=True)
            self._sweeper.start()
        return proc

    def _sweep_orphans(self) -> None:
        """While the deployment runs: once a started process has died (a crash, a kill by
        PID), stop what it left behind (a SuperNode's ``flwr-clientapp``, a SuperLink's
        ``flwr-serverapp``), which would otherwise hang on for minutes."""
        while not self._stop_sweeper.wait(SWEEP_EVERY):
            for proc in list(self.procs.values()):
                if not proc.running():
                    self._sweep(proc)

    def _sweep(self, proc: Proc) -> None:
        """Stop what ``proc`` (dead) left behind, once (the sweeper and :meth:`spawn` race)."""
        with self._sweep_lock:
            if not proc.marker or proc.marker in self._swept:
                return
            self._swept.add(proc.marker)
        left = processes_with_env(PROCESS_ENV, proc.marker)
        if left:
            terminate(left, grace=2)

    def start_superlink(self, *, database: bool = True) -> Proc:
        """Start ``flower-superlink``; with ``database`` its state (registered nodes, runs)
        is ``superlink.db`` and survives a restart."""
        cmd = superlink_command(
            port=self.link_port,
            certs=self.certs,
            database=self.root / "superlink.db" if database else None,
        )
        return self.spawn("superlink", cmd, "superlink")

    def wait_superlink(self, timeout: float = 90.0) -> None:
        """Until ``/health`` answers 200 (over TLS, checked against our CA when secure)."""
        scheme = "https" if self.secure else "http"
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        deadline = time.monotonic() + timeout
        link = self.procs["superlink"]
        while time.monotonic() < deadline:
            if not link.running():
                raise DeployError(
                    f"flower-superlink exited with code {link.popen.returncode}; "
                    f"log {link.log}:\n{tail(link.log)}"
                )
            try:
                url = f"{scheme}://{self.address}/health"
                with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise DeployError(f"SuperLink not healthy after {timeout:.0f}s; log:\n{tail(link.log)}")

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One ``flwr`` CLI call against this deployment's SuperLink."""
        self.watch()
        return subprocess.run(
            [flower_bin("flwr"), *args],
            cwd=self.root,
            env=self.env("cli"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, channel: str) -> int:
        """``flwr supernode register <channel>.pub``; returns the node id the SuperLink gave."""
        assert self.certs is not None, "nodes are registered only with SuperNode auth (secure)"
        out = self.flwr(
            "supernode",
            "register",
            str(self.certs.node_pub(channel)),
            LINK_NAME,
            "--name",
            channel,
            "--format",
            "json",
        )
        try:
            reply = json.loads(out.stdout)
        except json.JSONDecodeError:
            reply = {}
        if out.returncode != 0 or not reply.get("success"):
            raise DeployError(
                f"registering {channel}'s key failed (exit {out.returncode}): "
                f"{out.stdout.strip()} {out.stderr.strip()}"
            )
        self.node_ids[channel] = int(reply["node-id"])
        return self.node_ids[channel]

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: node id, status (registered/online/offline)."""
        out = self.flwr("supernode", "list", LINK_NAME, "--format", "json")
        try:
            return list(json.loads(out.stdout).get("nodes", []))
        except json.JSONDecodeError:
            return []

    def start_node(self, channel: str, data_dir: Path) -> Proc:
        """Start ``flower-supernode`` for ``channel`` as ``node-<channel>``, with this
        deployment's CA and the channel's key (secure) or ``--insecure``.

        The state-dir (privacy ledger, item cache) is ``nodes/<channel>`` and the Runtime API
        port is chosen once per node, so a node started again is the same platform on the same
        port with the same ledger.
        """
        name = f"node-{channel}"
        port = self.node_ports.setdefault(name, free_ports(1)[0])
        cmd = supernode_command(
            superlink=self.address,
            port=port,
            config=node_config(channel, data_dir, self.state_dir(channel), policy=self.node_policy),
            root_certificates=self.ca,
            private_key=self.certs.node_key(channel) if self.certs is not None else None,
        )
        # A ClientApp's cwd is its SuperNode's: keep it inside the platform's own folder.
        self.state_dir(channel).mkdir(parents=True, exist_ok=True)
        return self.spawn(name, cmd, name, cwd=self.state_dir(channel))

    def wait_online(self, count: int, timeout: float = 90.0) -> list[dict[str, Any]]:
        """Until ``count`` SuperNodes are online; raises with the log of a node that died."""
        deadline = time.monotonic() + timeout
        platforms = [self.procs[f"node-{ch}"] for ch in self.channels if f"node-{ch}" in self.procs]
        while True:
            for proc in platforms:
                if not proc.running():
                    raise DeployError(
                        f"{proc.name} exited with code {proc.popen.returncode}; "
                        f"log {proc.log}:\n{tail(proc.log)}"
                    )
            online = [n for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise DeployError(f"{len(online)} of {count} SuperNodes online after {timeout}s")
            time.sleep(0.5)

    def submit(
        self,
        run_config: dict[str, Any],
        *,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
        log_name: str = "flwr-run",
    ) -> tuple[int, int | None]:
        """``flwr run <app> fedrec-local --run-config <toml> --stream``; (exit code, run id).

        Streams the ServerApp's log lines to ``on_line``. On a timeout or Ctrl-C the run is
        stopped on the SuperLink (``flwr stop``) before the error propagates.
        """
        overrides = write_overrides(self.root / f"{log_name}.toml", run_config)
        cmd = [
            flower_bin("flwr"),
            "run",
            str(app_project(self.root / "app")),
            LINK_NAME,
            "--run-config",
            str(overrides),
            "--stream",
        ]
        log = self.root / "logs" / f"{log_name}.log"
        run_id: int | None = None
        self.watch()
        with log.open("a", encoding="utf-8") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=self.env("cli"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            self.procs[log_name] = Proc(log_name, proc, log, cmd)
            deadline = time.monotonic() + timeout
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    if run_id is None and (m := _RUN_ID.search(line)):
                        run_id = int(m.group(1))
                    if on_line is not None:
                        on_line(line.rstrip())
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"run exceeded {timeout:.0f}s; log {log}")
                proc.wait()
            except BaseException:
                with signals_held(drop=True):  # the error on its way out stays the error
                    if run_id is not None and self.procs["superlink"].running():
                        with contextlib.suppress(Exception):
                            self.flwr("stop", str(run_id), LINK_NAME, timeout=20)
                    terminate([proc.pid], grace=3)
                raise
        return proc.returncode, run_id

    def close(self, *, for_error: bool = False) -> list[int]:
        """Stop everything: nodes first, then the SuperLink, then any process still carrying
        this deployment's marker (superexecs, app processes), then release the reaper; no
        signal cuts it short (``for_error``: nor replaces the error that ended the
        deployment). Returns PIDs that survived."""
        with signals_held(drop=for_error):
            self._stop_sweeper.set()
            if self._sweeper is not None:
                self._sweeper.join(timeout=10)
            order = sorted(self.procs.values(), key=lambda p: p.name == "superlink")
            for proc in order:
                if proc.running():
                    terminate([proc.pid])
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=1)
            left = processes_with_env(DEPLOYMENT_ENV, str(self.root))
            survivors = terminate(left, grace=5) if left else []
            if self.reaper is not None:
                self.reaper.release()
                self.reaper = None
        return survivors

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(for_error=exc_type is not None)


# ---------------------------------------------------------------------------------------------
# fedrec deploy local


def deploy_local(
    data: Path | None = None,
    rounds: int | None = None,
    insecure: bool = False,
    out: Path | None = None,
    seed: int = 0,
    dp: bool = True,
    run_config: list[str] | None = None,
    timeout: float = 3600.0,
    node_policy: Path | None = None,
) -> dict[str, Any]:
    """SuperLink + one SuperNode per channel on 127.0.0.1, one federated run, then teardown.

    Every node holds ``node_policy`` (the built-in policy if None; with ``dp-required =
    false`` for a run without DP, since this command runs both sides), written to
    ``<out>/node-policy.toml``. Returns the run's ``results.json``. Every process is stopped
    on the way out, also on an error, Ctrl-C or SIGTERM.
    """
    import dataclasses

    from rich.console import Console

    from fedrec.shared.config import (
        FEDERATED_ITEM_TABLE,
        ConfigError,
        from_run_config,
        parse_value,
    )
    from fedrec.shared.hashlog import resolve_key_env
    from fedrec.shared.policy import NodePolicy, load_policy, write_policy
    from fedrec.simulations.simulate import (
        check_out_dir,
        dataset_channels,
        ensure_data,
        print_tables,
    )

    console = Console()
    t0 = time.perf_counter()
    out = (out or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    # a used folder holds registered keys and spent ledgers: never reused
    check_out_dir(out, resume=False, can_resume=False)
    resolve_key_env()  # an unusable FEDREC_RUN_KEY stops here, not in the ServerApp
    data_dir = ensure_data(data, "synthetic", seed, console)
    channels = tuple(dataset_channels(data_dir))
    run_dir = out / ("federated-dp" if dp else "federated-nodp")
    overrides: dict[str, Any] = {
        "seed": seed,
        "channels": ",".join(channels),
        "min-nodes": len(channels),
        "dp.enabled": dp,
    }
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    for item in run_config or []:
        key, _, value = item.partition("=")
        overrides[key.strip()] = parse_value(value.strip())
    overrides["run-dir"] = str(run_dir)
    overrides["data-dir"] = str(out / "data" / "coordinator")
    try:
        cfg = from_run_config(overrides)
        if cfg.model.item_table:
            raise ConfigError([FEDERATED_ITEM_TABLE])
    except ConfigError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from exc
    if insecure:
        console.print(
            "[yellow]WARNING: --insecure: no TLS and no SuperNode authentication. Allowed only "
            "because every process listens on 127.0.0.1; never use it across machines."
        )
    console.print(
        f"[bold]fedrec deploy local[/]: {data_dir}; channels {', '.join(channels)}; "
        f"{cfg.num_server_rounds} rounds; {'insecure' if insecure else 'TLS + SuperNode auth'}; "
        f"run dir {out}"
    )

    def show(line: str) -> None:
        if "[fedrec]" in line:
            console.print("  " + line.split("[fedrec]", 1)[1].strip())
        elif "ERROR" in line or "Traceback" in line or "WARNING" in line and "round" in line:
            console.print("  [red]" + line)

    policy = load_policy(node_policy) if node_policy is not None else NodePolicy()
    if not cfg.dp.enabled:
        policy = dataclasses.replace(policy, dp_required=False)
    out.mkdir(parents=True, exist_ok=True)
    write_policy(out / "node-policy.toml", policy)
    with (
        signals_interrupt(),
        LocalDeployment(
            out, channels, secure=not insecure, node_policy=out / "node-policy.toml"
        ) as d,
    ):
        coordinator, platform_dirs = split_dataset(data_dir, out / "data")
        console.print(f"  data split: coordinator gets catalogues only; {len(channels)} platforms")
        d.start_superlink()
        d.wait_superlink()
        console.print(f"  SuperLink up at {d.address} ({time.perf_counter() - t0:.1f}s)")
        submitted = cfg.to_run_config()
        if d.secure:
            for ch in channels:
                d.register(ch)
            if not cfg.node_channels:  # each channel served only by its own key's node id
                bound = ",".join(f"{d.node_ids[ch]}={ch}" for ch in channels)
                submitted["node-channels"] = bound
                console.print(f"  node-channels = {bound}")
        for ch in channels:
            d.start_node(ch, platform_dirs[ch])
        d.wait_online(len(channels))
        console.print(f"  {len(channels)} SuperNodes online ({time.perf_counter() - t0:.1f}s)")
        t = time.perf_counter()
        code, run_id = d.submit(submitted, on_line=show, timeout=timeout)
        if code != 0 or not (run_dir / "results.json").exists():
            raise DeployError(
                f"run {run_id} failed (flwr run exit {code}); logs in {out / 'logs'}:\n"
                + tail(out / "logs" / "flwr-run.log")
            )
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        # `flwr run` exits 0 also when the ServerApp failed: results.json says whether it did
        if RunFailed.RESULTS_KEY in results:
            refused = {
                c
                for st in results["round_status"].values()
                for c, s in st.items()
                if s == "refused"
            }
            dirs = "; ".join(f"{c}: {d.state_dir(c)}" for c in sorted(refused & set(channels)))
            where = (
                f" State dirs (each holds its platform's budget ledger): {dirs}." if dirs else ""
            )
            raise DeployError(
                f"run {run_id} failed: {results[RunFailed.RESULTS_KEY]}.{where} Logs in {out / 'logs'}"
            )
        console.print(f"  run {run_id} done in {time.perf_counter() - t:.1f}s")
    label = "federated (DP), deployment" if dp else "federated, deployment"
    print_tables(
        {
            ch: {label: {**r["metrics"], "epsilon": r["privacy"].get("epsilon")}}
            for ch, r in results["channels"].items()
        },
        console,
    )
    console.print(f"total {time.perf_counter() - t0:.1f}s; logs in {out / 'logs'}")
    return dict(results)
