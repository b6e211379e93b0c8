"""``fedrec node``: a platform operator's commands on its node's state dir.

Owns: ``fedrec node policy`` (print the policy a node holds, built-in default or a file) and
``fedrec node reset-ledger`` (the explicit, logged reset of a node's privacy ledger, the only
way back to an empty ledger: :func:`fedrec.client.ledger.reset`), ``fedrec node check-ledger``.

Must not: touch a ledger without the operator's explicit command and reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    node = typer.Typer(help="A platform operator's commands on its node: policy and ledger.")
    app.add_typer(node, name="node")

    def _key(policy: Path | None) -> bytes | None:
        from fedrec.shared.hashlog import load_key
        from fedrec.shared.policy import NodePolicy, load_policy

        held = load_policy(policy) if policy is not None else NodePolicy()
        return load_key(held.ledger_key) if held.ledger_key else None

    @node.command("policy")
    def show_policy(
        policy: Path = typer.Option(None, "--policy", help="The node's policy file (TOML)."),
    ) -> None:
        """Print the policy a node holds (the built-in default without --policy), as TOML."""
        from fedrec.shared.policy import NodePolicy, load_policy, to_toml

        typer.echo(to_toml(load_policy(policy) if policy is not None else NodePolicy()), nl=False)

    @node.command("check-ledger")
    def check_ledger(
        state_dir: Path = typer.Option(..., "--state-dir", help="The node's state dir."),
        channel: str = typer.Option(..., "--channel", help="The channel the node serves."),
        policy: Path = typer.Option(None, "--policy", help="The node's policy (its ledger-key)."),
    ) -> None:
        """Check the node's ledger as the node does before it trains (exit 2 if refused)."""
        from fedrec.client.ledger import LEDGER, NodeLedger

        ledger = NodeLedger(state_dir / LEDGER, channel, _key(policy))
        lines = ledger.entries()  # raises LedgerError (exit 2) when it cannot be trusted
        found = ledger.last_history()
        spent = sum(n for _, _, n in found[1]) if found else 0
        typer.echo(
            json.dumps({"ledger": str(ledger.path), "lines": len(lines), "steps": spent}, indent=1)
        )

    @node.command("reset-ledger")
    def reset_ledger(
        state_dir: Path = typer.Option(..., "--state-dir", help="The node's state dir."),
        channel: str = typer.Option(..., "--channel", help="The channel the node serves."),
        reason: str = typer.Option(..., "--reason", help="Why (recorded; the audit reports it)."),
        policy: Path = typer.Option(None, "--policy", help="The node's policy (its ledger-key)."),
        yes: bool = typer.Option(False, "--yes", help="Confirm: ε starts again from 0."),
    ) -> None:
        """Start the node's privacy ledger again from ε = 0, keeping the old files and
        recording the reset and its reason as the new ledger's first line."""
        from fedrec.client.ledger import reset
        from fedrec.shared.errors import InputError

        if not yes:
            raise InputError(
                "a ledger reset lets this node's users be trained on again from ε = 0; the "
                "operator answers for it. Repeat with --yes to confirm."
            )
        path = reset(state_dir, channel, reason, _key(policy))
        typer.echo(f"reset: new ledger {path}; the old files are kept beside it (*.reset-*)")
