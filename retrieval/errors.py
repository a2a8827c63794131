"""The retrieval errors, as one small hierarchy: the API maps NotFound to 404, ParseError and
ModelMismatch to 422/409, and the ingest task records a ParseError on the document (never retried)."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base of every error raised by retrieval/."""


class ParseError(RetrievalError):
    """Raised when a document cannot be turned into text; permanent, so ingestion marks it failed."""


class UnsupportedContentType(ParseError):
    """Raised when the file type is not one of .txt, .md, .html, .pdf."""


class EmptyDocument(ParseError):
    """Raised when a document holds no text at all (an empty file, or only markup)."""


class CorruptDocument(ParseError):
    """Raised when a file cannot be read as its type (a broken PDF, text that is not UTF-8)."""


class NoExtractableText(ParseError):
    """Raised when a PDF opens but no page has extractable text (a scan without OCR)."""


class NotFound(RetrievalError):
    """Raised when a collection or document does not exist for this tenant (another tenant's is the same)."""


class CollectionExists(RetrievalError):
    """Raised when a tenant creates a collection under a name it already uses."""


class ModelMismatch(RetrievalError):
    """Raised when a query embedder's model or dimension differs from a collection's: its vectors would be
    compared with vectors from another model, and the scores would mean nothing."""


class IngestionSuperseded(RetrievalError):
    """Raised when a newer ingestion run of the same document took over: this run must stop writing."""
