"""Splitting a dataset for a deployment: one folder per platform, and a catalogue-only folder
for the coordinator.

Owns: :func:`split_dataset`, which decides what each process of a deployment can read: a
platform's folder holds its own channel only, the coordinator's holds public catalogues only.

Must not: start processes, or change a byte of the files it copies (the item-matrix
fingerprints the server computes must match what the nodes check).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import out_dir_problem

COORDINATOR = "coordinator"  # the catalogue-only folder of a split


class SplitError(FedrecError, ValueError):
    """The folder to split into cannot take a split (a file, or not empty)."""

    exit_code = 2


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file or a folder holding anything: a split is copied to
    machines as it is, so a stale platform folder left beside it must not be mistaken for
    part of it."""
    if (problem := out_dir_problem(out_dir)) is not None:
        raise SplitError(problem)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        found = sorted(p.name for p in out_dir.iterdir())[:5]
        raise SplitError(
            f"--out {out_dir} is not empty (holds {', '.join(found)}). Fix: give a new or "
            "empty folder; a split is never written over another."
        )


def _manifest(name: str, channels: dict[str, dict[str, str]], source: dict[str, Any]) -> str:
    from fedrec.shared.datasets import FORMAT

    doc = {
        "format": FORMAT,
        "name": name,
        "channels": channels,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def split_dataset(data_dir: Path, out_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Copy ``data_dir`` into one folder per channel plus a catalogue-only coordinator folder.

    ``<out>/<channel>/`` holds that channel's ``items.csv`` and ``interactions.csv`` and a
    manifest naming that channel only: the platform's process is given this folder and no
    other, so another platform's interactions are not reachable from it. ``<out>/coordinator/``
    holds every channel's public ``items.csv`` and no interactions at all (the manifest still
    names where they would be: the format requires the key; the loaders read them only when
    asked for interactions). ``ground_truth/`` is never copied. Files are copied byte for byte,
    so the item-matrix fingerprints the server computes match what the nodes check.

    Returns:
        The coordinator folder and channel -> platform folder.
    """
    from fedrec.shared.datasets import load_manifest
    from fedrec.shared.fsio import atomic_dir

    manifest = load_manifest(data_dir)
    if COORDINATOR in manifest.channels:
        raise SplitError(
            f"{data_dir} has a channel named {COORDINATOR!r}, the name of the catalogue-only "
            "folder of a split. Fix: rename that channel in the dataset."
        )
    out_dir = Path(out_dir).resolve()
    entries = {
        ch: {"catalogue": f"{ch}/items.csv", "interactions": f"{ch}/interactions.csv"}
        for ch in manifest.channels
    }
    nodes: dict[str, Path] = {}
    for ch, files in manifest.channels.items():
        with atomic_dir(out_dir / ch) as tmp:
            (tmp / ch).mkdir()
            shutil.copyfile(files.catalogue, tmp / ch / "items.csv")
            shutil.copyfile(files.interactions, tmp / ch / "interactions.csv")
            (tmp / "manifest.json").write_text(
                _manifest(
                    f"{manifest.name}:{ch}",
                    {ch: entries[ch]},
                    {"split-from": manifest.name, "channel": ch},
                ),
                encoding="utf-8",
            )
        nodes[ch] = out_dir / ch
    with atomic_dir(out_dir / COORDINATOR) as tmp:
        for ch, files in manifest.channels.items():
            (tmp / ch).mkdir()
            shutil.copyfile(files.catalogue, tmp / ch / "items.csv")
        (tmp / "manifest.json").write_text(
            _manifest(
                f"{manifest.name}:catalogues",
                entries,
                {"split-from": manifest.name, "catalogues-only": True},
            ),
            encoding="utf-8",
        )
    return out_dir / COORDINATOR, nodes
