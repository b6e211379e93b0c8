"""Egress re-check and log integrity on hand-made logs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from fedrec.audit import egress
from fedrec.shared import hashlog
from tests.test_audit_rundir import (
    PARAM_SHAPES,
    REFUSED_CODE,
    _reply_entry,
    error_entry,
    make_run_dir,
    rewrite_line,
)


def _train_entry() -> dict:
    return _reply_entry(1, "finance", "train", 0, 1.0, 0.05, 20, 2.48)


def test_clean_replies_have_no_violations() -> None:
    # Prepare
    entries = [_train_entry(), _reply_entry(1, "finance", "evaluate", 0, 1.0, 0.05, 20, 2.48)]

    # Execute
    out = egress.audit_egress(entries, PARAM_SHAPES)

    # Assert
    assert out["violations"] == []
    assert out["channels"]["finance"]["replies"] == 2
    assert out["channels"]["finance"]["kinds"] == {"train": 1, "evaluate": 1}


def test_extra_record_is_a_violation() -> None:
    # Prepare
    e = _train_entry()
    e["records"]["user-ids"] = {"type": "config", "values": {"ids": "1,2,3"}}

    # Execute / Assert
    assert egress.check_entry(e, PARAM_SHAPES) == [
        "train reply: record 'user-ids' is not allowed "
        "(allowed: ['arrays', 'info', 'metrics', 'privacy'])"
    ]


def test_extra_metric_key_is_a_violation() -> None:
    # Prepare
    e = _train_entry()
    e["records"]["metrics"]["values"]["per-user-loss"] = 0.3

    # Execute / Assert
    assert egress.check_entry(e, PARAM_SHAPES) == [
        "train reply: key 'per-user-loss' in 'metrics' is not allowed"
    ]


def test_user_sized_array_is_a_violation() -> None:
    # Prepare: a (5000, 64) array (one row per user) that is not a model parameter
    e = _train_entry()
    e["records"]["arrays"]["arrays"]["user-embeddings"] = {
        "shape": [5000, 64],
        "dtype": "float32",
        "bytes": 5000 * 64 * 4 + 128,
    }

    # Execute / Assert
    assert egress.check_entry(e, PARAM_SHAPES) == [
        "train reply: array 'user-embeddings' with shape (5000, 64) is not a model parameter"
    ]


def test_missing_parameter_is_a_violation() -> None:
    # Prepare
    e = _train_entry()
    del e["records"]["arrays"]["arrays"]["user.bias"]

    # Execute / Assert
    assert egress.check_entry(e, PARAM_SHAPES) == [
        "train reply: model parameters missing from 'arrays': ['user.bias']"
    ]


def test_wrong_shape_list_values_raw_counts_and_hidden_bytes_are_violations() -> None:
    # Prepare
    e = _train_entry()
    arrays = e["records"]["arrays"]["arrays"]
    arrays["user.weight"]["shape"] = [5000, 3]
    arrays["user.bias"]["bytes"] += 10_000
    e["records"]["metrics"]["values"]["train-loss"] = [0.1, 0.2]
    e["records"]["metrics"]["values"]["num-examples"] = 4487

    # Execute
    problems = egress.check_entry(e, PARAM_SHAPES)

    # Assert
    assert len(problems) == 4
    assert any("'user.weight' has shape (5000, 3)" in p for p in problems)
    assert any("'user.bias' carries" in p for p in problems)
    assert any("train-loss is a list" in p for p in problems)
    assert any("num-examples = 4487 is not a multiple of 100" in p for p in problems)


def test_server_flagged_violation_is_reported() -> None:
    # Prepare
    e = _train_entry()
    e["violations"] = ["train reply: record 'x' is not allowed"]

    # Execute
    out = egress.audit_egress([e], PARAM_SHAPES)

    # Assert
    assert [(v["source"], v["problem"]) for v in out["violations"]] == [
        ("server", "train reply: record 'x' is not allowed")
    ]


def test_arrays_without_model_json_are_a_violation() -> None:
    assert egress.check_entry(_train_entry(), None) == [
        "train reply: 2 arrays in 'arrays' unchecked: model.json missing"
    ]


def _heads(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["log_heads"]


def test_intact_logs_verify(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)

    # Execute
    out = egress.verify_logs(run, _heads(run), channels=["finance"])

    # Assert
    assert {k: v["status"] for k, v in out.items()} == {
        "privacy-ledger.jsonl": "intact",
        "egress.jsonl": "intact",
        "nodes/finance/privacy-ledger.jsonl": "intact",
    }


def test_edited_value_is_detected(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    rewrite_line(run / "privacy-ledger.jsonl", 0, {"epsilon": 0.01})

    # Execute
    out = egress.verify_log(
        run / "privacy-ledger.jsonl",
        _heads(run)["privacy-ledger.jsonl"],
        name="privacy-ledger.jsonl",
    )

    # Assert
    assert out["status"] == "tampered"
    assert out["problem"] == "privacy-ledger.jsonl:1: entry modified (hash mismatch)"


def test_removed_line_is_detected(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    rewrite_line(run / "egress.jsonl", 1, None)

    # Execute
    out = egress.verify_log(run / "egress.jsonl", _heads(run)["egress.jsonl"], name="egress.jsonl")

    # Assert
    assert out["status"] == "tampered"
    assert "chain broken" in out["problem"]


def test_truncated_tail_is_detected_by_the_recorded_head(tmp_path: Path) -> None:
    # Prepare: drop the last line; the remaining chain is valid on its own
    run = make_run_dir(tmp_path, channels=("finance",), rounds=2)
    path = run / "privacy-ledger.jsonl"
    rewrite_line(path, -1, None)
    assert hashlog.verify(path).ok

    # Execute
    out = egress.verify_log(path, _heads(run)["privacy-ledger.jsonl"], name="privacy-ledger.jsonl")

    # Assert
    assert out["status"] == "tampered"
    assert "truncated or replaced" in out["problem"]


def test_removed_log_with_recorded_head_is_tampering(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1)
    (run / "egress.jsonl").unlink()

    # Execute
    out = egress.verify_logs(run, _heads(run))

    # Assert
    assert out["egress.jsonl"]["status"] == "tampered"


def test_log_without_recorded_head_is_unverified_tail(tmp_path: Path) -> None:
    # Prepare
    run = make_run_dir(tmp_path, channels=("finance",), rounds=1, results=False)

    # Execute
    out = egress.verify_logs(run, None)

    # Assert
    assert out["privacy-ledger.jsonl"]["status"] == "unverified-tail"


def test_entry_copy_is_not_mutated_by_checks() -> None:
    # Prepare
    e = _train_entry()
    before = copy.deepcopy(e)

    # Execute
    egress.audit_egress([e], PARAM_SHAPES)

    # Assert
    assert e == before


def test_error_replies_are_listed_not_violations() -> None:
    # Prepare: a budget refusal and a crash whose reason is free text
    entries = [error_entry(1, "finance", 0, REFUSED_CODE), error_entry(2, "finance", 0, 1)]

    # Execute
    out = egress.audit_egress(entries, PARAM_SHAPES)

    # Assert
    assert out["violations"] == []
    assert [(e["refused"], e["code"]) for e in out["errors"]] == [(True, 4030), (False, 1)]
    assert out["channels"]["finance"]["errors"] == 2


def test_error_reply_carrying_records_is_a_violation() -> None:
    # Prepare
    e = error_entry(1, "finance", 0, REFUSED_CODE)
    e["records"] = {"metrics": {"type": "metrics", "values": {"train-loss": 1.0}}}

    # Execute
    out = egress.audit_egress([e], PARAM_SHAPES)

    # Assert
    assert [v["problem"] for v in out["violations"]] == [
        "train error reply also carries records ['metrics']"
    ]


def test_values_allow_only_listed_scalar_keys_and_bucketed_counts() -> None:
    # Prepare: the bucket is 100; 4500 is a multiple, 4487 and inf are not
    keys = {"train-loss", "num-examples"}

    # Execute
    clean = egress.value_problems("train", "metrics", {"num-examples": 4500}, keys)
    found = egress.value_problems(
        "train",
        "metrics",
        {"user-id": 7, "train-loss": [0.1, 0.2], "num-examples": 4487},
        keys,
    )
    infinite = egress.value_problems("train", "metrics", {"num-examples": float("inf")}, keys)
    boolean = egress.value_problems("train", "metrics", {"num-examples": True}, keys)

    # Assert: sorted by key
    assert clean == []
    assert found == [
        "train reply: metrics.num-examples = 4487 is not a multiple of 100 (raw count sent)",
        "train reply: metrics.train-loss is a list, not a scalar (per-example values?)",
        "train reply: key 'user-id' in 'metrics' is not allowed",
    ]
    assert len(infinite) == 1 and len(boolean) == 1


def test_array_must_have_the_parameters_shape_and_bytes() -> None:
    # Prepare: a (4, 3) float32 parameter has 48 data bytes; the .npy header adds at most 4096
    meta = {"shape": [4, 3], "dtype": "float32", "bytes": 48 + 128}

    # Execute
    fine = egress.array_problem("train", "w", meta, [4, 3])
    wrong_rows = egress.array_problem("train", "w", {**meta, "shape": [5, 3]}, [4, 3])
    wrong_cols = egress.array_problem("train", "w", {**meta, "shape": [4, 2]}, [4, 3])
    padded = egress.array_problem("train", "w", {**meta, "bytes": 48 + 4097}, [4, 3])
    short = egress.array_problem("train", "w", {**meta, "bytes": 47}, [4, 3])
    no_meta = egress.array_problem("train", "w", None, [4, 3])

    # Assert
    assert fine is None
    assert wrong_rows == (
        "train reply: array 'w' has shape (5, 3), the model's is (4, 3) (first dimension differs)"
    )
    assert wrong_cols == "train reply: array 'w' has shape (4, 2), the model's is (4, 3)"
    assert padded is not None and "carries 4145 bytes" in padded and "make 48" in padded
    assert short is not None and "carries 47 bytes" in short
    assert no_meta == "train reply: array 'w' has no description"
