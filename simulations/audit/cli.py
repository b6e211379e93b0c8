"""``fedrec audit RUN_DIR``: verdicts, a table per channel, and the report files.

Owns: the command line of the audit only; the checks live in :mod:`.report` and below.
Exit code 1 when a check fails (tampered or missing log, accounting inconsistency, budget
exceeded, egress violation, or an empirical bound above the claimed ε).

Must not: import ``server/`` or ``client/``; do heavy imports at module import (``fedrec
--help`` stays instant).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def register(app: typer.Typer) -> None:
    """Add ``fedrec audit`` to the fedrec app."""
    app.command("audit")(audit)


def audit(
    run_dir: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, help="Run directory written by the server."),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: RUN_DIR/audit).")
    ] = None,
    empirical: Annotated[
        Path | None,
        typer.Option(
            "--empirical",
            exists=True,
            dir_okay=False,
            help="JSON file of empirical audits (name -> spec; see report.build_report).",
        ),
    ] = None,
    pld_interval: Annotated[
        float,
        typer.Option(
            "--pld-interval",
            min=1e-6,
            max=0.1,
            help="Discretisation of the PLD cross-check (coarser: faster, looser).",
        ),
    ] = 1e-4,
) -> None:
    """Audit a run: accounting, budget, egress, log integrity; write audit.{json,md,html}."""
    from rich.console import Console
    from rich.table import Table

    from .report import build_report, fmt, write_report

    console = Console()
    spec = None
    if empirical is not None:
        try:
            spec = json.loads(empirical.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"{empirical}: not readable JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise typer.BadParameter(f"{empirical}: must hold a JSON object of audits")
    report = build_report(run_dir, spec, pld_interval=pld_interval)
    paths = write_report(report, out if out is not None else run_dir / "audit")

    for v in report["verdicts"]:
        console.print(v["line"], style=STYLE[v["status"]], markup=False, highlight=False)
    acc, eg = report["accounting"], report["egress"]
    table = Table(title="Per channel")
    for col in (
        "channel",
        f"ε {acc['accountant'].upper()}",
        "ε cross-check (PLD)" + (", RDP" if acc["accountant"] != "rdp" else ""),
        "target",
        "trained / refused",
        "replies",
        "violations",
    ):
        table.add_column(col)
    for ch in sorted(set(acc["channels"]) | set(eg["channels"])):
        r = acc["channels"].get(ch, {})
        e = eg["channels"].get(ch, {})
        cross = fmt(r.get("epsilon_pld"))
        if acc["accountant"] != "rdp":
            cross += f", {fmt(r.get('epsilon_rdp'))}"
        table.add_row(
            ch,
            fmt(r.get("epsilon")),
            cross,
            fmt(acc["target_epsilon"], 2),
            f"{r.get('rounds_trained', 0)} / {len(r.get('rounds_refused', []))}",
            str(e.get("replies", 0)),
            str(e.get("violations", 0)),
        )
    console.print(table)
    comp = acc.get("composed")
    if comp and len(comp["channels"]) > 1:
        console.print(
            f"Composed worst case (one person on all channels): ε {fmt(comp['epsilon'])} "
            f"(naive sum {fmt(comp['naive_sum'])})",
            markup=False,
            highlight=False,
        )
    for name in ("audit.json", "audit.md", "audit.html"):
        console.print(f"{name}: {paths[name]}", markup=False, highlight=False)
    if not report["ok"]:
        raise typer.Exit(code=1)
