"""Search hits to a numbered context block and its citations, within a token budget.

The budget is counted with the generation model's tokenizer (not the embedder's): it is the
generation model's context that must not overflow. Chunks are taken best first; the first one that
does not fit whole is cut at a token boundary if enough room is left to be useful, and the rest are
dropped. Numbering is dense ([1]..[n]) over what was kept, so every marker in the prompt has a citation.
"""

from __future__ import annotations

from dataclasses import dataclass

SNIPPET_CHARS = 200
MIN_TRUNCATED_TOKENS = 32  # a cut chunk shorter than this is more noise than context


@dataclass(frozen=True)
class Citation:
    n: int
    document_id: object
    title: str
    chunk_id: int
    score: float
    snippet: str
    char_start: int
    char_end: int  # of the text actually placed in the context (a truncated chunk ends early)
    truncated: bool = False


@dataclass(frozen=True)
class Context:
    text: str
    citations: list[Citation]
    tokens: int


def _entry(n: int, hit, text: str) -> str:
    return f"[{n}] {hit.title}\n{text}"


def build_context(hits, tokenizer, max_tokens: int, *, separator: str = "\n\n") -> Context:
    """The numbered context for `hits` (best first) in at most `max_tokens` tokens of `tokenizer`."""
    count = _counter(tokenizer)
    parts: list[str] = []
    citations: list[Citation] = []
    for hit in hits:
        n = len(parts) + 1
        so_far = separator.join(parts)
        room = max_tokens - count(so_far + (separator if parts else ""))
        end = len(hit.text)
        if count(_entry(n, hit, hit.text)) > room:
            end = _cut(hit, n, tokenizer, count, room)
            if end is None:
                break
        parts.append(_entry(n, hit, _shown(hit.text, end)))
        citations.append(Citation(n, hit.document_id, hit.title, hit.chunk_id, hit.score,
                                  hit.text[:min(end, SNIPPET_CHARS)], hit.char_start, hit.char_start + end,
                                  end < len(hit.text)))
        if end < len(hit.text):
            break
    # Token counts of joined strings are not always the sum of the parts': check the whole, and drop
    # from the end until it fits, so the budget is never exceeded.
    while parts and count(separator.join(parts)) > max_tokens:
        parts.pop(), citations.pop()
    text = separator.join(parts)
    return Context(text, citations, count(text))


def _shown(text: str, end: int) -> str:
    return text if end >= len(text) else text[:end].rstrip() + " …"


def _counter(tokenizer):
    return lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else 0


def _cut(hit, n: int, tokenizer, count, room: int) -> int | None:
    """Where to cut the chunk (a token boundary) so its entry fits in `room` tokens; None if less
    than MIN_TRUNCATED_TOKENS of text would fit."""
    available = room - count(_entry(n, hit, ""))
    if available < MIN_TRUNCATED_TOKENS:
        return None
    offsets = tokenizer(hit.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = available
    while keep >= MIN_TRUNCATED_TOKENS:
        end = offsets[min(keep, len(offsets)) - 1][1]
        if count(_entry(n, hit, _shown(hit.text, end))) <= room:
            return end
        keep -= max(1, keep // 20)  # joining pieces can re-tokenize into a few more tokens
    return None
