"""``fedrec audit RUN_DIR``: verdicts, a table per channel, and the report files.

Owns: the command line of the audit only; the checks live in :mod:`.report` and below.
Exit code 1 when a check fails (tampered or missing log, results.json removed, files that
disagree on the rounds or the spend, accounting inconsistency, budget exceeded, egress
violation, a node policy flag that fails (see :mod:`.nodes`), a node ledger not trusted, or an
empirical bound above the claimed ε); 2 when ``--out`` cannot be written (checked before any
work) or a ``--node-policy`` file is unreadable.

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
    """Add ``fedrec audit`` and ``fedrec audit-empirical`` to the fedrec app."""
    app.command("audit")(audit)
    app.command("audit-empirical")(audit_empirical)


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
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            envvar="FEDREC_RUN_KEY",
            help="The run key the server signed the log heads with (default $FEDREC_RUN_KEY).",
        ),
    ] = None,
    node_policy: Annotated[
        list[Path] | None,
        typer.Option(
            "--node-policy",
            help="A platform's node policy file (TOML), matched by digest to what its nodes "
            "reported; repeat for several platforms. A simulation's node-policy.toml is read "
            "without it.",
        ),
    ] = None,
) -> None:
    """Audit a run: accounting, budget, egress, log integrity; write audit.{json,md,html}."""
    from rich.console import Console
    from rich.table import Table

    from .document import fmt
    from .report import build_report, check_out_dir, write_report

    console = Console()
    out_dir = out if out is not None else run_dir / "audit"
    check_out_dir(out_dir)  # before the audit's work, not after it
    spec = None
    if empirical is not None:
        try:
            spec = json.loads(empirical.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"{empirical}: not readable JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise typer.BadParameter(f"{empirical}: must hold a JSON object of audits")
    from fedrec.shared.hashlog import load_key
    from fedrec.shared.policy import load_policy

    policies = [load_policy(p) for p in node_policy or ()]
    report = build_report(
        run_dir,
        spec,
        pld_interval=pld_interval,
        key=load_key(key) if key else None,
        node_policies=policies,
    )
    paths = write_report(report, out_dir)

    for v in report["verdicts"]:
        console.print(v["line"], style=STYLE[v["status"]], markup=False, highlight=False)
    acc, eg = report["accounting"], report["egress"]
    table = Table(title="Per channel")
    for col in (
        "channel",
        f"ε {acc['accountant'].upper()}",
        "ε worst case",
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
            fmt(r.get("epsilon_worst_case")),
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


def audit_empirical(
    epsilon: Annotated[
        float, typer.Option(min=1e-6, max=1e6, help="Claimed ε per channel of the DP run.")
    ] = 8.0,
    seeds: Annotated[int, typer.Option(min=1, help="Independent audits (seeds 0..N-1).")] = 1,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/audit-empirical-<time>).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="World to audit (default: the synthetic world, built if absent)."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default 5).")] = None,
    local_steps: Annotated[int | None, typer.Option(help="DP-SGD steps per round.")] = None,
    canaries: Annotated[
        int | None, typer.Option(help="Black-box canary users per channel (default by size).")
    ] = None,
    grad_canaries: Annotated[
        int, typer.Option(min=4, help="White-box gradient canaries per channel (half inserted).")
    ] = 200,
    max_users: Annotated[
        int | None,
        typer.Option(
            min=10,
            help="Keep only this many real users per channel (white-box power grows as the "
            "population shrinks).",
        ),
    ] = None,
    control_steps_factor: Annotated[
        int,
        typer.Option(min=1, help="The non-private control trains this many times the local steps."),
    ] = 4,
    fault_injection: Annotated[
        bool,
        typer.Option(
            "--fault-injection/--no-fault-injection",
            help="Also run with the DP noise OFF (FAULT INJECTION) to show the white-box audit "
            "catches it.",
        ),
    ] = True,
    reuse: Annotated[
        bool,
        typer.Option("--reuse", help="Keep finished runs and the audited dataset found in --out."),
    ] = False,
    run_config: Annotated[
        list[str] | None, typer.Option("--set", help="Any run-config key, e.g. model.dim=32")
    ] = None,
) -> None:
    """Run the pipeline on canaries (DP, non-private control, noise-off fault injection) and
    audit it empirically: one-run black box, white-box gradient canaries, loss MIA."""
    import time as _time

    from rich.console import Console
    from rich.table import Table

    from fedrec.shared.config import parse_value
    from fedrec.simulations.simulate import ensure_data

    from .document import fmt
    from .empirical import AuditPlan, run_empirical_audit

    console = Console()
    root = (out or Path("runs") / f"audit-empirical-{_time.strftime('%Y%m%d-%H%M%S')}").resolve()
    world = ensure_data(data, "synthetic", 0, console)
    overrides: dict[str, object] = {}
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    if local_steps is not None:
        overrides["train.local-steps"] = local_steps
    for item in run_config or []:
        key, _, value = item.partition("=")
        overrides[key.strip()] = parse_value(value.strip())
    runs = ("dp", "control", "noise-off") if fault_injection else ("dp", "control")
    ok = True
    for seed in range(seeds):
        folder = root / f"seed-{seed}" if seeds > 1 else root
        plan = AuditPlan(
            canaries=canaries, grad_canaries=grad_canaries, seed=seed, max_users=max_users
        )
        summary = run_empirical_audit(
            folder,
            world_dir=world,
            epsilon=epsilon,
            seed=seed,
            plan=plan,
            runs=runs,
            overrides=overrides,
            console=console,
            control_steps_factor=control_steps_factor,
            reuse=reuse,
        )
        table = Table(title=f"Empirical audit, seed {seed} ({summary['total_s']:.0f}s)")
        for col in ("run", "channel", "audit", "ε theory", "ε emp.", "ceiling", "AUC", "verdict"):
            table.add_column(col)
        for r in summary["rows"]:
            table.add_row(
                r["run"],
                str(r["channel"]),
                r["audit"],
                "-" if r["control"] else fmt(r["epsilon_theory"]),
                fmt(r["epsilon_empirical"]),
                fmt(r["ceiling"]),
                fmt(r["auc"]),
                str(r["status"]),
            )
        console.print(table)
        fi = summary.get("fault_injection")
        if fi:
            style = "green" if fi["caught"] else "bold red"
            console.print(
                "FAULT INJECTION (noise off, planned ε still reported): white-box ε estimate "
                + ", ".join(f"{ch} {fmt(e)}" for ch, e in fi["estimates"].items())
                + (" ≥ 2× the claim: CAUGHT" if fi["caught"] else ": NOT caught (audit too weak)"),
                style=style,
                markup=False,
            )
            ok = ok and fi["caught"]
        ok = ok and summary["ok"]
        console.print(f"report: {summary['report']['audit.md']}", markup=False)
    if not ok:
        raise typer.Exit(code=1)
