"""``fedrec audit RUN_DIR`` on hand-made run directories."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from fedrec.audit.cli import register
from tests.test_audit_rundir import FAST_PLD, make_run_dir, rewrite_line


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command keeps typer from collapsing to a single command
    def noop() -> None: ...

    return app


def test_audit_writes_json_md_html_and_exits_zero(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, refuse={"finance": {3}})
    out = tmp_path / "report"

    # Execute
    result = CliRunner().invoke(
        _app(), ["audit", str(run), "--out", str(out), "--pld-interval", str(FAST_PLD)]
    )

    # Assert
    assert result.exit_code == 0, result.output
    assert "ACCOUNTING: consistent" in result.output
    assert "EGRESS: clean" in result.output
    assert "finance" in result.output and "2 / 1" in result.output
    report = json.loads((out / "audit.json").read_text())
    assert report["ok"] is True
    assert (out / "audit.md").read_text().startswith("# Privacy audit")
    html = (out / "audit.html").read_text()
    assert "data:image/png;base64," in html and "<style>" in html


def test_audit_defaults_to_run_dir_audit_and_exits_one_on_tampering(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    rewrite_line(run / "egress.jsonl", 0, {"bytes": 1})

    # Execute
    result = CliRunner().invoke(_app(), ["audit", str(run), "--pld-interval", str(FAST_PLD)])

    # Assert
    assert result.exit_code == 1
    assert "LOGS: TAMPERED" in result.output
    assert (run / "audit" / "audit.json").exists()


def test_audit_reads_empirical_file(tmp_path: Path) -> None:
    # Prepare: a one-run audit whose pre-registered guesses are all right (m = r = 200 → 4.19)
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    spec = {
        "canaries": {
            "method": "one-run",
            "scores": [float(i % 2) for i in range(200)],
            "included": [bool(i % 2) for i in range(200)],
            "k_pos": [100],
            "k_neg": [100],
            "channel": "finance",
        }
    }
    (tmp_path / "emp.json").write_text(json.dumps(spec))

    # Execute
    result = CliRunner().invoke(
        _app(),
        [
            "audit",
            str(run),
            "--empirical",
            str(tmp_path / "emp.json"),
            "--pld-interval",
            str(FAST_PLD),
        ],
    )

    # Assert: ε_LB 4.19 > the channel's ε 2.48 after one round: contradiction, exit 1
    assert result.exit_code == 1
    assert "EMPIRICAL: CONTRADICTS the guarantee" in result.output
