"""``fedrec deploy``: run fedrec on Flower's deployment runtime, one process per platform.

Owns: test certificates (``fedrec deploy certs``), splitting a dataset so that every platform's
process can reach only its own interactions, starting and stopping a local SuperLink plus one
SuperNode per channel (``fedrec deploy local``), and thin wrappers that print and run the plain
Flower commands an operator uses on real machines (``fedrec deploy superlink`` / ``node``).

Everything here drives Flower's own executables (``flower-superlink``, ``flower-supernode``,
``flwr``) exactly as docs/deployment.md shows them; nothing is home-made on the wire. Every
process started here carries ``FEDREC_DEPLOYMENT=<run dir>`` in its environment, so teardown
finds and stops all of them (their ``flower-superexec``, ``flwr-serverapp`` and
``flwr-clientapp`` children included), also after a crash or Ctrl-C.

Must not: hold training logic the apps need, import ``server/`` or ``client/`` at module level,
listen anywhere but 127.0.0.1 without TLS.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from fedrec.deploy.flower import app_project, free_ports, processes_with_env, write_overrides

DEPLOYMENT_ENV = "FEDREC_DEPLOYMENT"  # marks every process of one deployment (for teardown)
LOOPBACK = "127.0.0.1"
LINK_NAME = "fedrec-local"  # the SuperLink connection name in $FLWR_HOME/config.toml
TEST_CERT_NOTE = (
    "These certificates and keys are for local testing only: the CA key sits next to the "
    "certificates, unencrypted. Use your organisation's PKI for real deployments."
)
# flwr's SuperExec polls its SuperNode/SuperLink for work every 1 s by default
# (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, 0.01-60 s). Measured here: 0.2 s took idle CPU from 6 %
# to 17 % of a core (3 nodes) with no measurable gain per round, so Flower's default stays.
SUPEREXEC_POLL: str | None = None


class DeployError(RuntimeError):
    """A deployment step failed; the message names the process and the tail of its log."""


# ---------------------------------------------------------------------------------------------
# Certificates (testing only)


@dataclass(frozen=True)
class Certs:
    """Paths of a test PKI: CA, SuperLink server certificate, one key pair per channel."""

    root: Path
    channels: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, channel: str) -> Path:
        """OpenSSH ECDSA P-384 private key (``--auth-supernode-private-key``)."""
        return self.root / "nodes" / channel

    def node_pub(self, channel: str) -> Path:
        """OpenSSH public key (``flwr supernode register``)."""
        return self.root / "nodes" / f"{channel}.pub"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certs(
    out_dir: Path,
    channels: Sequence[str],
    *,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 30,
) -> Certs:
    """Create a test CA, a SuperLink certificate for ``hosts`` and a node key pair per channel.

    The server certificate names every host as a subjectAltName (IP or DNS), which TLS
    clients check (the CN is ignored). Node keys are ECDSA on NIST P-384 in OpenSSH format,
    the format ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
    register`` read. Existing node keys are kept (a platform's identity must not change
    under it); the CA and server certificate are rewritten.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Certs(Path(out_dir).resolve(), tuple(channels))
    certs.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec test PKI"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fedrec test CA"))
        .issuer_name(name("fedrec test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    _write_private(
        certs.ca_key,
        ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain),
    )
    certs.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(
        certs.server_key,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain),
    )
    certs.server_cert.write_bytes(server_cert.public_bytes(pem))
    for channel in channels:
        if certs.node_key(channel).exists() and certs.node_pub(channel).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            certs.node_key(channel),
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        certs.node_pub(channel).write_bytes(pub + f" fedrec-{channel}\n".encode())
    (certs.root / "README.txt").write_text(TEST_CERT_NOTE + "\n", encoding="utf-8")
    return certs


# ---------------------------------------------------------------------------------------------
# Datasets: one folder per platform, and a catalogue-only folder for the coordinator


def _manifest(name: str, channels: dict[str, dict[str, str]], source: dict[str, Any]) -> str:
    from fedrec.shared.datasets import FORMAT

    doc = {
        "format": FORMAT,
        "name": name,
        "channels": channels,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def split_dataset(data_dir: Path, out_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Copy ``data_dir`` into one folder per channel plus a catalogue-only coordinator folder.

    ``<out>/<channel>/`` holds that channel's ``items.csv`` and ``interactions.csv`` and a
    manifest naming that channel only: the platform's process is given this folder and no
    other, so another platform's interactions are not reachable from it. ``<out>/coordinator/``
    holds every channel's public ``items.csv`` and no interactions at all (the manifest still
    names where they would be: the format requires the key; the loaders read them only when
    asked for interactions). ``ground_truth/`` is never copied. Files are copied byte for byte,
    so the item-matrix fingerprints the server computes match what the nodes check.

    Returns:
        The coordinator folder and channel -> platform folder.
    """
    from fedrec.shared.datasets import atomic_dir, load_manifest

    manifest = load_manifest(data_dir)
    out_dir = Path(out_dir).resolve()
    entries = {
        ch: {"catalogue": f"{ch}/items.csv", "interactions": f"{ch}/interactions.csv"}
        for ch in manifest.channels
    }
    nodes: dict[str, Path] = {}
    for ch, files in manifest.channels.items():
        with atomic_dir(out_dir / ch) as tmp:
            (tmp / ch).mkdir()
            shutil.copyfile(files.catalogue, tmp / ch / "items.csv")
            shutil.copyfile(files.interactions, tmp / ch / "interactions.csv")
            (tmp / "manifest.json").write_text(
                _manifest(
                    f"{manifest.name}:{ch}",
                    {ch: entries[ch]},
                    {"split-from": manifest.name, "channel": ch},
                ),
                encoding="utf-8",
            )
        nodes[ch] = out_dir / ch
    with atomic_dir(out_dir / "coordinator") as tmp:
        for ch, files in manifest.channels.items():
            (tmp / ch).mkdir()
            shutil.copyfile(files.catalogue, tmp / ch / "items.csv")
        (tmp / "manifest.json").write_text(
            _manifest(
                f"{manifest.name}:catalogues",
                entries,
                {"split-from": manifest.name, "catalogues-only": True},
            ),
            encoding="utf-8",
        )
    return out_dir / "coordinator", nodes


# ---------------------------------------------------------------------------------------------
# Processes


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node_config(channel: str, data_dir: Path, state_dir: Path, torch_threads: int = 1) -> str:
    """The ``--node-config`` string of one platform's SuperNode.

    Flower splits it with a regular expression that does not know escapes, so a value may not
    contain ``"`` or ``\\`` (spaces are fine).
    """
    values = {"channel": channel, "data-dir": str(data_dir), "state-dir": str(state_dir)}
    bad = {k: v for k, v in values.items() if '"' in v or "\\" in v}
    if bad:
        raise ValueError(f"--node-config values cannot contain '\"' or '\\'. Found {bad}.")
    body = " ".join(f'{k}="{v}"' for k, v in values.items())
    return f"{body} torch-threads={int(torch_threads)}"


def superlink_command(
    *, port: int, certs: Certs | None, database: Path | None, host: str = LOOPBACK
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs=None``: insecure).

    ``--disable-runtime-dependency-installation``: otherwise the SuperLink ``uv sync``s the
    app's dependencies (torch included) into a fresh environment for every run.
    """
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port)]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
        ]
    if database is not None:
        cmd += ["--database", str(database)]
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def supernode_command(
    *,
    superlink: str,
    port: int,
    config: str,
    root_certificates: Path | None,
    private_key: Path | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-supernode`` for one platform (``root_certificates=None``: ``--insecure``)."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--node-config", config, *extra]
    return cmd


def write_flower_config(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = LINK_NAME
) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (where 1.42 keeps federations)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {_toml_str(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {_toml_str(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(str(root_certificates))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def terminate(pids: Sequence[int], grace: float = 8.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; returns the PIDs that survived both."""
    left = list(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
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


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]

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
    stops every process it started, and every process that inherited the marker.

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
        write_flower_config(self.home("cli"), self.address, self.ca)

    # -- environment ---------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.link_port}"

    @property
    def ca(self) -> Path | None:
        return self.certs.ca_cert if self.certs is not None else None

    def home(self, who: str) -> Path:
        path = self.root / "flwr" / who
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, who: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.home(who)),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )
        env[DEPLOYMENT_ENV] = str(self.root)
        if self.superexec_poll:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = self.superexec_poll
        return env

    def state_dir(self, channel: str) -> Path:
        return self.root / "nodes" / channel

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], who: str, cwd: Path | None = None) -> Proc:
        old = self.procs.get(name)
        if old is not None and old.running():
            raise DeployError(f"{name} is already running (pid {old.pid})")
        log = self.root / "logs" / f"{name}.log"
        with log.open("ab") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd,
                cwd=cwd or self.root,
                env=self.env(who),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )
        proc = Proc(name, popen, log, cmd)
        self.procs[name] = proc
        return proc

    def start_superlink(self, *, database: bool = True) -> Proc:
        cmd = superlink_command(
            port=self.link_port,
            certs=self.certs,
            database=self.root / "superlink.db" if database else None,
        )
        return self._spawn("superlink", cmd, "superlink")

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
        return subprocess.run(
            [_bin("flwr"), *args],
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

    def start_node(
        self,
        channel: str,
        data_dir: Path,
        *,
        name: str | None = None,
        root_certificates: Path | None | bool = True,
        private_key: Path | None | bool = True,
        extra: Sequence[str] = (),
    ) -> Proc:
        """Start ``flower-supernode`` for ``channel``; ``True`` means this deployment's CA/key.

        The state-dir (privacy ledger, item cache) is ``nodes/<channel>`` and the Runtime API
        port is chosen once per name, so a restarted node is the same platform on the same
        port with the same ledger.
        """
        name = name or f"node-{channel}"
        if root_certificates is True:
            root_certificates = self.ca
        if private_key is True:
            private_key = self.certs.node_key(channel) if self.certs else None
        port = self.node_ports.setdefault(name, free_ports(1)[0])
        cmd = supernode_command(
            superlink=self.address,
            port=port,
            config=node_config(channel, data_dir, self.state_dir(channel)),
            root_certificates=root_certificates or None,
            private_key=private_key or None,
            extra=extra,
        )
        # A ClientApp's cwd is its SuperNode's: keep it inside the platform's own folder.
        self.state_dir(channel).mkdir(parents=True, exist_ok=True)
        return self._spawn(name, cmd, name, cwd=self.state_dir(channel))

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

    def node_status(self, channel: str) -> str:
        """``registered``, ``online`` or ``offline`` as the SuperLink sees ``channel``'s node."""
        want = str(self.node_ids[channel])
        return next((str(n["status"]) for n in self.nodes() if str(n["node-id"]) == want), "")

    def restart_node(self, channel: str, data_dir: Path, timeout: float = 120.0) -> Proc:
        """Start a crashed platform again, once the SuperLink has noticed it is gone.

        After a crash (no goodbye) the SuperLink keeps the node online until its heartbeat
        lapses (2 x 30 s in flwr 1.42); activating the same key before that is refused
        ("[code: 2004] Failed to activate SuperNode", exit code 305).
        """
        deadline = time.monotonic() + timeout
        while self.node_status(channel) == "online":
            if time.monotonic() > deadline:
                raise DeployError(f"{channel}'s node still online after {timeout:.0f}s")
            time.sleep(1.0)
        return self.start_node(channel, data_dir)

    def crash(self, name: str) -> None:
        """SIGKILL a process and everything it started, as if its machine died.

        Kills the process group (each process here leads its own session) and then any process
        left with that process's ``FLWR_HOME`` (a child that moved to a new session), so no
        orphaned ClientApp finishes a round after its node is gone.
        """
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(timeout=15)
        who = "superlink" if name == "superlink" else name
        left = [
            pid
            for pid in processes_with_env("FLWR_HOME", str(self.home(who)))
            if pid in processes_with_env(DEPLOYMENT_ENV, str(self.root))
        ]
        terminate(left, grace=0.5)

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one process (SIGTERM: graceful; SIGKILL: a crash) and wait for it."""
        proc = self.procs[name]
        if proc.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)

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
            _bin("flwr"),
            "run",
            str(app_project(self.root / "app")),
            LINK_NAME,
            "--run-config",
            str(overrides),
            "--stream",
        ]
        log = self.root / "logs" / f"{log_name}.log"
        run_id: int | None = None
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
            self.procs[log_name] = Proc(log_name, proc, log, cmd)  # type: ignore[arg-type]
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
                if run_id is not None and self.procs["superlink"].running():
                    with contextlib.suppress(Exception):
                        self.flwr("stop", str(run_id), LINK_NAME, timeout=20)
                terminate([proc.pid], grace=3)
                raise
        return proc.returncode, run_id

    def close(self) -> list[int]:
        """Stop everything: nodes first, then the SuperLink, then any process still carrying
        this deployment's marker (superexecs, app processes). Returns PIDs that survived."""
        order = sorted(self.procs.values(), key=lambda p: p.name == "superlink")
        for proc in order:
            if proc.running():
                terminate([proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=1)
        left = processes_with_env(DEPLOYMENT_ENV, str(self.root))
        return terminate(left, grace=5) if left else []

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks tear down processes."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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
) -> dict[str, Any]:
    """SuperLink + one SuperNode per channel on 127.0.0.1, one federated run, then teardown.

    Returns the run's ``results.json``. Every process is stopped on the way out, also on an
    error, Ctrl-C or SIGTERM.
    """
    from rich.console import Console

    from fedrec.shared.config import ConfigError, from_run_config, parse_value
    from fedrec.simulations.simulate import dataset_channels, ensure_data, print_tables

    console = Console()
    t0 = time.perf_counter()
    out = (out or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
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

    with sigterm_as_interrupt(), LocalDeployment(out, channels, secure=not insecure) as d:
        coordinator, platform_dirs = split_dataset(data_dir, out / "data")
        console.print(f"  data split: coordinator gets catalogues only; {len(channels)} platforms")
        d.start_superlink()
        d.wait_superlink()
        console.print(f"  SuperLink up at {d.address} ({time.perf_counter() - t0:.1f}s)")
        if d.secure:
            for ch in channels:
                d.register(ch)
        for ch in channels:
            d.start_node(ch, platform_dirs[ch])
        d.wait_online(len(channels))
        console.print(f"  {len(channels)} SuperNodes online ({time.perf_counter() - t0:.1f}s)")
        t = time.perf_counter()
        code, run_id = d.submit(cfg.to_run_config(), on_line=show, timeout=timeout)
        if code != 0 or not (run_dir / "results.json").exists():
            raise DeployError(
                f"run {run_id} failed (flwr run exit {code}); logs in {out / 'logs'}:\n"
                + tail(out / "logs" / "flwr-run.log")
            )
        console.print(f"  run {run_id} done in {time.perf_counter() - t:.1f}s")
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------------------------------------
# Command line


def _exec(cmd: list[str], dry_run: bool) -> None:
    """Print the plain Flower command, then replace this process with it."""
    import shlex

    typer.echo(" ".join(shlex.quote(c) for c in cmd))
    if dry_run:
        return
    env = dict(os.environ)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    os.execve(cmd[0], cmd, env)


def register(app: typer.Typer) -> None:
    deploy = typer.Typer(
        help="Run fedrec on Flower's deployment runtime: one process per platform.",
        no_args_is_help=True,
    )
    app.add_typer(deploy, name="deploy")

    @deploy.command("certs")
    def certs_cmd(
        out_dir: Path = typer.Argument(..., help="Folder for the CA, server cert and node keys."),
        channels: str = typer.Option(
            "ecommerce,finance,social", help="Comma-separated channels: one node key pair each."
        ),
        hosts: str = typer.Option(
            "127.0.0.1,localhost", help="SuperLink addresses the server certificate names."
        ),
        days: int = typer.Option(30, min=1, help="Validity of the certificates."),
    ) -> None:
        """Create a TEST CA, SuperLink TLS certificate and one SuperNode key pair per channel."""
        chans = [c.strip() for c in channels.split(",") if c.strip()]
        certs = make_certs(out_dir, chans, hosts=[h.strip() for h in hosts.split(",")], days=days)
        typer.secho(f"WARNING: {TEST_CERT_NOTE}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"CA certificate      {certs.ca_cert}")
        typer.echo(f"SuperLink cert/key  {certs.server_cert} {certs.server_key}")
        for ch in chans:
            typer.echo(f"node {ch:<14} {certs.node_key(ch)} (+ .pub to register)")

    @deploy.command("local")
    def local_cmd(
        data: Path = typer.Option(
            None, help="Dataset directory (default: worlds/synthetic, built if absent)."
        ),
        rounds: int = typer.Option(None, help="Federated rounds (default from pyproject)."),
        insecure: bool = typer.Option(
            False, "--insecure", help="No TLS, no SuperNode auth (127.0.0.1 only; warns)."
        ),
        out: Path = typer.Option(None, help="Run directory (default runs/deploy-<time>)."),
        seed: int = typer.Option(0),
        dp: bool = typer.Option(True, "--dp/--no-dp", help="DP-SGD on the clients."),
        run_config: list[str] = typer.Option(
            None, "--set", help="Any run-config key, e.g. --set train.local-steps=30"
        ),
        timeout: float = typer.Option(3600.0, help="Give up on the run after this many seconds."),
    ) -> None:
        """SuperLink + one SuperNode per channel on 127.0.0.1, one run, then stop everything."""
        try:
            deploy_local(data, rounds, insecure, out, seed, dp, run_config, timeout)
        except DeployError as exc:
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from exc
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: everything was stopped
            typer.secho("interrupted: run stopped, every process shut down", err=True)
            raise typer.Exit(130) from exc

    @deploy.command("superlink")
    def superlink_cmd(
        certs: Path = typer.Option(None, help="Folder from `fedrec deploy certs`."),
        host: str = typer.Option(LOOPBACK, help="Address to listen on."),
        port: int = typer.Option(8000, help="Fleet + Control + Runtime API port."),
        database: Path = typer.Option(
            None, help="SuperLink state file (registered nodes, runs); survives restarts."
        ),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (127.0.0.1 only)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command only."),
    ) -> None:
        """Print and run `flower-superlink` with TLS, SuperNode auth, no runtime installs."""
        if insecure and host != LOOPBACK:
            raise typer.BadParameter(f"--insecure is allowed only with --host {LOOPBACK}")
        if not insecure and certs is None:
            raise typer.BadParameter("give --certs (see `fedrec deploy certs`) or --insecure")
        if insecure:
            typer.secho("WARNING: insecure SuperLink (loopback only)", fg="yellow", err=True)
        c = None if insecure else Certs(certs.resolve(), ())
        _exec(superlink_command(port=port, certs=c, database=database, host=host), dry_run)

    @deploy.command("node")
    def node_cmd(
        channel: str = typer.Option(..., help="The platform this node serves."),
        data: Path = typer.Option(..., help="This platform's dataset folder (its data only)."),
        state: Path = typer.Option(
            ..., help="Node-local state: privacy ledger, item cache. Keep it across restarts."
        ),
        superlink: str = typer.Option(f"{LOOPBACK}:8000", help="SuperLink host:port."),
        root_certificates: Path = typer.Option(None, help="CA certificate (ca.crt)."),
        key: Path = typer.Option(None, help="This node's OpenSSH private key (auth)."),
        port: int = typer.Option(9094, help="Local Runtime API port (unique per node)."),
        torch_threads: int = typer.Option(1, min=1, help="torch threads per ClientApp."),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (127.0.0.1 only)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command only."),
    ) -> None:
        """Print and run `flower-supernode` for one platform."""
        if insecure and not superlink.startswith(f"{LOOPBACK}:"):
            raise typer.BadParameter(f"--insecure is allowed only for {LOOPBACK}")
        if not insecure and (root_certificates is None or key is None):
            raise typer.BadParameter("give --root-certificates and --key, or --insecure")
        cmd = supernode_command(
            superlink=superlink,
            port=port,
            config=node_config(channel, data.resolve(), state.resolve(), torch_threads),
            root_certificates=None if insecure else root_certificates.resolve(),
            private_key=None if insecure else key.resolve(),
        )
        _exec(cmd, dry_run)
