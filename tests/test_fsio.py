"""Tests for fedrec.shared.fsio: atomic files and folders, and the locked append of the logs."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from fedrec.shared import hashlog
from fedrec.shared.fsio import atomic_dir, atomic_write_bytes, atomic_write_text, locked_append


def test_atomic_dir_exception_keeps_existing_folder_and_removes_temp(tmp_path):
    # Prepare: an existing dataset folder.
    final = tmp_path / "ds"
    final.mkdir()
    (final / "manifest.json").write_text("old")

    # Execute
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "manifest.json").write_text("new")
            raise RuntimeError("boom")

    # Assert
    assert (final / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_atomic_dir_success_replaces_existing_folder(tmp_path):
    # Prepare
    final = tmp_path / "ds"
    final.mkdir()
    (final / "stale.txt").write_text("old")

    # Execute
    with atomic_dir(final) as tmp:
        (tmp / "manifest.json").write_text("new")

    # Assert
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_atomic_write_bytes_replaces_file_and_leaves_no_temp(tmp_path):
    # Prepare
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    # Execute
    atomic_write_bytes(target, b"new")

    # Assert
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_text_is_utf8(tmp_path):
    # Execute
    atomic_write_text(tmp_path / "a.txt", "café")

    # Assert
    assert (tmp_path / "a.txt").read_bytes() == "café".encode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    # Prepare: data that cannot be written (not bytes) over an existing file.
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    # Execute
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]

    # Assert
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_locked_append_refuses_a_line_with_a_newline(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one line"):
        locked_append(tmp_path / "log.jsonl", lambda: "a\nb")
    assert not (tmp_path / "log.jsonl").exists()


def _append_many(path: str, writer: int, count: int) -> None:
    for i in range(count):
        hashlog.append(Path(path), {"writer": writer, "i": i})


def test_two_processes_appending_to_one_chain_never_fork_it(tmp_path: Path) -> None:
    # Prepare: without the lock, both writers read the same head and the chain forks.
    log = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(log), w, 50)) for w in (1, 2)]

    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)

    # Assert
    assert [p.exitcode for p in procs] == [0, 0]
    verdict = hashlog.verify(log)
    assert verdict.ok, verdict.problem
    assert verdict.entries == 100
