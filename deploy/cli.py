"""``fedrec deploy ...``: the typer commands (``certs``, ``split``, ``local``, ``superlink``,
``node``).

Owns: :func:`register` (adding the ``deploy`` command group to the ``fedrec`` app) and the thin
wrappers that print the plain Flower command an operator runs on a real machine and then
replace this process with it.

Must not: hold deployment logic (that lives in :mod:`fedrec.deploy.certs`,
:mod:`fedrec.deploy.commands` and :mod:`fedrec.deploy.local`), or allow ``--insecure``
anywhere but 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from fedrec.deploy.certs import TEST_CERT_NOTE, Certs, make_certs
from fedrec.deploy.commands import (
    node_config,
    read_trusted_entities,
    superlink_command,
    supernode_command,
)
from fedrec.deploy.flower import LOOPBACK
from fedrec.deploy.local import DeployError, deploy_local
from fedrec.deploy.split import check_out_dir, split_dataset
from fedrec.shared.policy import load_policy


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

    @deploy.command("split")
    def split_cmd(
        data: Path = typer.Argument(..., help="Dataset folder (with manifest.json) to split."),
        out: Path = typer.Option(..., help="New or empty folder for the split."),
    ) -> None:
        """Split a dataset for a deployment: OUT/coordinator (public catalogues only) and
        OUT/<channel> per platform (its own data only); prints what goes to which machine."""
        check_out_dir(out)
        coordinator, platforms = split_dataset(data, out)
        typer.echo(f"coordinator  {coordinator}")
        typer.echo("  copy to the SuperLink/ServerApp machine; run config data-dir = that copy")
        for ch, folder in platforms.items():
            typer.echo(f"{ch:<12} {folder}")
            typer.echo(
                f"  copy to {ch}'s machine only; `fedrec deploy node --channel {ch} "
                "--data <that copy> --state <a folder kept across runs>`"
            )
        typer.echo("Never copy a platform's folder anywhere but its own machine.")

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
        timeout: float = typer.Option(
            3600.0, min=1.0, help="Give up on the run after this many seconds."
        ),
        node_policy: Path = typer.Option(
            None, "--node-policy", help="Every node's privacy policy (TOML; default built-in)."
        ),
    ) -> None:
        """SuperLink + one SuperNode per channel on 127.0.0.1, one run, then stop everything."""
        try:
            deploy_local(data, rounds, insecure, out, seed, dp, run_config, timeout, node_policy)
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
        port: int = typer.Option(
            8000, min=1, max=65535, help="Fleet + Control + Runtime API port."
        ),
        database: Path = typer.Option(
            Path("superlink.db"),
            help="SuperLink state file (registered nodes, runs); survives restarts.",
        ),
        in_memory: bool = typer.Option(
            False, "--in-memory", help="No state file: a restart forgets nodes and runs."
        ),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (127.0.0.1 only)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command only."),
    ) -> None:
        """Print and run `flower-superlink` with TLS, SuperNode auth, its state in a file
        (registered keys and runs survive a restart), no runtime installs."""
        if insecure and host != LOOPBACK:
            raise typer.BadParameter(f"--insecure is allowed only with --host {LOOPBACK}")
        if not insecure and certs is None:
            raise typer.BadParameter("give --certs (see `fedrec deploy certs`) or --insecure")
        if insecure:
            typer.secho("WARNING: insecure SuperLink (loopback only)", fg="yellow", err=True)
        c = None if insecure else Certs(certs.resolve(), ())
        db = None if in_memory else database.resolve()
        _exec(superlink_command(port=port, certs=c, database=db, host=host), dry_run)

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
        port: int = typer.Option(
            9094, min=1, max=65535, help="Local Runtime API port (unique per node)."
        ),
        torch_threads: int = typer.Option(1, min=1, help="torch threads per ClientApp."),
        policy: Path = typer.Option(
            None,
            help="This platform's privacy policy (TOML; see README, 'The platform's privacy "
            "policy'). Without it the node holds the built-in policy.",
        ),
        trusted_entities: Path = typer.Option(
            None,
            help="YAML file of the app-bundle signers this node trusts (fpk_<id>: ssh-ed25519 "
            "key): the node then runs only bundles one of them signed on Flower Hub, and "
            "refuses every other run (see docs/deployment.md).",
        ),
        insecure: bool = typer.Option(False, "--insecure", help="No TLS (127.0.0.1 only)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command only."),
    ) -> None:
        """Print and run `flower-supernode` for one platform."""
        if insecure and not superlink.startswith(f"{LOOPBACK}:"):
            raise typer.BadParameter(f"--insecure is allowed only for {LOOPBACK}")
        if not insecure and (root_certificates is None or key is None):
            raise typer.BadParameter("give --root-certificates and --key, or --insecure")
        if trusted_entities is not None:
            signers = read_trusted_entities(trusted_entities)
            typer.secho(
                f"This node runs only app bundles signed by {', '.join(sorted(signers))}; "
                "a `flwr run` of a local folder is unsigned and will be refused.",
                fg="yellow",
                err=True,
            )
        if policy is not None:
            held = load_policy(policy)  # a bad file stops here, not in the first round
            typer.secho(f"node policy {held.source} (sha256 {held.digest()[:12]})", err=True)
        cmd = supernode_command(
            superlink=superlink,
            port=port,
            config=node_config(
                channel,
                data.resolve(),
                state.resolve(),
                torch_threads,
                None if policy is None else policy.resolve(),
            ),
            root_certificates=None if insecure else root_certificates.resolve(),
            private_key=None if insecure else key.resolve(),
            trusted_entities=None if trusted_entities is None else trusted_entities.resolve(),
        )
        _exec(cmd, dry_run)
