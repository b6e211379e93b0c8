"""The plain Flower command lines of a deployment, as an operator runs them on real machines.

Owns: the ``flower-superlink`` and ``flower-supernode`` argument lists (:func:`superlink_command`,
:func:`supernode_command`), a platform's ``--node-config`` string (:func:`node_config`), the
check of a SuperNode's ``--trusted-entities`` file (:func:`read_trusted_entities`) and the
``flwr`` CLI's connection file (:func:`write_flower_config`). ``fedrec deploy local`` and the
``fedrec deploy superlink`` / ``node`` wrappers use the same functions, so what a test checks
against the installed Flower is what an operator is shown.

Must not: start processes, or make up a flag the installed Flower lacks (a test runs each
executable's ``--help``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedrec.deploy.certs import Certs
from fedrec.deploy.flower import LOOPBACK, flower_bin, toml_value
from fedrec.shared.errors import InputError
from fedrec.shared.fsio import atomic_write_text

LINK_NAME = "fedrec-local"  # the SuperLink connection name in $FLWR_HOME/config.toml


def node_config(
    channel: str,
    data_dir: Path,
    state_dir: Path,
    torch_threads: int = 1,
    policy: Path | None = None,
) -> str:
    """The ``--node-config`` string of one platform's SuperNode (``policy``: the node's privacy
    policy file; without it the node holds the built-in policy).

    Flower splits it with a regular expression that does not know escapes, so a value may not
    contain ``"`` or ``\\`` (spaces are fine).
    """
    values = {"channel": channel, "data-dir": str(data_dir), "state-dir": str(state_dir)}
    if policy is not None:
        values["policy"] = str(policy)
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
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
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
    trusted_entities: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-supernode`` for one platform (``root_certificates=None``: ``--insecure``).

    ``trusted_entities``: the node runs only app bundles signed by one of these keys
    (:func:`read_trusted_entities`); ``None``: any bundle the SuperLink sends.
    """
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(trusted_entities)]
    cmd += ["--node-config", config, *extra]
    return cmd


def read_trusted_entities(path: Path) -> dict[str, str]:
    """The signers in a ``--trusted-entities`` file, checked as ``flower-supernode`` checks
    them at start-up (which otherwise exits with code 304 and a one-line reason).

    The file is YAML: Flower public-key id -> Ed25519 public key in OpenSSH format, e.g.
    ``fpk_0b6e…: "ssh-ed25519 AAAAC3Nza… reviewer"``. With it, flwr 1.42's SuperNode runs a
    run's bundle only if its verification records (which only Flower Hub supplies) hold a
    valid signature by one of these keys over the bundle's SHA-256 and signing time.

    Raises:
        InputError: every problem at once, with the file and the key id.
    """
    import yaml
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    fix = 'Fix: one line per signer, `fpk_<id>: "ssh-ed25519 <key> [comment]"`.'
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--trusted-entities {path}: cannot read it ({exc.strerror}).") from None
    except yaml.YAMLError as exc:
        raise InputError(f"--trusted-entities {path}: not YAML ({exc}). {fix}") from None
    if not isinstance(doc, dict) or not doc:
        raise InputError(f"--trusted-entities {path}: no signers in it. {fix}")
    problems = []
    for key_id, key in doc.items():
        try:
            public = load_ssh_public_key(str(key).encode("utf-8"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            problems.append(f"{key_id}: not an OpenSSH public key ({exc})")
            continue
        if not isinstance(public, ed25519.Ed25519PublicKey):
            problems.append(f"{key_id}: not an Ed25519 key (flower-supernode takes only these)")
    if problems:
        raise InputError(f"--trusted-entities {path}: " + "; ".join(problems) + f". {fix}")
    return {str(k): str(v) for k, v in doc.items()}


def write_flower_config(
    flwr_home: Path, address: str, root_certificates: Path | None, name: str = LINK_NAME
) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (where 1.42 keeps federations)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {toml_value(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {toml_value(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(root_certificates))}")
    path = flwr_home / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
