"""The report's document model and its two templates (Markdown, HTML)."""

from __future__ import annotations

import base64
import math

import pytest

from fedrec.audit.document import (
    BulletList,
    Document,
    Image,
    KeyValues,
    Paragraph,
    Section,
    Table,
    VerdictList,
    VerdictRow,
    fmt,
    render_html,
    render_markdown,
)


def _doc() -> Document:
    return Document(
        "Privacy audit: runs/a<b>",
        (
            Paragraph("overall: OK"),
            VerdictList((VerdictRow("pass", "LOGS: intact"), VerdictRow("fail", "EGRESS: x|y"))),
        ),
        (
            Section(
                "Per channel",
                (
                    Table(("channel", "ε"), (("finance", "2.970"), ("a|b", "<1>"))),
                    Image("audit-epsilon.png", "audit-epsilon"),
                ),
            ),
            Section(
                "Privacy statement",
                (Paragraph("one user", lead="Privacy unit."),),
                (
                    Section("Not protected", (BulletList(("timing", "size|count")),)),
                    Section("Mechanism", (KeyValues.of({"sigma": [1.0], "mode": None}),)),
                ),
            ),
        ),
    )


def test_fmt_writes_numbers_for_people() -> None:
    # Execute / Assert: integers as they are, 3 digits by default, ∞ and — for the rest
    assert fmt(3) == "3"
    assert fmt(2.97020371) == "2.970"
    assert fmt(0.25, 4) == "0.2500"
    assert fmt("inf") == "∞" and fmt(-math.inf) == "-∞"
    assert fmt(None) == "—" and fmt(math.nan) == "—" and fmt(True) == "—"


def test_markdown_has_headings_by_depth_and_escapes_cells() -> None:
    # Execute
    md = render_markdown(_doc())

    # Assert
    lines = md.splitlines()
    assert lines[0] == "# Privacy audit: runs/a<b>"
    assert "## Per channel" in lines and "### Not protected" in lines
    assert "- ✅ **LOGS: intact**" in lines
    assert "- ❌ **EGRESS: x\\|y**" in lines  # "|" would end a cell
    assert "| channel | ε |" in lines and "|---|---|" in lines
    assert "| a\\|b | <1> |" in lines
    assert "![audit-epsilon](audit-epsilon.png)" in lines
    assert "**Privacy unit.** one user" in lines
    assert "- size\\|count" in lines
    assert "| sigma | [1.0] |" in lines and "| mode | None |" in lines
    assert md.endswith("| mode | None |\n")


def test_markdown_separates_blocks_by_one_blank_line() -> None:
    # Execute
    md = render_markdown(_doc())

    # Assert
    assert "\n\n\n" not in md
    assert "## Per channel\n\n| channel | ε |" in md


def test_html_is_escaped_and_embeds_only_the_images_given() -> None:
    # Prepare
    png = b"\x89PNG fake"

    # Execute
    with_image = render_html(_doc(), {"audit-epsilon.png": png})
    without = render_html(_doc(), {})

    # Assert
    assert "<title>Privacy audit: runs/a&lt;b&gt;</title>" in with_image
    assert "<td>&lt;1&gt;</td>" in with_image
    assert '<div class="v fail">❌ EGRESS: x|y</div>' in with_image
    assert "<p><b>Privacy unit.</b> one user</p>" in with_image
    assert "<h3>Not protected</h3>" in with_image
    data = base64.b64encode(png).decode()
    assert f'<img alt="audit-epsilon" src="data:image/png;base64,{data}">' in with_image
    assert "<img" not in without


def test_table_rows_must_match_the_header() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="table row 0 has 1 cells for 2 columns"):
        Table(("a", "b"), (("only one",),))
