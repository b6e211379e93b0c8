"""Cross-checks between the files of a run directory: do they agree on what ran and was spent?

A hash chain without a key proves only that a log is internally consistent: whoever can write
the run directory can drop a round, recompute the chain with the public
:func:`fedrec.shared.hashlog.chain_hash` and write the new head into ``results.json``. The
other files were written independently, round by round, and contradict such an edit:

* ``checkpoints/round-NNNN.safetensors``: round N was aggregated, so some channel trained in it;
* ``results.json``: ``rounds_completed`` (every round 1..N has ledger lines, none after N) and
  ``round_status`` (each node's status per round, as the server saw it);
* ``metrics.jsonl``: a round's lines mean the round ran; a ``train`` line means that node's
  reply was aggregated (ledger status ``trained``);
* ``egress.jsonl``: every reply received; a train reply's privacy record carries the same
  ``steps`` and ε the ledger must hold for that node and round.

(The clients' own ledgers under ``nodes/`` are compared with the server's in
:mod:`.accounting`.) Every disagreement is a problem naming the files and the numbers.

Must not: import ``server/`` or ``client/``; read files (callers pass parsed entries); compute
ε (numbers are compared as logged).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedrec.shared import wire

from .accounting import NOT_SPENT, SAME_ACCOUNTANT_RTOL, SPENT, TRAINED, close, epsilon_of

LEDGER, EGRESS, METRICS, RESULTS = (
    "privacy-ledger.jsonl",
    "egress.jsonl",
    "metrics.jsonl",
    "results.json",
)
CHECKPOINT_RE = re.compile(r"^round-(\d+)\.safetensors$")
# results.json's round_status says "ok" where the ledger says "trained"; the rest are equal.
STATUS_OF = {"ok": TRAINED}

Entry = Mapping[str, Any]


def label(entry: Entry) -> str | None:
    """The node a log line is about, as the server names it: ``channel`` or ``channel-shard``."""
    ch = entry.get(wire.CHANNEL)
    if not isinstance(ch, str):
        return None
    shard = entry.get(wire.SHARD)
    return ch if shard in (None, 0) else f"{ch}-{shard}"


def _round(entry: Entry) -> int | None:
    rnd = entry.get("round")
    return rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None


def _spans(rounds: Iterable[int]) -> str:
    """``1-4, 6`` for {1, 2, 3, 4, 6}; ``none`` if empty."""
    out: list[str] = []
    for r in sorted(set(rounds)):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out) or "none"


def checkpoint_rounds(names: Iterable[str]) -> dict[int, str]:
    """Round → file name of every ``round-NNNN.safetensors`` (other names are ignored)."""
    return {int(m.group(1)): n for n in names if (m := CHECKPOINT_RE.match(n))}


class _Ledger:
    """The server ledger indexed by (node label, round)."""

    def __init__(self, ledger: Sequence[Entry]) -> None:
        self.lines: dict[tuple[str, int], Entry] = {}
        for e in ledger:
            who, rnd = label(e), _round(e)
            if who is not None and rnd is not None:
                self.lines.setdefault((who, rnd), e)  # a duplicate is the accounting's problem
        self.rounds = {rnd for _, rnd in self.lines}
        self.trained = {rnd for (_, rnd), e in self.lines.items() if e.get("status") == TRAINED}

    def rounds_of(self, who: str) -> set[int]:
        return {rnd for w, rnd in self.lines if w == who}

    def nodes(self) -> set[str]:
        return {w for w, _ in self.lines}


def _rounds_completed(results: Mapping[str, Any], led: _Ledger) -> list[str]:
    """Every round 1..rounds_completed has ledger lines, and none comes after."""
    n = results.get("rounds_completed")
    if n is None:
        return []
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return [f"{RESULTS}: rounds_completed must be a non-negative integer. Found {n!r}."]
    out = []
    absent = set(range(1, n + 1)) - led.rounds
    if absent:
        out.append(
            f"{RESULTS} says rounds_completed = {n}, but {LEDGER} has no line for round(s) "
            f"{_spans(absent)} (it records rounds {_spans(led.rounds)}): lines removed?"
        )
    after = {r for r in led.rounds if r > n}
    if after:
        out.append(
            f"{LEDGER} records round(s) {_spans(after)}, after {RESULTS}'s rounds_completed = {n}"
        )
    return out


def _gaps(led: _Ledger, last: int | None) -> list[str]:
    """Every node has one line per round from its first to ``last`` (``rounds_completed``;
    unknown: its own last round, as a run that stopped mid-round may lack a few lines)."""
    out = []
    for who in sorted(led.nodes()):
        mine = led.rounds_of(who)
        gaps = set(range(min(mine), (max(mine) if last is None else last) + 1)) - mine
        if last is not None:
            gaps &= led.rounds  # a round with no line at all: see _rounds_completed
        if gaps:
            out.append(
                f"{LEDGER}: {who} has no line for round(s) {_spans(gaps)} (it has rounds "
                f"{_spans(mine)}; the server writes one line per node per round): removed?"
            )
    return out


def _round_status(results: Mapping[str, Any], led: _Ledger) -> list[str]:
    """``results.json``'s round_status, node by node, equals the ledger's status lines."""
    status = results.get("round_status")
    if status is None:
        return []
    if not isinstance(status, Mapping):
        return [f"{RESULTS}: round_status must be an object. Found {type(status).__name__}."]
    out: list[str] = []
    covered: set[int] = set()
    for key, nodes in status.items():
        if not str(key).isdigit() or not isinstance(nodes, Mapping):
            out.append(f"{RESULTS}: round_status[{key!r}] is not round -> {{node: status}}")
            continue
        rnd = int(key)
        covered.add(rnd)
        for who, said in nodes.items():
            want = STATUS_OF.get(str(said), str(said))
            line = led.lines.get((str(who), rnd))
            got = None if line is None else line.get("status")
            if got != want:
                where = "no line" if line is None else f"status {got!r} (entry {line.get('_line')})"
                out.append(
                    f"{RESULTS}: round_status says {who} was {said!r} in round {rnd}; "
                    f"{LEDGER} has {where}"
                )
    resumed = results.get("resumed_after")
    start = resumed if isinstance(resumed, int) and not isinstance(resumed, bool) else 0
    uncovered = {r for r in led.rounds if r > start} - covered
    if covered and uncovered:
        out.append(
            f"{LEDGER} records round(s) {_spans(uncovered)} that {RESULTS}'s round_status does "
            f"not (it has rounds {_spans(covered)})"
        )
    return out


def _checkpoints(ckpts: Mapping[int, str], led: _Ledger) -> list[str]:
    """A checkpoint for round N means some node's reply was aggregated in round N."""
    out = []
    for rnd in sorted(set(ckpts) - led.trained):
        out.append(
            f"checkpoints/{ckpts[rnd]}: round {rnd} was aggregated, but {LEDGER} has no trained "
            f"line for round {rnd} (trained rounds: {_spans(led.trained)}): lines removed?"
        )
    return out


def _metrics(metrics: Sequence[Entry], led: _Ledger) -> list[str]:
    """Rounds in metrics.jsonl ran (ledger lines); a ``train`` line's node trained."""
    unknown: dict[int, int] = {}
    out = []
    for e in metrics:
        rnd = _round(e)
        if rnd is None:
            continue
        if rnd not in led.rounds:
            unknown.setdefault(rnd, e.get("_line", 0))
        elif e.get("phase") == "train" and isinstance(who := e.get("channel"), str):
            line = led.lines.get((who, rnd))
            if line is None or line.get("status") != TRAINED:
                got = "no line" if line is None else f"status {line.get('status')!r}"
                out.append(
                    f"{METRICS}:{e.get('_line')}: {who} sent training metrics in round {rnd} "
                    f"(its reply was aggregated); {LEDGER} has {got}"
                )
    if unknown:
        first = min(unknown)
        out.insert(
            0,
            f"{METRICS} has lines for round(s) {_spans(unknown)} (first at line "
            f"{unknown[first]}), {LEDGER} has none (it records rounds {_spans(led.rounds)}): "
            "lines removed?",
        )
    return out


def _egress(replies: Sequence[Entry], led: _Ledger) -> list[str]:
    """Every train reply received has its ledger line: the same steps and ε for a reply that
    carried a privacy report, a not-spent status for an error reply."""
    out = []
    for e in replies:
        rnd, who = _round(e), label(e)
        if e.get("kind") != "train" or rnd is None or who is None:
            continue
        at = f"{EGRESS}: entry {e.get('_line')} ({who}, round {rnd})"
        line = led.lines.get((who, rnd))
        status = None if line is None else line.get("status")
        if e.get("error") is not None:
            if line is None or status not in NOT_SPENT:
                got = "no line" if line is None else f"status {status!r}"
                out.append(f"{at}: an error reply (nothing spent); {LEDGER} has {got}")
            continue
        if line is None or status not in SPENT:
            got = "no line" if line is None else f"status {status!r}"
            out.append(f"{at}: a training reply; {LEDGER} has {got}: lines removed?")
            continue
        records = e.get("records")
        privacy = records.get(wire.PRIVACY) if isinstance(records, Mapping) else None
        values = privacy.get("values") if isinstance(privacy, Mapping) else None
        if not isinstance(values, Mapping):
            continue
        sent_steps, logged_steps = values.get(wire.STEPS), line.get(wire.STEPS)
        if sent_steps is not None and sent_steps != logged_steps:
            out.append(
                f"{at}: the client reported {sent_steps} steps; {LEDGER} entry "
                f"{line.get('_line')} says {logged_steps!r}"
            )
        sent_eps, logged_eps = epsilon_of(values), epsilon_of(line)
        if sent_eps is not None and (
            logged_eps is None or not close(sent_eps, logged_eps, SAME_ACCOUNTANT_RTOL)
        ):
            out.append(
                f"{at}: the client reported ε {sent_eps:.4f}; {LEDGER} entry "
                f"{line.get('_line')} says {logged_eps if logged_eps is None else f'{logged_eps:.4f}'}"
            )
    return out


def cross_check(
    ledger: Sequence[Entry],
    *,
    results: Mapping[str, Any] | None,
    checkpoints: Iterable[str],
    metrics: Sequence[Entry],
    replies: Sequence[Entry],
) -> dict[str, Any]:
    """Compare the server ledger with every other record of the run.

    Args:
        ledger: the server's privacy-ledger entries (``_line`` added by the reader).
        results: ``results.json`` (``None`` if the run wrote none).
        checkpoints: file names in ``checkpoints/``.
        metrics: ``metrics.jsonl`` entries.
        replies: ``egress.jsonl`` entries.

    Returns:
        ``{"rounds": {source: [rounds]}, "problems": [str]}``: the rounds each source says ran
        (``results.json``: 1..rounds_completed), and every disagreement.
    """
    led = _Ledger(ledger)
    ckpts = checkpoint_rounds(checkpoints)
    problems: list[str] = []
    rounds: dict[str, list[int]] = {
        LEDGER: sorted(led.rounds),
        "checkpoints": sorted(ckpts),
        METRICS: sorted({r for e in metrics if (r := _round(e)) is not None}),
        EGRESS: sorted({r for e in replies if (r := _round(e)) is not None}),
    }
    last = None
    if results is not None:
        n = results.get("rounds_completed")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            rounds[RESULTS] = list(range(1, n + 1))
            last = n
        problems += _rounds_completed(results, led)
        problems += _round_status(results, led)
    problems += _gaps(led, last)
    problems += _checkpoints(ckpts, led)
    problems += _metrics(metrics, led)
    problems += _egress(replies, led)
    return {"rounds": rounds, "problems": problems}
