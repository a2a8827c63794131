"""Blocks to chunks that follow the document's structure within the embedding model's token budget.

A chunk never crosses a heading or a PDF page, so it has one heading path and one page. Within a
section, paragraphs are packed whole while they fit; a paragraph too long for the budget is cut at
sentence ends, and a sentence too long is cut into token windows. Consecutive chunks of one section
share up to `overlap` tokens of whole pieces (sentences or paragraphs), so a fact cut by a boundary is
still whole in one of them. Budgets are counted by the embedding model's own tokenizer, on the exact
text that is embedded (heading path prefix, [CLS] and [SEP] included): all-MiniLM-L6-v2 reads only 256
word pieces and silently ignores the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby

from retrieval.parsing import Block, ParsedDocument

DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 32
_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s)|$)", re.S)


@dataclass(frozen=True)
class Chunk:
    """`text` is exactly `document.text[char_start:char_end]`; `embed_text` is what the model reads
    (the heading path, then the text)."""

    ordinal: int
    text: str
    char_start: int
    char_end: int
    heading_path: tuple[str, ...]
    page: int | None
    embed_text: str
    tokens: int


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    tokens: int


def chunk_document(doc: ParsedDocument, tokenizer, *, max_tokens: int = DEFAULT_CHUNK_TOKENS,
                   overlap: int = DEFAULT_OVERLAP_TOKENS) -> list[Chunk]:
    """Chunks of `doc`, in document order. `tokenizer` is the embedding model's (a Hugging Face fast
    tokenizer); `max_tokens` counts everything the model reads, specials included."""
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError("overlap must be at least 0 and under half the chunk budget")
    counter = _Counter(tokenizer)
    chunks: list[Chunk] = []
    body = [b for b in doc.blocks if b.kind != "heading"]
    for (path, page), section in groupby(body, key=lambda b: (b.heading_path, b.page)):
        prefix = _prefix(path, counter, max_tokens)
        budget = max_tokens - counter.specials - counter.count(prefix)
        pieces = [p for block in section for p in _pieces(doc.text, block, counter, budget, overlap)]
        for start, end in _pack(doc.text, pieces, counter, budget, overlap):
            text = doc.text[start:end]
            embed_text = prefix + text
            chunks.append(Chunk(len(chunks), text, start, end, path, page, embed_text,
                                counter.count(embed_text) + counter.specials))
    return chunks


class _Counter:
    """Token counts without specials; `specials` is what [CLS] … [SEP] add to every input."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = len(tokenizer("", add_special_tokens=True)["input_ids"])

    def count(self, text: str) -> int:
        # verbose=False: counting a text longer than the model reads is the point, not a mistake
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) if text else 0

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                              verbose=False)["offset_mapping"]


def _prefix(path: tuple[str, ...], counter: _Counter, max_tokens: int) -> str:
    """The heading path the model reads before the text; dropped from the top when it would take
    more than a quarter of the budget."""
    for i in range(len(path)):
        prefix = " > ".join(path[i:]) + "\n"
        if counter.count(prefix) <= max_tokens // 4:
            return prefix
    return ""


def _pieces(text: str, block: Block, counter: _Counter, budget: int, overlap: int) -> list[_Piece]:
    """The block whole if it fits, else its sentences, each cut into token windows if needed."""
    tokens = counter.count(block.text)
    if tokens <= budget:
        return [_Piece(block.start, block.end, tokens)]
    out = []
    for m in _SENTENCE.finditer(block.text):
        start, end = block.start + m.start(), block.start + m.end()
        n = counter.count(text[start:end])
        out += [_Piece(start, end, n)] if n <= budget else _windows(text, start, end, counter, budget, overlap)
    return out


def _windows(text: str, start: int, end: int, counter: _Counter, budget: int, overlap: int) -> list[_Piece]:
    """Token windows of `budget` tokens over one over-long sentence, `overlap` tokens apart."""
    offsets = counter.offsets(text[start:end])
    size = budget - 2  # re-tokenizing a cut span can add a piece or two at its edges
    out, i = [], 0
    while True:
        j = min(i + size, len(offsets))
        s, e = start + offsets[i][0], start + offsets[j - 1][1]
        out.append(_Piece(s, e, counter.count(text[s:e])))
        if j == len(offsets):
            return out
        i = j - overlap if overlap else j


def _pack(text: str, pieces: list[_Piece], counter: _Counter, budget: int, overlap: int):
    """(start, end) spans of whole consecutive pieces within `budget`; the next span starts with the
    trailing pieces of the previous one that fit in `overlap` tokens."""
    i = 0
    while i < len(pieces):
        j = i + 1
        while j < len(pieces) and counter.count(text[pieces[i].start:pieces[j].end]) <= budget:
            j += 1
        yield pieces[i].start, pieces[j - 1].end
        if j == len(pieces):
            return
        back = j
        while back - 1 > i and counter.count(text[pieces[back - 1].start:pieces[j - 1].end]) <= overlap:
            back -= 1
        i = back
