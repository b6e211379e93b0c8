"""The audit report as a document: a small typed model, rendered by two Jinja2 templates.

Owns: the blocks a report is made of (:class:`Paragraph`, :class:`BulletList`, :class:`Table`,
:class:`KeyValues`, :class:`Image`, :class:`VerdictList`), grouped into :class:`Section` s of
one :class:`Document`; :func:`fmt`, how a number is written for people; and the two renderings,
``templates/audit.md.j2`` and ``templates/audit.html.j2``. The HTML template is autoescaped and
embeds the images as base64 ``data:`` URIs; the Markdown template escapes ``|`` in list items
and table cells (the ``cell`` filter) and links the images by file name.

Must not: know what an audit checks (:mod:`.report` builds the document); read or write files.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import jinja2

from .accounting import as_float

MARKDOWN_TEMPLATE = "audit.md.j2"
HTML_TEMPLATE = "audit.html.j2"
ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skip": "➖"}


def num(x: object) -> float | None:
    """A number from the report (where ∞ is the string "inf"); ``None`` if it is none."""
    return as_float(x)


def fmt(x: object, digits: int = 3) -> str:
    """A number for people: integers as they are, ∞ for infinity, — for unknown."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    v = num(x)
    if v is None or math.isnan(v):
        return "—"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return f"{v:.{digits}f}"


@dataclass(frozen=True)
class Paragraph:
    """Running text; ``lead``, if any, is set in bold before it."""

    kind: ClassVar[str] = "paragraph"
    text: str
    lead: str = ""


@dataclass(frozen=True)
class BulletList:
    kind: ClassVar[str] = "bullets"
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table with a header row; every row has one cell per header column."""

    kind: ClassVar[str] = "table"
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(
                    f"table row {i} has {len(row)} cells for {len(self.header)} columns: {row!r}"
                )


@dataclass(frozen=True)
class KeyValues:
    """A two-column table of settings; values are already text (see :meth:`of`)."""

    kind: ClassVar[str] = "keyvalues"
    rows: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, values: Mapping[str, object]) -> KeyValues:
        """Mappings and lists as compact JSON, everything else as ``str`` (``None`` stays
        "None", as in the run config)."""
        return cls(tuple((str(k), _value_text(v)) for k, v in values.items()))


def _value_text(v: object) -> str:
    if isinstance(v, Mapping | list):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


@dataclass(frozen=True)
class Image:
    """A figure: ``name`` is its PNG file name beside the Markdown, ``alt`` its alt text."""

    kind: ClassVar[str] = "image"
    name: str
    alt: str


@dataclass(frozen=True)
class VerdictRow:
    status: str  # pass, warn, fail or skip
    line: str

    @property
    def icon(self) -> str:
        return ICON[self.status]


@dataclass(frozen=True)
class VerdictList:
    """The verdicts, one highlighted line each."""

    kind: ClassVar[str] = "verdicts"
    rows: tuple[VerdictRow, ...]


Block = Paragraph | BulletList | Table | KeyValues | Image | VerdictList


@dataclass(frozen=True)
class Section:
    """A titled part: its own blocks, then its subsections (one heading level down)."""

    title: str
    blocks: tuple[Block, ...] = ()
    subsections: tuple[Section, ...] = ()


@dataclass(frozen=True)
class Document:
    """A title, the blocks right under it, then the sections."""

    title: str
    blocks: tuple[Block, ...]
    sections: tuple[Section, ...]


def markdown_cell(text: object) -> str:
    """Text safe inside a Markdown table cell or list item: ``|`` escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fedrec.audit", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["cell"] = markdown_cell
    return env


def render_markdown(doc: Document) -> str:
    """The document as Markdown; images are linked by file name."""
    text = _environment().get_template(MARKDOWN_TEMPLATE).render(doc=doc)
    return text.rstrip("\n") + "\n"  # every block ends with a blank line; the file does not


def render_html(doc: Document, images: Mapping[str, bytes]) -> str:
    """The document as one self-contained HTML page: inline CSS, images as base64 PNG.

    An :class:`Image` whose name is not in ``images`` is left out.
    """
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in images.items()}
    return _environment().get_template(HTML_TEMPLATE).render(doc=doc, images=encoded)
