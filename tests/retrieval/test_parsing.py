"""Parsing each supported type into blocks whose offsets point into the extracted text."""

from __future__ import annotations

import pytest

from retrieval import parsing
from retrieval.errors import CorruptDocument, EmptyDocument, NoExtractableText, UnsupportedContentType
from tests.retrieval.support import make_pdf


def _consistent(doc):
    for block in doc.blocks:
        assert doc.text[block.start:block.end] == block.text


def test_text_paragraphs_with_offsets_into_the_file():
    raw = "First paragraph\nstill first.\n\n\n  Second one.  \n"
    doc = parsing.parse(raw.encode(), parsing.TEXT)
    assert [b.text for b in doc.blocks] == ["First paragraph\nstill first.", "Second one."]
    assert doc.text == raw
    _consistent(doc)


def test_markdown_heading_paths_and_fenced_code():
    raw = ("# Guide\nIntro.\n\n## Install\nRun it.\n```\n# not a heading\n```\n\n### Linux\nUse apt.\n\n"
           "## Use\nCall it.\n")
    doc = parsing.parse(raw.encode(), parsing.MARKDOWN)
    body = {b.text: b.heading_path for b in doc.blocks if b.kind == "paragraph"}
    assert body == {"Intro.": ("Guide",), "Run it.\n```\n# not a heading\n```": ("Guide", "Install"),
                    "Use apt.": ("Guide", "Install", "Linux"), "Call it.": ("Guide", "Use")}
    assert doc.title == "Guide"
    _consistent(doc)
    skipping = _paths("## A\na\n\n### B\nb\n\n## C\nc\n\n# D\nd\n")
    assert skipping == {"a": ("A",), "b": ("A", "B"), "c": ("C",), "d": ("D",)}


def _paths(markdown: str) -> dict:
    doc = parsing.parse(markdown.encode(), parsing.MARKDOWN)
    return {b.text: b.heading_path for b in doc.blocks if b.kind == "paragraph"}


def test_html_headings_paragraphs_items_and_no_script():
    raw = b"""<html><head><title>T</title><style>p {color: red}</style></head><body>
        <h1>Top</h1><p>One <b>bold</b>   word.</p><ul><li>Item <p>nested</p></li><li>Two</li></ul>
        <h2>Sub</h2><p>Under sub.</p><script>alert("no")</script></body></html>"""
    doc = parsing.parse(raw, parsing.HTML)
    assert [(b.kind, b.text, b.heading_path) for b in doc.blocks] == [
        ("heading", "Top", ("Top",)), ("paragraph", "One bold word.", ("Top",)),
        ("paragraph", "Item nested", ("Top",)), ("paragraph", "Two", ("Top",)),
        ("heading", "Sub", ("Top", "Sub")), ("paragraph", "Under sub.", ("Top", "Sub"))]
    assert doc.title == "T" and "alert" not in doc.text and "color" not in doc.text
    _consistent(doc)


def test_pdf_text_per_page():
    data = make_pdf([["The first page speaks of bridges."], [], ["Page three is about lakes."]])
    doc = parsing.parse(data, parsing.PDF)
    assert doc.pages == 3
    assert [(b.page, b.text) for b in doc.blocks] == [(1, "The first page speaks of bridges."),
                                                      (3, "Page three is about lakes.")]
    _consistent(doc)


@pytest.mark.parametrize("data, error", [
    (b"%PDF-1.4\nthis is not really a pdf\n%%EOF", CorruptDocument),
    (make_pdf([[], []]), NoExtractableText),
])
def test_bad_pdfs_raise_typed_errors(data, error):
    with pytest.raises(error):
        parsing.parse(data, parsing.PDF)


def test_empty_unsupported_and_undecodable():
    with pytest.raises(EmptyDocument):
        parsing.parse(b"  \n", parsing.TEXT)
    with pytest.raises(EmptyDocument):
        parsing.parse(b"<html><script>x()</script></html>", parsing.HTML)
    with pytest.raises(CorruptDocument):
        parsing.parse("caf\u00e9".encode("latin-1"), parsing.TEXT)
    with pytest.raises(UnsupportedContentType):
        parsing.content_type_for("report.docx", "application/msword")
    assert parsing.content_type_for("a.MD") == parsing.MARKDOWN
    assert parsing.content_type_for(None, "text/html; charset=utf-8") == parsing.HTML
