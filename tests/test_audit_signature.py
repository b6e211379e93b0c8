"""Signed log heads: with a run key the operator keeps outside the run directory, the server
signs the logs' heads (results.json at the end, heads.json after every checkpoint) and
``fedrec audit --key`` checks them, so that dropping ledger lines and re-chaining every hash,
which an unkeyed chain cannot detect, fails the audit, also for a run that stopped early."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrec.audit.report import build_report
from fedrec.server.rundir import HEADS, RunDir
from fedrec.shared import hashlog
from tests.test_audit_rundir import FAST_PLD, make_run_dir

KEY = b"k" * 32
OTHER = b"o" * 32


def _signature(run: Path, key: bytes | None) -> dict[str, str] | None:
    report = build_report(run, pld_interval=FAST_PLD, key=key)
    return next((v for v in report["verdicts"] if v["name"] == "signature"), None)


def _sign_results(run: Path, key: bytes) -> None:
    """What RunDir.results writes when FEDREC_RUN_KEY is set."""
    doc = json.loads((run / "results.json").read_text())
    doc["log_heads_signed"] = hashlog.sign_heads(key, doc["log_heads"])
    (run / "results.json").write_text(json.dumps(doc))


def _sign_heads_json(run: Path, round_: int) -> None:
    """heads.json as RunDir writes it before the checkpoint of ``round_``, signed with KEY."""
    heads = {n: hashlog.head(run / n) for n in ("privacy-ledger.jsonl", "egress.jsonl")}
    signed = hashlog.sign_heads(KEY, {**heads, "round": str(round_)})
    (run / HEADS).write_text(
        json.dumps({"round": round_, "log_heads": heads, "log_heads_signed": signed})
    )


def _key_in_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KEY in a file, named by FEDREC_RUN_KEY (with a trailing newline, as `openssl` writes)."""
    key_file = tmp_path / "run.key"
    key_file.write_text(KEY.decode() + "\n")
    monkeypatch.setenv(hashlog.KEY_ENV, str(key_file))


def _drop_last_round_and_rechain(run: Path, rounds: int) -> None:
    """The attack an unkeyed chain cannot see: remove a round's lines, recompute every hash,
    write the new heads wherever a head is recorded."""
    for path in [run / "privacy-ledger.jsonl", *sorted(run.glob("nodes/*/privacy-ledger.jsonl"))]:
        kept = [json.loads(x) for x in path.read_text().splitlines()]
        kept = [e for e in kept if e["round"] != rounds]
        path.unlink()
        for e in kept:
            hashlog.append(path, {k: v for k, v in e.items() if k not in ("hash", "prev")})
    results = run / "results.json"
    if results.exists():
        doc = json.loads(results.read_text())
        doc["log_heads"] = {n: hashlog.head(run / n) for n in doc["log_heads"]}
        results.write_text(json.dumps(doc))


def test_signed_heads_pass_with_the_key_and_warn_without_it(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path)
    _sign_results(run, KEY)

    # Execute / Assert
    assert _signature(run, KEY)["status"] == "pass"  # type: ignore[index]
    assert _signature(run, None)["status"] == "warn"  # type: ignore[index]
    assert _signature(run, OTHER)["status"] == "fail"  # type: ignore[index]


def test_rechained_logs_with_rewritten_heads_fail_under_the_key(tmp_path: Path) -> None:
    # Prepare: signed, then round 3 dropped everywhere and every hash recomputed
    run = make_run_dir(tmp_path, rounds=3)
    _sign_results(run, KEY)
    _drop_last_round_and_rechain(run, rounds=3)

    # Execute
    verdict = _signature(run, KEY)

    # Assert
    assert verdict is not None and verdict["status"] == "fail"
    assert "do not match the recorded heads" in verdict["line"]


def test_a_key_given_for_an_unsigned_run_fails(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)

    verdict = _signature(run, KEY)

    assert verdict is not None and verdict["status"] == "fail" and "ABSENT" in verdict["line"]
    assert _signature(run, None) is None  # nothing signed, no key: no verdict at all


def test_a_run_that_stopped_early_is_held_to_its_last_signed_checkpoint(tmp_path: Path) -> None:
    # Prepare: a run that stopped after round 3, whose server signed heads.json at round 3
    run = make_run_dir(tmp_path, rounds=3, results=False)
    _sign_heads_json(run, 3)
    intact = _signature(run, KEY)

    # Execute: round 3 removed from every ledger and re-chained
    _drop_last_round_and_rechain(run, rounds=3)

    # Assert: the logs no longer reach the signed head
    assert intact is not None and intact["status"] == "pass"
    verdict = _signature(run, KEY)
    assert verdict is not None and verdict["status"] == "fail"


def test_the_server_signs_heads_with_the_key_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    _key_in_env(tmp_path, monkeypatch)
    run = RunDir(tmp_path / "run")
    run.ledger({"round": 1, "channel": "finance", "status": "trained"})

    # Execute
    run.checkpoint(1, {"w": np.zeros(2, dtype=np.float32)})
    run.results({"rounds_completed": 1})

    # Assert: both records verify under the key, and only under it
    heads = json.loads((run.path / HEADS).read_text())
    results = json.loads((run.path / "results.json").read_text())
    body = {**heads["log_heads"], "round": "1"}
    assert hashlog.check_signed_heads(KEY, body, heads["log_heads_signed"])
    assert hashlog.check_signed_heads(KEY, results["log_heads"], results["log_heads_signed"])
    assert not hashlog.check_signed_heads(OTHER, results["log_heads"], results["log_heads_signed"])
    assert results["log_heads_signed"]["key_id"] == hashlog.key_id(KEY)


def test_an_unusable_key_stops_the_run_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = tmp_path / "short.key"
    short.write_text("too short")
    monkeypatch.setenv(hashlog.KEY_ENV, str(short))
    with pytest.raises(hashlog.RunKeyError, match="at least 32"):
        RunDir(tmp_path / "run")
    monkeypatch.setenv(hashlog.KEY_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(hashlog.RunKeyError, match="cannot read it"):
        RunDir(tmp_path / "run")


def test_fedrec_audit_key_checks_the_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    from fedrec.cli.main import run as fedrec

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.delenv(hashlog.KEY_ENV, raising=False)
    run = make_run_dir(tmp_path)
    _sign_results(run, KEY)
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_bytes(KEY)
    wrong.write_bytes(OTHER)

    # Execute
    good = fedrec(["audit", str(run), "--key", str(right), "--pld-interval", "0.01"])
    good_out = capsys.readouterr().out
    bad = fedrec(["audit", str(run), "--key", str(wrong), "--pld-interval", "0.01"])
    bad_out = capsys.readouterr().out

    # Assert
    assert good == 0 and "SIGNATURE: log heads signed with the given run key" in good_out
    assert bad == 1 and "SIGNATURE: INVALID" in bad_out


def test_an_older_signed_head_with_a_newer_checkpoint_fails(tmp_path: Path) -> None:
    # Prepare: a run cut after round 3, whose heads.json was swapped for a round-2 copy
    run = make_run_dir(tmp_path, rounds=3, results=False)
    _sign_heads_json(run, 2)

    # Execute
    verdict = _signature(run, KEY)

    # Assert: checkpoint 3 is newer than any head the server signed
    assert verdict is not None and verdict["status"] == "fail"


def test_a_keyed_run_has_signed_heads_from_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _key_in_env(tmp_path, monkeypatch)

    run = RunDir(tmp_path / "run")
    run.start({}, ["finance"], {})

    doc = json.loads((run.path / HEADS).read_text())
    assert doc["round"] == 0
    assert hashlog.check_signed_heads(
        KEY, {**doc["log_heads"], "round": "0"}, doc["log_heads_signed"]
    )
