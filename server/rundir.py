"""The run directory: everything a run leaves behind, outside the app folder.

Layout (the audit reads exactly this)::

    config.json            run config, versions, channels, start time
    model.json             parameter names and shapes (what a train reply may carry)
    metrics.jsonl          one line per (round, channel, phase); channel "server", phase
                           "timing": each round's train and evaluate wall seconds
    privacy-ledger.jsonl   hash-chained: ε per channel per round (trained / refused / missing)
    egress.jsonl           hash-chained: every reply received (keys, shapes, dtypes, bytes, sha256)
    checkpoints/round-NNNN.safetensors
    server-state/round-NNNN.safetensors
                           the strategy's own state after round NNNN (FedAdam's moments,
                           FedAvgM's momentum), written before that round's checkpoint, so
                           that a resumed run continues it
    heads.json             the logs' heads after the newest checkpoint (signed, with the key)
    results.json           final metrics per channel, log heads (HMAC-signed with the key in
                           $FEDREC_RUN_KEY, if set), wall time
    INCOMPLETE             present from the run's start until results.json is written: a run
                           that stopped early (crash, Ctrl-C, timeout) keeps it
    run.lock               flock-ed by the server writing the run (pid, host, start time in
                           it): a second server on the same directory is refused

Must not: import ``fedrec.client``; read any channel's interactions.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.shared import hashlog
from fedrec.shared.errors import FedrecError, InputError
from fedrec.shared.fsio import (
    LockHeld,
    atomic_write_bytes,
    atomic_write_text,
    held_lock,
    strict_json,
)
from fedrec.shared.wire import shape_problems

LEDGER = "privacy-ledger.jsonl"
EGRESS = "egress.jsonl"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
HEADS = "heads.json"  # the logs' heads after the newest checkpoint
INCOMPLETE = "INCOMPLETE"  # marker: the run started and has not written results.json
TIMING_CHANNEL, TIMING_PHASE = "server", "timing"  # metrics.jsonl lines of round wall times
LOCK = "run.lock"  # held by the one server writing the run
SERVER_STATE = "server-state"  # the strategy's state per round
# What a started run leaves (besides checkpoints): a run directory holding any of these is used.
RUN_FILES = ("config.json", "model.json", LEDGER, EGRESS, METRICS, RESULTS, HEADS, INCOMPLETE)


class RunDirError(InputError):
    """A run directory that cannot serve this run as asked (it already holds a run, or its saved
    server state does not fit the strategy)."""


class RunDirBusy(FedrecError, RuntimeError):
    """Another server holds the run directory's lock."""


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

    @contextlib.contextmanager
    def locked(self, who: str = "fedrec server") -> Iterator[None]:
        """Hold :data:`LOCK` for the block: the one server writing this run directory. The
        file names ``who`` and its pid, host and start time for the message of the next.

        Two servers on one directory (two ``flwr run``s, simulate and a deployment) would each
        append to its hash-chained logs and fork them. The lock is an ``flock``, which the
        kernel drops when its holder dies, so a crashed server never blocks the next one.

        Raises:
            RunDirBusy: another server holds it; the message names that server.
        """
        note = f"{who}, pid {os.getpid()} on {socket.gethostname()}, since {now()}"
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(held_lock(self.path / LOCK, note))
            except LockHeld as exc:
                raise RunDirBusy(
                    f"run-dir {self.path} is in use: {exc.holder or 'a server that is starting'} "
                    f"holds {exc.path}. Two servers writing one run directory would fork its "
                    "hash-chained logs. Fix: wait for that run to end or stop it (flwr stop, "
                    "Ctrl-C), or give this run another run-dir."
                ) from None
            yield

    def used(self) -> list[str]:
        """The files that show a run was started here (empty for a new directory)."""
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        for folder in ("checkpoints", SERVER_STATE):
            found += [f"{folder}/{p.name}" for p in sorted((self.path / folder).glob("*"))]
        return found

    def refuse_used(self) -> None:
        """Refuse a directory that already holds a run, for a run that does not resume it: a
        new run would append to its logs and overwrite its results.

        Raises:
            RunDirError: naming what it holds.
        """
        used = self.used()
        if used:
            shown = ", ".join(used[:6]) + (f" and {len(used) - 6} more" * (len(used) > 6))
            raise RunDirError(
                f"run-dir {self.path} already holds a run ({shown}). Fix: set resume = true in "
                "the run config to continue it, or give a new run-dir."
            )

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

    def save_server_state(self, round_: int, strategy: str, arrays: dict[str, np.ndarray]) -> Path:
        """Write the strategy's state after ``round_`` (atomically); call it before that round's
        :meth:`checkpoint`, so that every checkpoint has its state."""
        from safetensors.numpy import save

        path = self.path / SERVER_STATE / f"round-{round_:04d}.safetensors"
        data = save(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            metadata={"round": str(round_), "strategy": strategy},
        )
        atomic_write_bytes(path, data)
        return path

    def server_state(
        self, round_: int, strategy: str, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray] | None:
        """The state :meth:`save_server_state` wrote after ``round_``; None if there is none.

        Raises:
            RunDirError: the file cannot be read, was written by another strategy, or does not
                hold ``shapes`` (the names and shapes the strategy expects).
        """
        from safetensors import SafetensorError, safe_open

        path = self.path / SERVER_STATE / f"round-{round_:04d}.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="numpy") as fh:
                saved_by = (fh.metadata() or {}).get("strategy", "")
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError) as exc:
            raise RunDirError(
                f"{path}: not a readable server state ({exc}). Fix: restore it from a backup, "
                "or delete it and this round's checkpoint to resume from the round before."
            ) from None
        if saved_by != strategy:
            raise RunDirError(
                f"{path}: written by strategy {saved_by!r}; this run resumes with {strategy!r}. "
                f"Fix: resume with strategy = {saved_by!r} (see {self.path / 'config.json'}), "
                "or start a new run-dir."
            )
        problems = shape_problems({k: v.shape for k, v in arrays.items()}, shapes)
        if problems:
            raise RunDirError(
                f"{path}: does not fit the run's model ({'; '.join(problems[:4])}). Resume with "
                f"the configuration in {self.path / 'config.json'}, or start a new run-dir."
            )
        return arrays

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
        another model configuration, and resuming from it would fail on every node. The
        arrays then come in the order of ``shapes`` (the file keeps its own order; FedAvgM
        pairs arrays with the replies' by position).
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
            arrays = {k: arrays[k] for k in shapes}
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
