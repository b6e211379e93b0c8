"""The run directory: everything a run leaves behind, outside the app folder.

Layout (the audit reads exactly this)::

    config.json            run config, versions, channels, start time
    model.json             parameter names and shapes (what a train reply may carry)
    metrics.jsonl          one line per (round, channel, phase); channel "server", phase
                           "timing": each round's train and evaluate wall seconds
    privacy-ledger.jsonl   hash-chained: ε per channel per round (trained / refused / missing)
    egress.jsonl           hash-chained: every reply received (keys, shapes, dtypes, bytes, sha256)
    checkpoints/round-NNNN.safetensors
    heads.json             the logs' heads after the newest checkpoint (signed, with the key)
    results.json           final metrics per channel, log heads (HMAC-signed with the key in
                           $FEDREC_RUN_KEY, if set), wall time
    INCOMPLETE             present from the run's start until results.json is written: a run
                           that stopped early (crash, Ctrl-C, timeout) keeps it

Must not: import ``fedrec.client``; read any channel's interactions.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import hashlog
from fedrec.shared.fsio import atomic_write_bytes, atomic_write_text, strict_json
from fedrec.shared.wire import shape_problems

LEDGER = "privacy-ledger.jsonl"
EGRESS = "egress.jsonl"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
HEADS = "heads.json"  # the logs' heads after the newest checkpoint
INCOMPLETE = "INCOMPLETE"  # marker: the run started and has not written results.json
TIMING_CHANNEL, TIMING_PHASE = "server", "timing"  # metrics.jsonl lines of round wall times


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (:func:`fedrec.shared.fsio.strict_json`: ∞ and NaN as null)."""
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=True, default=str) + "\n")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fedrec", "flwr", "torch", "opacus", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class RunDir:
    """A run directory; ``create=False`` reads an existing one and creates nothing."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        if not str(path):
            raise ValueError("run-dir is empty: set run-dir in the run config to an absolute path")
        self.path = Path(path).expanduser().resolve()
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        # Signs the log heads in results.json when the operator set FEDREC_RUN_KEY; read now,
        # so that an unusable key stops the run before round 1, not after the last.
        self.key = hashlog.key_from_env() if create else None

    def start(
        self, run_config: dict[str, Any], channels: list[str], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        self.mark_incomplete()
        self._record_heads(0)  # signed from the start: a run cut before round 1 has them too
        write_json(
            self.path / "config.json",
            {
                "fedrec_version": versions().get("fedrec"),
                "run_config": run_config,
                "channels": channels,
                "started": now(),
                "versions": versions(),
            },
        )
        write_json(
            self.path / "model.json",
            {
                "param_shapes": {k: list(v) for k, v in shapes.items()},
                "num_parameters": int(sum(int(np.prod(v)) for v in shapes.values())),
            },
        )

    def metrics(self, round_: int, channel: str, phase: str, values: dict[str, Any]) -> None:
        with (self.path / METRICS).open("a", encoding="utf-8") as fh:
            fh.write(
                strict_json(
                    {"round": round_, "channel": channel, "phase": phase, "metrics": values},
                    default=str,
                )
                + "\n"
            )

    def ledger(self, entry: dict[str, Any]) -> None:
        hashlog.append(self.path / LEDGER, {"time": now(), **entry})

    def egress(self, entry: dict[str, Any]) -> None:
        hashlog.append(self.path / EGRESS, {"time": now(), **entry})

    def checkpoint(self, round_: int, arrays: dict[str, np.ndarray]) -> Path:
        from safetensors.numpy import save

        path = self.path / "checkpoints" / f"round-{round_:04d}.safetensors"
        data = save(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            metadata={"round": str(round_)},
        )
        self._record_heads(round_)  # first: a checkpoint never outruns the recorded heads
        atomic_write_bytes(path, data)
        return path

    def _record_heads(self, round_: int) -> None:
        """heads.json: the logs' heads after this round's checkpoint (signed with the run key,
        if set), so that a run that stops early still has a recorded head its logs must
        extend."""
        heads = {name: hashlog.head(self.path / name) for name in (LEDGER, EGRESS)}
        doc: dict[str, Any] = {"round": round_, "log_heads": heads}
        if self.key is not None:
            doc["log_heads_signed"] = hashlog.sign_heads(self.key, {**heads, "round": str(round_)})
        write_json(self.path / HEADS, doc)

    def last_checkpoint(
        self, shapes: dict[str, tuple[int, ...]] | None = None
    ) -> tuple[int, dict[str, np.ndarray]] | None:
        """(round, arrays) of the newest checkpoint, or None if there is none.

        With ``shapes`` (the model's parameter names and shapes), a checkpoint that does not
        fit the model raises ``ValueError`` naming the differences: it was written under
        another model configuration, and resuming from it would fail on every node.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        found = sorted((self.path / "checkpoints").glob("round-*.safetensors"))
        if not found:
            return None
        try:
            arrays = load_file(found[-1])
        except (SafetensorError, OSError) as exc:
            raise ValueError(
                f"{found[-1]}: not a readable checkpoint ({exc}); it was cut short or damaged. "
                "Fix: restore it from a backup, or delete it to fall back to the round before."
            ) from None
        if shapes is not None:
            problems = shape_problems({k: v.shape for k, v in arrays.items()}, shapes)
            if problems:
                shown = "; ".join(problems[:4]) + (
                    f"; and {len(problems) - 4} more" * (len(problems) > 4)
                )
                raise ValueError(
                    f"{found[-1]}: this checkpoint does not fit the run's model ({shown}). It "
                    "was written with another model configuration (model.heads, model.item-prior, model.dim, "
                    "model.hidden or channels). Resume with the configuration in "
                    f"{self.path / 'config.json'}, or start a new run-dir."
                )
        return int(found[-1].stem.split("-")[1]), arrays

    def results(self, obj: dict[str, Any]) -> None:
        heads = {name: hashlog.head(self.path / name) for name in (LEDGER, EGRESS)}
        signed = (
            {} if self.key is None else {"log_heads_signed": hashlog.sign_heads(self.key, heads)}
        )
        write_json(self.path / RESULTS, {**obj, "log_heads": heads, **signed})
        (self.path / INCOMPLETE).unlink(missing_ok=True)

    def mark_incomplete(self) -> None:
        """Write the :data:`INCOMPLETE` marker (removed by :meth:`results`)."""
        atomic_write_text(
            self.path / INCOMPLETE,
            f"started {now()}; this run has not finished (no {RESULTS} yet)\n",
        )

    def rounds_finished(self) -> int | None:
        """``rounds_completed`` of a run that finished (results.json, no INCOMPLETE marker);
        None for a run that did not finish or whose results cannot be read."""
        if self.incomplete() or not (self.path / RESULTS).exists():
            return None
        try:
            return int(json.loads((self.path / RESULTS).read_text())["rounds_completed"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def incomplete(self) -> bool:
        """Whether the run started and never wrote its results (see :data:`INCOMPLETE`)."""
        return (self.path / INCOMPLETE).exists()
