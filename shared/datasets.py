"""Dataset folders on disk: the ``fedrec-dataset/1`` format, its loaders, validation and writer.

Owns: reading a dataset folder into :class:`fedrec.shared.data.Catalogue` and
:class:`fedrec.shared.data.Interactions`, checking every file where it enters (each problem
located by file, line, column and value, with a fix), and writing datasets atomically (through
:mod:`fedrec.shared.fsio`).

Must not: import ``fedrec.server`` or ``fedrec.client``; read anything under ``ground_truth/``;
log interactions, user ids or cell values (errors carry values to the person who owns the file,
logs do not).

Format ``fedrec-dataset/1``
---------------------------
::

    <dataset>/
      manifest.json               the index (below)
      <channel>/items.csv         header: item_id,title,description,category,attributes
      <channel>/interactions.csv  header: user_id,item_id,timestamp,event,query
      ground_truth/...            optional, evaluation-only files; never read by the loaders

``manifest.json`` is a JSON object::

    {"format": "fedrec-dataset/1",
     "name": "synthetic-world",
     "channels": {"ecommerce": {"catalogue": "ecommerce/items.csv",
                                "interactions": "ecommerce/interactions.csv"}},
     "created": "2024-03-01T12:34:56Z",
     "source": {"generator": "fedrec.simulations.world", "seed": 0}}

``format``, ``name`` and ``channels`` are required; ``created`` (ISO-8601 string) and ``source``
(free-form object: the generator and its seed, or the original dataset) are optional; other keys
are rejected. Channel names use letters, digits, ``-`` and ``_``. File paths are relative to the
dataset folder and may not leave it.

CSV files: UTF-8 (a leading byte-order mark is accepted), comma separated, RFC-4180 quoting
(a value with a comma, a double quote or a line break is wrapped in ``"``, and ``"`` inside it
is doubled), header row on line 1. Columns may come in any order, but each named column must be
present exactly once and no other column may appear. Empty lines are skipped.

- ``items.csv``: ``item_id`` unique and non-empty; ``title`` non-empty; ``description``,
  ``category`` may be empty; ``attributes`` is ``"key=value; key=value"`` or empty (kept as
  text, not parsed).
- ``interactions.csv``: ``user_id`` and ``item_id`` non-empty, ``item_id`` must be in the
  channel's ``items.csv``; ``timestamp`` is integer Unix seconds (``1709296496``) or ISO-8601
  with a zone (``2024-03-01T12:34:56Z``, ``2024-03-01T14:34:56+02:00``; fractions of a second
  are dropped), years 0000-9999; ``event`` is one of :data:`fedrec.shared.data.EVENT_TYPES`;
  ``query`` is free text, empty when there was none. Rows may come in any order.

Loaders return interactions sorted by (user_id, timestamp, file row); :func:`write_dataset` writes
them in that order with ISO-8601 UTC timestamps (``Z``). In memory, ids, events and categories
are fixed-width numpy ``str`` arrays; free text (titles, descriptions, attributes, queries) is
an ``object`` array of ``str``, so one long text does not widen every row.

Errors: a :class:`DataError` names one problem (``items.csv:17: column 'item_id': duplicate item
id 'B12' (first seen on line 4). Fix: ...``); :class:`DataErrors` gathers up to
:data:`MAX_REPORTED` of each kind found in one pass. Line numbers are file lines (the header is
line 1) and stay right when quoted values span several lines.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from fedrec.shared.data import EVENT_TYPES, Catalogue, Interactions
from fedrec.shared.errors import FedrecError
from fedrec.shared.fsio import atomic_dir

logger = logging.getLogger(__name__)

FORMAT = "fedrec-dataset/1"
MANIFEST_NAME = "manifest.json"
ITEM_COLUMNS = ("item_id", "title", "description", "category", "attributes")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "event", "query")
MAX_REPORTED = 20  # problems listed per check (and in a DataErrors message); the rest are counted
MAX_CELL_BYTES = 65_536  # one CSV cell; far above any id, title or description a row needs

_CHANNEL_RE = re.compile(r"[A-Za-z0-9_-]+")
_MANIFEST_KEYS = ("format", "name", "channels", "created", "source")
_CHANNEL_KEYS = ("catalogue", "interactions")
_BOM = "\ufeff"
# Timestamps are limited to four-digit years so that every value can be written back as ISO-8601.
_MIN_TS = -62_167_219_200  # 0000-01-01T00:00:00Z
_MAX_TS = 253_402_300_799  # 9999-12-31T23:59:59Z
_INT_TS_RE = r"^-?[0-9]{1,12}$"
_ISO_TS_RE = (
    r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})"
    r":(?P<s>[0-9]{2})(?:\.[0-9]+)?(?:Z|(?P<sign>[+-])(?P<oh>[0-9]{2}):?(?P<om>[0-9]{2}))$"
)
_CSV_QUOTING_HINT = (
    "wrap a value that contains a comma, a double quote or a line break in double quotes, and "
    'double every " inside it ("") as RFC 4180 says.'
)


# --------------------------------------------------------------------------------------------
# Errors


def _show(value: str, limit: int = 60) -> str:
    """A value as it appears in a message: quoted, escaped if it has control characters, cut."""
    text = value if len(value) <= limit else value[:limit] + "..."
    if text.isprintable():
        return f"'{text}'"
    return repr(text)


class DataError(FedrecError, ValueError):
    """One problem in a dataset, located: ``file:line: column 'c': problem. Fix: hint``.

    ``column`` is the CSV column, or the JSON key path for ``manifest.json``. ``line`` is the
    1-based line in the file (the header is line 1), ``None`` when the problem has no line.
    """

    exit_code = 2

    def __init__(
        self,
        *,
        file: str,
        problem: str,
        hint: str,
        line: int | None = None,
        column: str | None = None,
        value: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.column = column
        self.value = value
        self.problem = problem
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        label = "key" if self.file.endswith(".json") else "column"
        what = f"{label} '{self.column}': " if self.column is not None else ""
        return f"{where}: {what}{self.problem}. Fix: {self.hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only __init__ would break the default exception pickling (Ray ships errors).
        rebuild = functools.partial(
            DataError,
            file=self.file,
            problem=self.problem,
            hint=self.hint,
            line=self.line,
            column=self.column,
            value=self.value,
        )
        return (rebuild, ())


class DataErrors(FedrecError, ValueError):
    """Several problems found in one pass: ``errors`` lists them, ``total`` counts all of them."""

    exit_code = 2

    def __init__(self, errors: list[DataError], *, total: int | None = None) -> None:
        self.errors = list(errors)
        self.total = max(total if total is not None else 0, len(self.errors))
        super().__init__(self._message())

    def _message(self) -> str:
        files = sorted({e.file for e in self.errors})
        where = f" in {files[0]}" if len(files) == 1 else ""
        shown = self.errors[:MAX_REPORTED]
        lines = [f"{self.total} problems{where}:"] + [f"  {e}" for e in shown]
        if self.total > len(shown):
            lines.append(f"  ... and {self.total - len(shown)} more")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial(DataErrors, self.errors, total=self.total), ())


class _Problems:
    """Collects problems from several checks; each check lists up to MAX_REPORTED and counts all."""

    def __init__(self) -> None:
        self.errors: list[DataError] = []
        self.total = 0

    def add(self, error: DataError) -> None:
        self.errors.append(error)
        self.total += 1

    def add_rows(self, rows: np.ndarray, make: Callable[[int], DataError]) -> None:
        self.total += len(rows)
        self.errors.extend(make(int(r)) for r in rows[:MAX_REPORTED])

    def raise_if_any(self) -> None:
        if self.total == 0:
            return
        if self.total == 1:
            raise self.errors[0]
        errors = sorted(self.errors, key=lambda e: (e.file, e.line if e.line is not None else 0))
        raise DataErrors(errors, total=self.total)


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class ChannelFiles:
    """Absolute paths of one channel's files."""

    catalogue: Path
    interactions: Path


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``; ``path`` is the manifest file, ``root`` the dataset folder."""

    path: Path
    name: str
    channels: dict[str, ChannelFiles]
    source: dict[str, Any] = field(default_factory=dict)
    created: str | None = None

    @property
    def root(self) -> Path:
        return self.path.parent


def _json_line(text: str, *keys: str) -> int | None:
    """Best-effort line of a nested key: finds each quoted key in turn after the previous one."""
    pos = 0
    found = None
    for key in keys:
        at = text.find(json.dumps(key), pos)
        if at < 0:
            break
        found, pos = at, at + 1
    return None if found is None else text.count("\n", 0, found) + 1


def _decode_utf8(data: bytes, file: str, header: list[str] | None = None) -> str:
    """Decode, or raise a DataError naming the line, byte offset and (for CSV) the column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        line_start = data.rfind(b"\n", 0, start) + 1
        bad = data[start : max(exc.end, start + 1)]
        column = None
        if header is not None and line > 1:
            prefix = data[line_start:start].decode("utf-8", "replace")
            fields = next(csv.reader([prefix]), [""])
            if len(fields) <= len(header):
                column = header[len(fields) - 1]
        try:
            data.decode("cp1252")
            guess = " (it reads as Windows-1252/Latin-1, probably what it was saved as)"
        except UnicodeDecodeError:
            guess = ""
        raise DataError(
            file=file,
            line=line,
            column=column,
            value=repr(bad),
            problem=(
                f"invalid UTF-8 byte {bad!r} at byte offset {start} of the file "
                f"(byte {start - line_start + 1} of the line)"
            ),
            hint=f"re-save the file as UTF-8{guess}.",
        ) from None


def _safe_relative(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in value


def load_manifest(dataset_dir: Path | str) -> Manifest:
    """Read and check ``<dataset_dir>/manifest.json``; all problems are reported at once.

    Raises:
        DataError / DataErrors: missing folder or file, bad JSON (with line and column), missing
            or unknown keys, unsupported format, bad channel names or unsafe paths.
    """
    given = Path(dataset_dir)
    file = str(given / MANIFEST_NAME)
    text, doc = _read_manifest_json(given, file)
    problems = _ManifestProblems(file, text)
    for key in doc:
        if key not in _MANIFEST_KEYS:
            close = difflib.get_close_matches(key, _MANIFEST_KEYS, n=1)
            problems.add(
                key,
                key,
                f"unknown key {_show(key)}",
                f"did you mean '{close[0]}'?"
                if close
                else f"use only: {', '.join(_MANIFEST_KEYS)}.",
            )
    for key in ("format", "name", "channels"):
        if key not in doc:
            problems.add(key, None, f"missing required key '{key}'", _manifest_key_hint(key))
    name = doc.get("name")
    if "name" in doc and (not isinstance(name, str) or not name.strip()):
        problems.add("name", name, f"name must be a non-empty string, found {name!r}", "name it.")
    created = doc.get("created")
    if "created" in doc and not isinstance(created, str):
        problems.add(
            "created",
            created,
            f"created must be an ISO-8601 string, found {created!r}",
            'write it like "2024-03-01T12:34:56Z".',
        )
    source = doc.get("source", {})
    if not isinstance(source, dict):
        problems.add(
            "source",
            source,
            f"source must be a JSON object, found {type(source).__name__}",
            'describe the origin as an object, e.g. {"generator": "...", "seed": 0}.',
        )
    root = given.absolute()
    channels = _check_channels(doc.get("channels"), root, problems) if "channels" in doc else {}
    problems.raise_if_any()
    return Manifest(
        path=root / MANIFEST_NAME,
        name=str(name),
        channels=channels,
        source=dict(source),
        created=created,
    )


def _read_manifest_json(given: Path, file: str) -> tuple[str, dict[str, Any]]:
    """The manifest's text and JSON object; problems that stop the reading raise at once."""
    if not given.is_dir():
        raise DataError(
            file=str(given),
            problem="dataset folder not found" if not given.exists() else "not a folder",
            hint=f"pass the folder that holds {MANIFEST_NAME} and the channel folders.",
        )
    try:
        raw = (given / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise DataError(
            file=file,
            problem="manifest not found",
            hint=(
                f"every dataset folder needs a {MANIFEST_NAME} in format '{FORMAT}' (see "
                "fedrec.shared.datasets); write datasets with "
                "fedrec.shared.datasets.write_dataset."
            ),
        ) from None
    except OSError as exc:
        raise DataError(
            file=file, problem=f"cannot read the file ({exc.strerror})", hint="check permissions."
        ) from None
    text = _decode_utf8(raw, file)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = text.split("\n")
        bad_line = lines[exc.lineno - 1].strip() if exc.lineno <= len(lines) else ""
        raise DataError(
            file=file,
            line=exc.lineno,
            value=bad_line,
            problem=f"invalid JSON at column {exc.colno}: {exc.msg}, in {_show(bad_line)}",
            hint="fix the JSON syntax (a trailing comma or a missing quote is the usual cause).",
        ) from None
    if not isinstance(doc, dict):
        raise DataError(
            file=file,
            line=1,
            value=type(doc).__name__,
            problem=f"the manifest must be a JSON object, found {type(doc).__name__}",
            hint='write an object: {"format": "' + FORMAT + '", "name": ..., "channels": {...}}.',
        )
    if "format" in doc and doc["format"] != FORMAT:
        raise DataError(
            file=file,
            line=_json_line(text, "format"),
            column="format",
            value=str(doc["format"]),
            problem=f"unsupported format {_show(str(doc['format']))}",
            hint=f"this version of fedrec reads '{FORMAT}'; convert the dataset or upgrade.",
        )
    return text, doc


class _ManifestProblems:
    """Problems in manifest.json, keyed by dotted JSON path, each with a best-effort line."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self.problems = _Problems()

    def raise_if_any(self) -> None:
        self.problems.raise_if_any()

    def add(self, key: str, value: Any, problem: str, hint: str, *path: str) -> None:
        self.problems.add(
            DataError(
                file=self.file,
                line=_json_line(self.text, *(path or key.split("."))),
                column=key,
                value=None if value is None else str(value),
                problem=problem,
                hint=hint,
            )
        )


def _check_channels(raw: Any, root: Path, problems: _ManifestProblems) -> dict[str, ChannelFiles]:
    if not isinstance(raw, dict) or not raw:
        problems.add(
            "channels", raw, "channels must be a non-empty object", _manifest_key_hint("channels")
        )
        return {}
    channels = {}
    for channel, entry in raw.items():
        where = f"channels.{channel}"
        if not _CHANNEL_RE.fullmatch(channel):
            problems.add(
                where,
                channel,
                f"bad channel name {_show(channel)}",
                "use only letters, digits, '-' and '_'.",
                "channels",
                channel,
            )
        if not isinstance(entry, dict):
            problems.add(
                where,
                entry,
                "a channel entry must be an object",
                _manifest_key_hint("channels"),
                "channels",
                channel,
            )
            continue
        for key in entry:
            if key not in _CHANNEL_KEYS:
                problems.add(
                    f"{where}.{key}",
                    key,
                    f"unknown key {_show(key)}",
                    f"a channel entry has exactly: {', '.join(_CHANNEL_KEYS)}.",
                    "channels",
                    channel,
                    key,
                )
        paths = {}
        for key in _CHANNEL_KEYS:
            if key not in entry:
                problems.add(
                    f"{where}.{key}",
                    None,
                    f"missing required key '{key}'",
                    _manifest_key_hint("channels"),
                    "channels",
                    channel,
                )
            elif not _safe_relative(entry[key]):
                problems.add(
                    f"{where}.{key}",
                    entry[key],
                    f"bad path {entry[key]!r}",
                    "give a relative path with '/' inside the dataset folder (no '..').",
                    "channels",
                    channel,
                    key,
                )
            elif not (root / entry[key]).resolve().is_relative_to(root.resolve()):
                problems.add(
                    f"{where}.{key}",
                    entry[key],
                    f"{entry[key]!r} leads outside the dataset folder (through a symbolic link, "
                    f"to {(root / entry[key]).resolve()})",
                    "copy the file into the dataset folder instead of linking to it.",
                    "channels",
                    channel,
                    key,
                )
            else:
                paths[key] = root / entry[key]
        if len(paths) == 2:
            channels[channel] = ChannelFiles(paths["catalogue"], paths["interactions"])
    return channels


def _manifest_key_hint(key: str) -> str:
    return {
        "format": f'add "format": "{FORMAT}".',
        "name": 'add "name": "<dataset name>".',
        "channels": (
            'add "channels": {"<channel>": {"catalogue": "<channel>/items.csv", '
            '"interactions": "<channel>/interactions.csv"}}.'
        ),
    }[key]


def _channel_files(manifest: Manifest, given: Path, channel: str) -> ChannelFiles:
    if channel not in manifest.channels:
        known = ", ".join(manifest.channels) or "(none)"
        raise DataError(
            file=str(given / MANIFEST_NAME),
            column="channels",
            value=channel,
            problem=f"unknown channel {_show(channel)}; the manifest lists: {known}",
            hint=f"use one of {known}, or add '{channel}' under channels in the manifest.",
        )
    return manifest.channels[channel]


# --------------------------------------------------------------------------------------------
# CSV reading


@dataclass
class _CsvFile:
    """A parsed CSV: all columns as strings, plus what is needed to turn a row into a line."""

    file: str  # as shown in messages
    table: pa.Table
    data: bytes  # without the byte-order mark
    _lines: np.ndarray | None = None

    def line(self, row: int) -> int | None:
        """The 1-based file line where data row ``row`` (0-based, header excluded) starts."""
        if self._lines is None:
            self._lines = _row_lines(self.data)
        if len(self._lines) != self.table.num_rows:  # the two parsers disagree: no line
            return None
        return int(self._lines[row])

    def strings(self, column: str) -> pa.Array:
        return self.table.column(column).combine_chunks()


def _row_lines(data: bytes) -> np.ndarray:
    """Start line of every data row; empty lines are skipped, as the Arrow reader does.

    Only called to report an error, on a file Arrow parsed. In RFC 4180 a line break ends a
    record only outside quotes, that is after an even number of quote characters (an escaped
    ``""`` counts two), so one vectorised pass over line breaks and quotes finds the records.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    breaks = np.flatnonzero(buf == ord("\n"))
    quotes = np.flatnonzero(buf == ord('"'))
    ends = breaks[np.searchsorted(quotes, breaks) % 2 == 0] if len(quotes) else breaks
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(buf)]])
    lengths = ends - starts
    last = buf[np.clip(ends - 1, 0, None)] if len(buf) else np.zeros(len(ends), np.uint8)
    lengths -= (lengths > 0) & (last == ord("\r"))
    lines: np.ndarray = np.searchsorted(breaks, starts[lengths > 0]) + 1
    return lines[1:]  # the header is line 1


def _structure_problems(csv_file: str, text: str, width: int) -> _Problems:
    """Locate rows the Arrow reader rejected: wrong number of fields, broken quoting."""
    problems = _Problems()
    physical = text.split("\n")

    def at(line: int) -> str:
        return physical[line - 1].rstrip("\r") if line <= len(physical) else ""

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        for record in reader:
            if record and start > 1 and len(record) != width:
                fields = f"{len(record)} field" + "s" * (len(record) != 1)
                problems.total += 1
                if len(problems.errors) < MAX_REPORTED:
                    problems.errors.append(
                        DataError(
                            file=csv_file,
                            line=start,
                            value=at(start),
                            problem=(
                                f"row {_show(at(start))} has {fields} but the header has {width}"
                            ),
                            hint=_CSV_QUOTING_HINT,
                        )
                    )
            start = reader.line_num + 1
    except csv.Error as exc:
        problems.add(
            DataError(
                file=csv_file,
                line=start,
                value=at(start),
                problem=f"broken quoting in the row starting {_show(at(start))} ({exc})",
                hint=_CSV_QUOTING_HINT,
            )
        )
    return problems


def _check_header(file: str, header: list[str], expected: tuple[str, ...], extra_hint: str) -> None:
    problems = _Problems()
    seen: set[str] = set()
    for name in header:
        if name in seen:
            problems.add(
                DataError(
                    file=file,
                    line=1,
                    column=name,
                    value=name,
                    problem=f"column {_show(name)} appears twice in the header",
                    hint="keep one column of each name.",
                )
            )
        seen.add(name)
    extra = [h for h in header if h not in expected]
    for name in expected:
        if name not in seen:
            close = difflib.get_close_matches(name, extra, n=1, cutoff=0.6)
            also = f" ({_show(close[0])} looks like a misspelling of it)" if close else ""
            problems.add(
                DataError(
                    file=file,
                    line=1,
                    column=name,
                    value=",".join(header),
                    problem=f"missing column '{name}'{also}",
                    hint=f"the header must name these columns, in any order: {','.join(expected)}.",
                )
            )
    for name in extra:
        problems.add(
            DataError(
                file=file,
                line=1,
                column=name,
                value=name,
                problem=f"unexpected column {_show(name)}",
                hint=extra_hint,
            )
        )
    problems.raise_if_any()


def _read_csv(
    path: Path,
    file: str,
    expected: tuple[str, ...],
    *,
    what: str,
    listed_as: str,
    extra_hint: str,
) -> _CsvFile:
    """Read one CSV with every column as a string, checking structure before values."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            file=file,
            problem="file not found",
            hint=f"the manifest lists it as {listed_as}; restore the file or correct the path.",
        ) from None
    except OSError as exc:
        raise DataError(
            file=file, problem=f"cannot read the file ({exc.strerror})", hint="check permissions."
        ) from None
    end = data.find(b"\n", 0, 1 << 20)
    first = data[: end if end >= 0 else 1 << 20].decode("utf-8", "replace")
    first = first.lstrip(_BOM).rstrip("\r")
    header = next(csv.reader([first]), [])
    text = _decode_utf8(data, file, header)
    if text.startswith(_BOM):
        text, data = text[1:], data[len(_BOM.encode()) :]
    if not text or text.isspace():
        raise DataError(
            file=file,
            line=1,
            value="",
            problem="file is empty (no header row)",
            hint=f"line 1 must be the header: {','.join(expected)}, then one row per {what}.",
        )
    if not first.strip():
        raise DataError(
            file=file,
            line=1,
            value="",
            problem="line 1 is empty",
            hint=f"put the header on line 1: {','.join(expected)}.",
        )
    _check_header(file, header, expected, extra_hint)

    invalid_rows = 0

    def on_invalid(_row: Any) -> str:
        nonlocal invalid_rows
        invalid_rows += 1
        return "skip"

    has_quotes = b'"' in data
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(use_threads=True, block_size=1 << 23),
            parse_options=pcsv.ParseOptions(
                newlines_in_values=has_quotes, invalid_row_handler=on_invalid
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                check_utf8=False,  # decoded above, with a located error
            ),
        )
        parse_error = None
    except pa.ArrowInvalid as exc:
        parse_error = exc
    # An odd number of quotes means one was never closed; Arrow reads on to the end silently.
    if parse_error is not None or invalid_rows or data.count(b'"') % 2:
        problems = _structure_problems(file, text, len(header))
        problems.raise_if_any()
        raise DataError(
            file=file,
            problem=f"cannot parse the file ({parse_error or 'unbalanced quotes'})",
            hint=_CSV_QUOTING_HINT,
        )
    if table.num_rows == 0:
        raise DataError(
            file=file,
            line=2,
            value="",
            problem="no rows below the header",
            hint=f"add one row per {what}, or leave the channel out of the manifest.",
        )
    f = _CsvFile(file=file, table=table, data=data)
    problems = _Problems()
    for column in header:
        values = f.strings(column)
        problems.add_rows(
            np.flatnonzero(pc.binary_length(values).to_numpy() > MAX_CELL_BYTES),
            lambda r, c=column, v=values: DataError(  # type: ignore[misc]
                file=file,
                line=f.line(r),
                column=c,
                value=v[r].as_py()[:40] + "...",
                problem=f"a cell of {len(v[r].as_py().encode()):,} bytes; the limit is "
                f"{MAX_CELL_BYTES:,}",
                hint="shorten it (the item encoder reads the first few hundred words only), or "
                "check that a quote was not left open.",
            ),
        )
    problems.raise_if_any()
    return f


def _blank(values: pa.Array) -> np.ndarray:
    """Rows whose value is empty or only whitespace."""
    trimmed = pc.utf8_trim_whitespace(values)
    return np.flatnonzero(pc.equal(trimmed, "").to_numpy(zero_copy_only=False))


def _report_blank(problems: _Problems, f: _CsvFile, column: str, what: str, hint: str) -> None:
    values = f.strings(column)
    problems.add_rows(
        _blank(values),
        lambda r: DataError(
            file=f.file,
            line=f.line(r),
            column=column,
            value=values[r].as_py(),
            problem=f"{what} is empty ({_show(values[r].as_py())})",
            hint=hint,
        ),
    )


def _as_str(values: pa.Array) -> np.ndarray:
    """A numpy str array; converts each distinct value once (ids and events repeat a lot)."""
    encoded = pc.dictionary_encode(values)
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False).astype(np.str_)
    strings: np.ndarray = uniques[encoded.indices.to_numpy(zero_copy_only=False)]
    return strings


def _as_text(values: pa.Array) -> np.ndarray:
    text: np.ndarray = values.to_numpy(zero_copy_only=False)  # object array of str
    return text


# --------------------------------------------------------------------------------------------
# Catalogue


def load_catalogue(dataset_dir: Path | str, channel: str) -> Catalogue:
    """Load and check one channel's public item catalogue (row ``i`` is item index ``i``).

    Raises:
        DataError / DataErrors: see the module docstring for what is checked.
    """
    manifest = load_manifest(dataset_dir)
    return _load_catalogue(manifest, Path(dataset_dir), channel)


def _display(given: Path, manifest: Manifest, path: Path) -> str:
    try:
        return str(given / path.relative_to(manifest.root))
    except ValueError:
        return str(path)


def _load_catalogue(manifest: Manifest, given: Path, channel: str) -> Catalogue:
    started = time.perf_counter()
    files = _channel_files(manifest, given, channel)
    f = _read_csv(
        files.catalogue,
        _display(given, manifest, files.catalogue),
        ITEM_COLUMNS,
        what="item",
        listed_as=f"channels.{channel}.catalogue",
        extra_hint="remove the column; put extra item facts into attributes as key=value.",
    )
    problems = _Problems()
    _report_blank(problems, f, "item_id", "item id", "give every item a unique, non-empty item_id.")
    _report_blank(problems, f, "title", "title", "give every item a title.")
    item_ids = _as_str(f.strings("item_id"))
    _, first, inverse = np.unique(item_ids, return_index=True, return_inverse=True)
    first_row = first[inverse.reshape(-1)]
    duplicates = np.flatnonzero(first_row != np.arange(len(item_ids)))
    problems.add_rows(
        duplicates,
        lambda r: DataError(
            file=f.file,
            line=f.line(r),
            column="item_id",
            value=str(item_ids[r]),
            problem=(
                f"duplicate item id {_show(str(item_ids[r]))} "
                f"(first seen on line {f.line(int(first_row[r]))})"
            ),
            hint="give every item a unique item_id.",
        ),
    )
    problems.raise_if_any()
    catalogue = Catalogue(
        channel=channel,
        item_ids=item_ids,
        titles=_as_text(f.strings("title")),
        descriptions=_as_text(f.strings("description")),
        categories=_as_str(f.strings("category")),
        attributes=_as_text(f.strings("attributes")),
    )
    logger.debug(
        "catalogue %s: %d items in %.2fs", channel, len(catalogue), time.perf_counter() - started
    )
    return catalogue


# --------------------------------------------------------------------------------------------
# Interactions


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, "chrono-compatible
    low-level date algorithms", days_from_civil)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days: np.ndarray = era * 146_097 + doe - 719_468
    return days


def _ints(values: pa.Array) -> np.ndarray:
    filled = pc.if_else(pc.equal(values, ""), "0", values)
    ints: np.ndarray = pc.cast(filled, pa.int64()).to_numpy(zero_copy_only=False)
    return ints


def parse_timestamps(values: pa.Array | list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds or ISO-8601 (with ``Z`` or ``±hh:mm``) strings to int64 Unix seconds.

    Returns ``(seconds, ok)``: ``seconds[i]`` is meaningful only where ``ok[i]``. Vectorised;
    fractions of a second are dropped (floor), years must have four digits.
    """
    values = pa.array(values, pa.string()) if not isinstance(values, pa.Array) else values
    n = len(values)
    seconds = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    is_int = pc.match_substring_regex(values, _INT_TS_RE).to_numpy(zero_copy_only=False)
    if is_int.any():
        seconds[is_int] = _ints(values.filter(pa.array(is_int)))
        ok[is_int] = True
    rest = np.flatnonzero(~is_int)
    if len(rest):
        seconds[rest], ok[rest] = _parse_iso(values.take(pa.array(rest)))
    ok &= (seconds >= _MIN_TS) & (seconds <= _MAX_TS)
    return seconds, ok


def _parse_iso(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    # Fast path: Arrow's cast agrees with the exact parse below on every string the strict
    # pattern admits, except that it rejects fractions finer than microseconds (then the exact
    # parse runs). The exact parse is also what locates bad values.
    if pc.all(pc.match_substring_regex(values, _ISO_TS_RE)).as_py():
        try:
            micros = values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            return micros.to_numpy() // 1_000_000, np.ones(len(values), dtype=bool)
        except pa.ArrowInvalid:
            pass
    parts = pc.extract_regex(values, _ISO_TS_RE)
    matched = parts.is_valid().to_numpy(zero_copy_only=False)
    g = {name: _ints(parts.field(name)) for name in ("y", "mo", "d", "h", "mi", "s", "oh", "om")}
    sign = np.where(pc.equal(parts.field("sign"), "-").to_numpy(zero_copy_only=False), -1, 1)
    leap = (g["y"] % 4 == 0) & ((g["y"] % 100 != 0) | (g["y"] % 400 == 0))
    month_days = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])
    days_in_month = month_days[np.clip(g["mo"], 1, 12) - 1] + ((g["mo"] == 2) & leap)
    valid = (
        matched
        & (g["mo"] >= 1)
        & (g["mo"] <= 12)
        & (g["d"] >= 1)
        & (g["d"] <= days_in_month)
        & (g["h"] <= 23)
        & (g["mi"] <= 59)
        & (g["s"] <= 59)
        & (g["oh"] <= 23)
        & (g["om"] <= 59)
    )
    local = _days_from_civil(g["y"], g["mo"], g["d"]) * 86_400 + (
        g["h"] * 3600 + g["mi"] * 60 + g["s"]
    )
    return local - sign * (g["oh"] * 3600 + g["om"] * 60), valid


def _timestamp_problem(value: str) -> str:
    """Why one value is not a timestamp; only called for the few values that are reported."""
    shown = _show(value)
    if value != value.strip():
        return f"timestamp {shown} has spaces around it"
    if re.fullmatch(r"-?[0-9]+", value):
        if len(value.lstrip("-")) >= 13:
            return f"timestamp {shown} is too large for Unix seconds (milliseconds?)"
        return f"timestamp {shown} is outside years 0000-9999"
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.]+", value):
        return f"timestamp {shown} has no time zone"
    if re.fullmatch(_ISO_TS_RE, value):
        return f"timestamp {shown} is not a real date or time"
    return f"timestamp {shown} is neither Unix seconds nor ISO-8601"


def _sort_order(users: pa.Array, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order by (user id as a string, timestamp), ties kept in input order.

    Returns ``(order, user_ids)`` with ``user_ids`` the ids as a numpy str array, unsorted.
    """
    encoded = pc.dictionary_encode(users)
    uniques = encoded.dictionary
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[pc.sort_indices(uniques).to_numpy()] = np.arange(len(uniques))
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    codes = rank[indices]
    user_ids = uniques.to_numpy(zero_copy_only=False).astype(np.str_)[indices]
    if len(seconds) == 0:
        return np.zeros(0, dtype=np.int64), user_ids
    low, span = int(seconds.min()), int(seconds.max()) - int(seconds.min()) + 1
    if len(uniques) * span < 2**62:  # one int64 key: a stable argsort is twice as fast as lexsort
        return np.argsort(codes * span + (seconds - low), kind="stable"), user_ids
    return np.lexsort((seconds, codes)), user_ids


def load_interactions(dataset_dir: Path | str, channel: str, catalogue: Catalogue) -> Interactions:
    """Load and check one channel's interactions against its catalogue.

    Returns interactions sorted by (user_id, timestamp, file row); ``item_index`` is the item's
    row in ``catalogue``.

    Raises:
        DataError / DataErrors: see the module docstring for what is checked.
        ValueError: ``catalogue`` belongs to another channel.
    """
    manifest = load_manifest(dataset_dir)
    return _load_interactions(manifest, Path(dataset_dir), channel, catalogue)


def _load_interactions(
    manifest: Manifest, given: Path, channel: str, catalogue: Catalogue
) -> Interactions:
    if catalogue.channel != channel:
        raise ValueError(
            f"catalogue is for channel '{catalogue.channel}', not '{channel}'. "
            "Load the interactions with the catalogue of the same channel."
        )
    started = time.perf_counter()
    files = _channel_files(manifest, given, channel)
    f = _read_csv(
        files.interactions,
        _display(given, manifest, files.interactions),
        INTERACTION_COLUMNS,
        what="interaction",
        listed_as=f"channels.{channel}.interactions",
        extra_hint="remove the column.",
    )
    catalogue_file = _display(given, manifest, files.catalogue)
    problems = _Problems()
    _report_blank(problems, f, "user_id", "user id", "give every interaction its user's id.")
    _report_blank(problems, f, "item_id", "item id", "give every interaction an item id.")

    item_ids = f.strings("item_id")
    index = pc.index_in(item_ids, value_set=pa.array(catalogue.item_ids, pa.string()))
    unknown = pc.and_(pc.is_null(index), pc.not_equal(pc.utf8_trim_whitespace(item_ids), ""))
    known = functools.cache(lambda: set(catalogue.item_ids.tolist()))  # only built to report

    def unknown_item(r: int) -> DataError:
        value = item_ids[r].as_py()
        near = f" (did you mean {_show(value.strip())}?)" if value.strip() in known() else ""
        return DataError(
            file=f.file,
            line=f.line(r),
            column="item_id",
            value=value,
            problem=f"unknown item id {_show(value)}, not in {catalogue_file}{near}",
            hint=f"add the item to {catalogue_file} or remove the interaction.",
        )

    problems.add_rows(np.flatnonzero(unknown.to_numpy(zero_copy_only=False)), unknown_item)

    raw_ts = f.strings("timestamp")
    seconds, ok = parse_timestamps(raw_ts)
    problems.add_rows(
        np.flatnonzero(~ok),
        lambda r: DataError(
            file=f.file,
            line=f.line(r),
            column="timestamp",
            value=raw_ts[r].as_py(),
            problem=_timestamp_problem(raw_ts[r].as_py()),
            hint=(
                "write Unix seconds (1709296496) or ISO-8601 with a zone "
                "(2024-03-01T12:34:56Z or 2024-03-01T14:34:56+02:00)."
            ),
        ),
    )

    events = f.strings("event")
    bad_events = pc.invert(pc.is_in(events, value_set=pa.array(EVENT_TYPES)))

    def unknown_event(r: int) -> DataError:
        value = events[r].as_py()
        close = difflib.get_close_matches(value.strip().lower(), EVENT_TYPES, n=1, cutoff=0.6)
        near = f" (did you mean '{close[0]}'?)" if close else ""
        return DataError(
            file=f.file,
            line=f.line(r),
            column="event",
            value=value,
            problem=f"unknown event {_show(value)}{near}",
            hint=f"use one of: {', '.join(EVENT_TYPES)}.",
        )

    problems.add_rows(np.flatnonzero(bad_events.to_numpy(zero_copy_only=False)), unknown_event)
    problems.raise_if_any()

    order, user_ids = _sort_order(f.strings("user_id"), seconds)
    interactions = Interactions(
        channel=channel,
        user_ids=user_ids[order],
        item_index=index.to_numpy(zero_copy_only=False).astype(np.int64)[order],
        timestamps=seconds[order],
        events=_as_str(events)[order],
        queries=_as_text(f.strings("query").take(pa.array(order))),
    )
    logger.debug(
        "interactions %s: %d rows in %.2fs",
        channel,
        len(interactions),
        time.perf_counter() - started,
    )
    return interactions


def load_channel(dataset_dir: Path | str, channel: str) -> tuple[Catalogue, Interactions]:
    """Load one channel's catalogue and interactions (reading the manifest once)."""
    manifest = load_manifest(dataset_dir)
    catalogue = _load_catalogue(manifest, Path(dataset_dir), channel)
    return catalogue, _load_interactions(manifest, Path(dataset_dir), channel, catalogue)


# --------------------------------------------------------------------------------------------
# Writing datasets


def _check_catalogue_for_write(channel: str, cat: Catalogue) -> None:
    if cat.channel != channel:
        raise ValueError(f"catalogues['{channel}'] is for channel '{cat.channel}'.")
    n = len(cat.item_ids)
    for name in ("titles", "descriptions", "categories", "attributes"):
        if len(getattr(cat, name)) != n:
            raise ValueError(
                f"catalogue '{channel}': {name} has {len(getattr(cat, name))} entries, "
                f"item_ids has {n}."
            )
    if n == 0:
        raise ValueError(f"catalogue '{channel}' is empty; a channel needs at least one item.")
    ids = [str(x) for x in cat.item_ids]
    blank = [i for i, x in enumerate(ids) if not x.strip()]
    if blank:
        raise ValueError(f"catalogue '{channel}': empty item_id at rows {blank[:MAX_REPORTED]}.")
    if len(set(ids)) != n:
        dup = sorted(x for x, count in Counter(ids).items() if count > 1)
        raise ValueError(f"catalogue '{channel}': duplicate item ids {dup[:MAX_REPORTED]}.")
    blank = [i for i, x in enumerate(cat.titles) if not str(x).strip()]
    if blank:
        raise ValueError(f"catalogue '{channel}': empty title at rows {blank[:MAX_REPORTED]}.")


def _check_interactions_for_write(channel: str, inter: Interactions, n_items: int) -> None:
    if inter.channel != channel:
        raise ValueError(f"interactions['{channel}'] is for channel '{inter.channel}'.")
    m = len(inter.user_ids)
    for name in ("item_index", "timestamps", "events", "queries"):
        if len(getattr(inter, name)) != m:
            raise ValueError(
                f"interactions '{channel}': {name} has {len(getattr(inter, name))} entries, "
                f"user_ids has {m}."
            )
    if m == 0:
        raise ValueError(f"interactions '{channel}' are empty; a channel needs at least one.")
    index = np.asarray(inter.item_index)
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"interactions '{channel}': item_index must be integers ({index.dtype}).")
    bad = np.flatnonzero((index < 0) | (index >= n_items))
    if len(bad):
        raise ValueError(
            f"interactions '{channel}': item_index out of range [0, {n_items}) at rows "
            f"{bad[:MAX_REPORTED].tolist()}."
        )
    ts = np.asarray(inter.timestamps)
    if not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"interactions '{channel}': timestamps must be integers ({ts.dtype}).")
    bad = np.flatnonzero((ts < _MIN_TS) | (ts > _MAX_TS))
    if len(bad):
        raise ValueError(
            f"interactions '{channel}': timestamps outside years 0000-9999 at rows "
            f"{bad[:MAX_REPORTED].tolist()}."
        )
    events = pa.array(np.asarray(inter.events, dtype=object), pa.string())
    bad = np.flatnonzero(
        pc.invert(pc.is_in(events, value_set=pa.array(EVENT_TYPES))).to_numpy(zero_copy_only=False)
    )
    if len(bad):
        raise ValueError(
            f"interactions '{channel}': unknown events "
            f"{sorted({str(inter.events[i]) for i in bad[:MAX_REPORTED]})}; "
            f"use one of {', '.join(EVENT_TYPES)}."
        )
    users = pa.array(np.asarray(inter.user_ids, dtype=object), pa.string())
    bad = _blank(users)
    if len(bad):
        raise ValueError(
            f"interactions '{channel}': empty user_id at rows {bad[:MAX_REPORTED].tolist()}."
        )


def _csv_bytes(header: tuple[str, ...], columns: list[Any]) -> bytes:
    text = _csv_text(header, columns, quote_all=False)
    if "\r" in text:  # csv.writer leaves a lone "\r" unquoted when lines end in "\n"
        text = _csv_text(header, columns, quote_all=True)
    return text.encode("utf-8")


def _csv_text(header: tuple[str, ...], columns: list[Any], *, quote_all: bool) -> str:
    buf = io.StringIO()
    if quote_all:
        writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    else:
        writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(zip(*columns, strict=True))
    return buf.getvalue()


def _catalogue_csv(cat: Catalogue) -> bytes:
    columns = [cat.item_ids, cat.titles, cat.descriptions, cat.categories, cat.attributes]
    return _csv_bytes(ITEM_COLUMNS, columns)


def _interactions_csv(inter: Interactions, cat: Catalogue) -> bytes:
    """Rows per user in time order (ties in input order), timestamps as ISO-8601 UTC."""
    users = pa.array(np.asarray(inter.user_ids, dtype=object), pa.string())
    seconds = np.asarray(inter.timestamps, dtype=np.int64)
    order, user_ids = _sort_order(users, seconds)
    columns = [
        user_ids[order],
        np.asarray(cat.item_ids)[np.asarray(inter.item_index)[order]],
        _iso_utc(seconds[order]),
        np.asarray(inter.events)[order],
        np.asarray(inter.queries)[order],
    ]
    return _csv_bytes(INTERACTION_COLUMNS, columns)


def _iso_utc(seconds: np.ndarray) -> np.ndarray:
    stamps = pa.array(seconds, pa.int64()).cast(pa.timestamp("s", tz="UTC"))
    text: np.ndarray = pc.strftime(stamps, format="%Y-%m-%dT%H:%M:%SZ").to_numpy(
        zero_copy_only=False
    )
    return text


def write_dataset(
    out_dir: Path | str,
    *,
    name: str,
    catalogues: Mapping[str, Catalogue],
    interactions: Mapping[str, Interactions],
    source: dict[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a ``fedrec-dataset/1`` folder atomically and return its path.

    Every channel needs both a catalogue and interactions; both are checked first (so that what
    is written always loads). Interactions are written per user in time order, timestamps as
    ISO-8601 UTC. ``extra_files`` maps relative paths (``"ground_truth/users.csv"``) to bytes.

    Raises:
        ValueError: inconsistent or invalid input (nothing is written).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string. Found {name!r}.")
    if set(catalogues) != set(interactions):
        raise ValueError(
            "catalogues and interactions must have the same channels. Found "
            f"{sorted(catalogues)} and {sorted(interactions)}."
        )
    if not catalogues:
        raise ValueError("a dataset needs at least one channel.")
    if not isinstance(source, dict):
        raise ValueError(f"source must be a dict. Found {type(source).__name__}.")
    try:
        json.dumps(source, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"source must be JSON-serialisable ({exc}).") from None

    channel_paths: dict[str, dict[str, str]] = {}
    for channel, cat in catalogues.items():
        if not _CHANNEL_RE.fullmatch(channel):
            raise ValueError(
                f"bad channel name {channel!r}: use only letters, digits, '-' and '_'."
            )
        _check_catalogue_for_write(channel, cat)
        _check_interactions_for_write(channel, interactions[channel], len(cat))
        channel_paths[channel] = {
            "catalogue": f"{channel}/items.csv",
            "interactions": f"{channel}/interactions.csv",
        }
    taken = [MANIFEST_NAME] + [p for paths in channel_paths.values() for p in paths.values()]
    extras: dict[str, bytes] = {}
    for rel, data in (extra_files or {}).items():
        if not _safe_relative(rel):
            raise ValueError(f"extra file path {rel!r} must be relative, with '/' and no '..'.")
        key = PurePosixPath(rel).as_posix()
        if any(key == t or t.startswith(key + "/") or key.startswith(t + "/") for t in taken):
            raise ValueError(f"extra file {rel!r} would overwrite a dataset file.")
        taken.append(key)
        extras[key] = bytes(data)
    manifest = {
        "format": FORMAT,
        "name": name,
        "channels": channel_paths,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
    }

    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # files are fsynced by atomic_dir before the rename

        def put(rel: str, data: bytes) -> None:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        for channel, paths in channel_paths.items():  # one file in memory at a time
            put(paths["catalogue"], _catalogue_csv(catalogues[channel]))
            put(
                paths["interactions"], _interactions_csv(interactions[channel], catalogues[channel])
            )
        for rel, data in extras.items():
            put(rel, data)
        put(MANIFEST_NAME, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return out
