"""The retrieval benchmark's documents (ops/rag_bench.py): synthetic, made offline from the project's
own prose.

The shipped corpus (tests/data/corpus, 32 short documents) holds about a hundred sentences, far from
100 000 chunks, and nothing may be downloaded. So the sentences come from the project's own prose: that
corpus, README.md, and the docstrings and comments of its Python modules and migrations (tests
included), each split into sentences and kept when it reads as prose (six words or more, mostly
letters, ending in . ! or ?). A synthetic document is Markdown: a title and 3–6 sections, each headed by
a heading of the corpus or README, of 2–4 paragraphs of 2–5 sentences. Within a document no sentence
repeats, and each sentence comes with even odds from the document's theme (one source file, so that
chunks stay roughly on one topic) or from the whole pool. A seeded RNG makes the same documents in
every run of one commit (the pool changes when the prose does).
"""

from __future__ import annotations

import ast
import io
import random
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

from ops.processes import ROOT
from retrieval import parsing

#: where the prose comes from: documents, then modules whose docstrings and comments are read
CORPUS = ROOT / "tests" / "data" / "corpus"
DOCUMENTS = [ROOT / "README.md"]
CODE = ["api", "tasks", "workers", "retrieval", "ops", "migrations", "tests"]
# Sentences end at . ! or ? followed by a space, as the chunker (retrieval/chunking.py) splits them.
_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s)|$)", re.S)
_ENDED = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class Pool:
    """Distinct sentences and headings (sorted, so a seeded RNG picks the same ones every run), and
    for each source file the indices of its sentences (a document's theme)."""

    sentences: list[str]
    headings: list[str]
    themes: list[list[int]]


def prose_sentences(text: str) -> list[str]:
    """The sentences of a block of prose that read as prose: six words or more, mostly letters, ended
    by . ! or ?, and nothing Markdown would read as a heading or a code fence."""
    out = []
    for m in _SENTENCE.finditer(" ".join(text.split())):
        s = m.group().strip().lstrip("-* ").strip()
        letters = sum(c.isalpha() or c == " " for c in s)
        if (len(s.split()) >= 6 and letters >= 0.8 * len(s) and _ENDED.search(s)
                and not s.startswith(("#", "|", ">")) and "```" not in s and "~~~" not in s):
            out.append(s)
    return out


def _document_prose(path: Path) -> tuple[list[str], list[str]]:
    doc = parsing.parse(path.read_bytes(), parsing.content_type_for(path.name))
    headings = [b.text for b in doc.blocks if b.kind == "heading"]
    sentences = [s for b in doc.blocks if b.kind != "heading" for s in prose_sentences(b.text)]
    return sentences, headings


def _code_prose(path: Path) -> list[str]:
    """Docstrings, and runs of consecutive comment lines, of a Python module; `--` comments of SQL."""
    source = path.read_text()
    if path.suffix == ".sql":
        return prose_sentences("\n".join(line.strip()[2:] for line in source.splitlines()
                                         if line.strip().startswith("--")))
    texts = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    run: list[str] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            run.append(tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and run:
            texts.append(" ".join(run))
            run = []
    return [s for text in texts for paragraph in re.split(r"\n\s*\n", text)
            for s in prose_sentences(paragraph)]


def load_pool() -> Pool:
    per_source: list[list[str]] = []
    headings: set[str] = set()
    for path in sorted(CORPUS.iterdir()) + DOCUMENTS:
        sentences, heads = _document_prose(path)
        per_source.append(sentences)
        headings.update(h for h in heads if len(h) <= 80)
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")) + sorted((ROOT / package).rglob("*.sql")):
            per_source.append(_code_prose(path))
    sentences = sorted({s for source in per_source for s in source})
    index = {s: i for i, s in enumerate(sentences)}
    themes = [sorted({index[s] for s in source}) for source in per_source]
    return Pool(sentences, sorted(headings), [t for t in themes if len(t) >= 8])


def synth_document(rng: random.Random, pool: Pool) -> tuple[str, bytes]:
    """(title, Markdown bytes) of one synthetic document."""
    theme = list(rng.choice(pool.themes))
    rng.shuffle(theme)
    used: set[int] = set()

    def sentence() -> str:
        while True:
            i = theme.pop() if theme and rng.random() < 0.5 else rng.randrange(len(pool.sentences))
            if i not in used:
                used.add(i)
                return pool.sentences[i]

    title = rng.choice(pool.headings)
    parts = [f"# {title}"]
    for _ in range(rng.randint(3, 6)):
        parts.append(f"## {rng.choice(pool.headings)}")
        parts += [" ".join(sentence() for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 4))]
    return title, ("\n\n".join(parts) + "\n").encode()

