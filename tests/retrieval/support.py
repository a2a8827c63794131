"""Test helpers for retrieval: a PDF written with pypdf alone, and retrieval-quality metrics."""

from __future__ import annotations

import io
import math


def make_pdf(pages: list[list[str]]) -> bytes:
    """A PDF with one page per entry, each line drawn in Helvetica; pages with no lines have no text."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    font_ref = writer._add_object(font)
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
        ops = "BT /F1 11 Tf 14 TL 72 720 Td " + " ".join(f"({t}) Tj T*" for t in escaped) + " ET"
        stream = DecodedStreamObject()
        stream.set_data(ops.encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font_ref})})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def recall_at(relevant: list[bool], k: int) -> float:
    """1 if a relevant chunk is among the first k (each question has one answering passage)."""
    return float(any(relevant[:k]))


def reciprocal_rank(relevant: list[bool]) -> float:
    return next((1.0 / i for i, r in enumerate(relevant, start=1) if r), 0.0)


def ndcg_at(relevant: list[bool], k: int, total_relevant: int) -> float:
    """Binary-gain nDCG: chunks that contain the passage count 1 (more than one when chunks overlap);
    the ideal ranking puts all `total_relevant` of them first."""
    dcg = sum(1.0 / math.log2(i + 1) for i, r in enumerate(relevant[:k], start=1) if r)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(k, total_relevant) + 1))
    return dcg / ideal if ideal else 0.0
