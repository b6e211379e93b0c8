"""``fedrec audit RUN_DIR`` on hand-made run directories."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedrec.audit.cli import register
from fedrec.cli.main import run
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


# --- --out checked before any work ------------------------------------------------------------


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the audit itself fail loudly: an --out error must come before it."""

    def build_report(*args: object, **kwargs: object) -> None:
        raise AssertionError("the audit ran before --out was checked")

    monkeypatch.setattr("fedrec.audit.report.build_report", build_report)


def test_out_that_is_a_file_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run_dir = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    out = tmp_path / "report.html"
    out.write_text("")
    _no_work(monkeypatch)

    # Execute
    code = run(["audit", str(run_dir), "--out", str(out)])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert f"--out {out} is a file, not a folder" in " ".join(err.split())
    assert "Traceback" not in err


def test_out_below_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run_dir = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    (tmp_path / "file").write_text("")
    _no_work(monkeypatch)

    # Execute
    code = run(["audit", str(run_dir), "--out", str(tmp_path / "file" / "audit")])

    # Assert
    assert code == 2
    assert f"cannot be created, {tmp_path / 'file'} is a file" in " ".join(
        capsys.readouterr().err.split()
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("below", [False, True])
def test_out_in_a_read_only_folder_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    below: bool,
) -> None:
    # Prepare: the folder itself, or the parent it would be created in, is read-only
    run_dir = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    _no_work(monkeypatch)

    # Execute
    try:
        code = run(["audit", str(run_dir), "--out", str(locked / "new" if below else locked)])
    finally:
        locked.chmod(0o755)

    # Assert
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_out_on_a_read_only_file_system_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: creating any file fails as on a read-only mount (EROFS)
    run_dir = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    _no_work(monkeypatch)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("fedrec.shared.fsio.tempfile.TemporaryFile", read_only)

    # Execute
    code = run(["audit", str(run_dir), "--out", str(tmp_path / "out")])

    # Assert
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert f"--out {tmp_path / 'out'}: not writable (its nearest existing parent" in err
    assert "Read-only file system" in err


def test_audit_of_a_run_whose_results_were_removed_exits_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    run_dir = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    (run_dir / "results.json").unlink()

    # Execute
    code = run(["audit", str(run_dir), "--pld-interval", str(FAST_PLD)])

    # Assert
    assert code == 1
    assert "RESULTS: MISSING" in capsys.readouterr().out
