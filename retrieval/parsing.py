"""Documents to text blocks: .txt, .md, .html (BeautifulSoup) and .pdf (pypdf).

Every parser returns the document's extracted text and its blocks; a block's `start`/`end` index into
that text, so a chunk's offsets can always be mapped back to what the reader sees. For .txt and .md the
extracted text is the file itself; for HTML and PDF it is the blocks (pages) joined by blank lines.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import PurePath

from retrieval.errors import CorruptDocument, EmptyDocument, NoExtractableText, UnsupportedContentType

TEXT, MARKDOWN, HTML, PDF = "text/plain", "text/markdown", "text/html", "application/pdf"
CONTENT_TYPES = {".txt": TEXT, ".text": TEXT, ".md": MARKDOWN, ".markdown": MARKDOWN,
                 ".html": HTML, ".htm": HTML, ".pdf": PDF}
_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
_HTML_BLOCKS = ("p", "li", "pre", "blockquote", "td", "th", "dt", "dd", "figcaption")
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t#]*$")
_PARAGRAPH = re.compile(r"\S(?:.*\S)?(?:\n[ \t]*\S.*)*")  # non-blank lines up to a blank line


@dataclass(frozen=True)
class Block:
    """A heading, paragraph or list item: its text is exactly `document.text[start:end]`."""

    text: str
    start: int
    end: int
    heading_path: tuple[str, ...] = ()
    page: int | None = None  # 1-based, PDFs only
    kind: str = "paragraph"  # or "heading"


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    blocks: list[Block]
    content_type: str
    title: str | None = None
    pages: int | None = None
    warnings: list[str] = field(default_factory=list)


def content_type_for(filename: str | None, declared: str | None = None) -> str:
    """The content type from the file's extension, else the declared one; unknown types are refused."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in CONTENT_TYPES:
        return CONTENT_TYPES[suffix]
    base = (declared or "").split(";")[0].strip().lower()
    if base in CONTENT_TYPES.values():
        return base
    raise UnsupportedContentType(f"unsupported file type {suffix or base or 'unknown'!r}: "
                                 "use .txt, .md, .html or .pdf")


def parse(data: bytes, content_type: str) -> ParsedDocument:
    """Parse `data` as `content_type`; raises a ParseError subclass saying why it cannot."""
    parsers = {TEXT: parse_text, MARKDOWN: parse_markdown, HTML: parse_html, PDF: parse_pdf}
    if content_type not in parsers:
        raise UnsupportedContentType(f"unsupported content type {content_type!r}")
    if not data.strip():
        raise EmptyDocument("the document is empty")
    doc = parsers[content_type](data)
    if not doc.blocks:
        raise EmptyDocument("the document has no text")
    return doc


class _HeadingPath:
    """The open headings: a heading closes every open one of its level or deeper, so a document that
    skips levels (## straight after #, or no # at all) still gets the path a reader sees."""

    def __init__(self):
        self._open: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> None:
        while self._open and self._open[-1][0] >= level:
            self._open.pop()
        self._open.append((level, title))

    @property
    def titles(self) -> tuple[str, ...]:
        return tuple(title for _, title in self._open)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorruptDocument(f"not UTF-8 text (byte {e.start})") from e


def _paragraphs(text: str, offset: int, **block) -> list[Block]:
    return [Block(m.group(), offset + m.start(), offset + m.end(), **block)
            for m in _PARAGRAPH.finditer(text)]


def parse_text(data: bytes) -> ParsedDocument:
    text = _decode(data)
    return ParsedDocument(text, _paragraphs(text, 0), TEXT)


def parse_markdown(data: bytes) -> ParsedDocument:
    """ATX headings (`#` … `######`) open sections; fenced code never holds headings."""
    text = _decode(data)
    blocks: list[Block] = []
    path = _HeadingPath()
    body_start, pos, fenced = 0, 0, False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
        match = None if fenced else _MD_HEADING.match(line.rstrip("\r\n"))
        if match:
            blocks += _paragraphs(text[body_start:pos], body_start, heading_path=path.titles)
            title = match.group(2)
            path.enter(len(match.group(1)), title)
            start = pos + line.index(title) if title else pos
            blocks.append(Block(title, start, start + len(title), path.titles, kind="heading"))
            body_start = pos + len(line)
        pos += len(line)
    blocks += _paragraphs(text[body_start:], body_start, heading_path=path.titles)
    title = next((b.text for b in blocks if b.kind == "heading"), None)
    return ParsedDocument(text, [b for b in blocks if b.text], MARKDOWN, title=title)


def parse_html(data: bytes) -> ParsedDocument:
    """Headings h1–h6, paragraphs, list items and cells, in document order; script/style are dropped.
    A block nested in another block (a <p> inside an <li>) is read once, as part of the outer one."""
    from bs4 import BeautifulSoup  # imported here: parsing is an ingestion-time cost only

    soup = BeautifulSoup(data, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else None
    for hidden in soup(["head", "script", "style", "noscript", "template"]):
        hidden.decompose()
    parts: list[str] = []
    blocks: list[Block] = []
    path = _HeadingPath()
    pos = 0
    for el in soup.find_all(_HEADINGS + _HTML_BLOCKS):
        if el.name not in _HEADINGS and el.find_parent(_HTML_BLOCKS):
            continue
        text = " ".join(el.get_text(" ", strip=True).split())
        if not text:
            continue
        if el.name in _HEADINGS:
            path.enter(int(el.name[1]), text)
        if parts:
            pos += 2  # the blank line joining blocks
        kind = "heading" if el.name in _HEADINGS else "paragraph"
        blocks.append(Block(text, pos, pos + len(text), path.titles, kind=kind))
        parts.append(text)
        pos += len(text)
    return ParsedDocument("\n\n".join(parts), blocks, HTML, title=title)


def parse_pdf(data: bytes) -> ParsedDocument:
    """Text per page with pypdf; paragraphs are split at blank lines where the PDF has them."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise CorruptDocument("the PDF is encrypted")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as e:
        # pypdf reports broken files with its own errors, and with plain ones from deep inside.
        raise CorruptDocument(f"corrupt PDF: {e}") from e
    if not any(pages):
        raise NoExtractableText(f"no extractable text in {len(pages)} page(s) (a scan needs OCR first)")
    blocks: list[Block] = []
    texts, pos = [], 0
    for number, page_text in enumerate(pages, start=1):
        blocks += _paragraphs(page_text, pos, page=number)
        texts.append(page_text)
        pos += len(page_text) + 2
    return ParsedDocument("\n\n".join(texts), blocks, PDF, pages=len(pages))
