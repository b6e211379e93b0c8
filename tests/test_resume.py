"""A simulate run stopped after its first checkpoint is continued with ``--resume``: it
finishes from that checkpoint, its ledgers continue (ε keeps counting from the spent rounds),
FedAdam's moments continue from the saved server state, the audit passes it, and resuming a
finished run rewrites nothing.

End-to-end: the real ``fedrec`` command on a tiny world and a tiny encoder."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import save_tiny_bert, stop_when, tiny_simulate, write_small_world

FEDREC = str(Path(sys.executable).with_name("fedrec"))
pytestmark = pytest.mark.e2e


def _simulate(world: Path, bert: Path, out: Path, *extra: str) -> list[str]:
    # fedadam: a strategy with server state to continue
    return tiny_simulate(world, bert, out, 3, "--strategy", "fedadam", *extra)


def test_a_stopped_run_resumes_from_its_checkpoint_and_passes_the_audit(tmp_path: Path) -> None:
    # Prepare
    world = write_small_world(tmp_path / "world", people=100)
    bert = save_tiny_bert(tmp_path / "bert")
    out = tmp_path / "out"
    run_dir = out / "federated-dp"
    env = {**os.environ, "FEDREC_CACHE_DIR": str(tmp_path / "cache")}

    # Execute 1: Ctrl-C once the first round's checkpoint is on disk
    checkpoint = run_dir / "checkpoints" / "round-0001.safetensors"
    code = stop_when(
        _simulate(world, bert, out), env, checkpoint.exists, signal.SIGINT, "first checkpoint"
    )
    stopped_ledger = (run_dir / "privacy-ledger.jsonl").read_text().splitlines()

    # Assert 1: stopped, marked incomplete, a second plain run into it is refused
    assert code != 0
    assert (run_dir / "INCOMPLETE").exists() and not (run_dir / "results.json").exists()
    refused = subprocess.run(_simulate(world, bert, out), capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--resume" in refused.stdout + refused.stderr

    # Execute 2: resume
    resumed = subprocess.run(
        _simulate(world, bert, out, "--resume"), capture_output=True, text=True, env=env
    )

    # Assert 2: finished from the checkpoint, the ledger continued, the audit passes
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_after"] >= 1 and results["rounds_completed"] == 3
    after = results["resumed_after"]
    log = (run_dir / "flower.log").read_text(errors="replace")
    assert f"fedadam continues its state of round {after}" in log, log[-3000:]
    assert (run_dir / "server-state" / "round-0003.safetensors").exists()
    assert not (run_dir / "INCOMPLETE").exists() and not (out / "INCOMPLETE").exists()
    ledger = (run_dir / "privacy-ledger.jsonl").read_text().splitlines()
    assert ledger[: len(stopped_ledger)] == stopped_ledger and len(ledger) > len(stopped_ledger)
    audit = subprocess.run(
        [FEDREC, "audit", str(run_dir), "--out", str(tmp_path / "audit")],
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 0, audit.stdout[-3000:]

    # Execute 3 / Assert 3: resuming a finished run rewrites nothing
    before = hashlib.sha256((run_dir / "results.json").read_bytes()).hexdigest()
    again = subprocess.run(
        _simulate(world, bert, out, "--resume"), capture_output=True, text=True, env=env
    )
    assert again.returncode == 0, again.stdout[-2000:]
    assert hashlib.sha256((run_dir / "results.json").read_bytes()).hexdigest() == before
