"""One error type, rendered by one handler as RFC 9457 `application/problem+json`."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from retrieval.errors import CollectionExists, ModelMismatch, NotFound, ParseError, UnsupportedContentType
from tasks.errors import TRANSIENT, QueueUnavailable

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"


class ApiError(Exception):
    """Raised by a view to answer with a problem document; `extra` members are merged into it."""

    def __init__(self, status: int, title: str, detail: str, *, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers, self.extra = status, title, detail, headers or {}, extra


def problem(status: int, title: str, detail: str, headers: dict | None = None, **extra):
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM
    response.headers.update(headers or {})
    return response


def validation_errors(exc: ValidationError) -> list[dict]:
    """pydantic's errors as `{field, message}` pairs a client can act on."""
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field; remove it"
        out.append({"field": field, "message": message})
    return out


def invalid(exc: ValidationError, title: str) -> ApiError:
    """A pydantic error as a 422 problem naming each field to fix."""
    errors = validation_errors(exc)
    return ApiError(422, title, "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return problem(exc.status, exc.title, exc.detail, exc.headers, **exc.extra)

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError):
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem(422, "Invalid job request", detail, errors=errors)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        detail = exc.description or exc.name
        if exc.code == 413:
            detail = f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes; send a smaller body"
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return problem(exc.code or 500, exc.name, detail, headers)

    @app.errorhandler(QueueUnavailable)
    def _queue_unavailable(exc: QueueUnavailable):
        log.warning("job refused: %r", exc.__cause__)
        return problem(503, "Service Unavailable", "the job queue is unreachable; nothing was stored, retry shortly",
                       {"Retry-After": "5"})

    # Retrieval's errors (retrieval/errors.py); another tenant's collection or document is NotFound too.
    retrieval_errors = ((NotFound, 404, "Not Found"), (CollectionExists, 409, "Conflict"),
                        (ModelMismatch, 409, "Embedding model mismatch"),
                        (UnsupportedContentType, 415, "Unsupported Media Type"),
                        (ParseError, 422, "Unreadable document"))
    for kind, status, title in retrieval_errors:
        app.register_error_handler(kind, lambda exc, status=status, title=title: problem(status, title, str(exc)))

    def _unavailable(exc: Exception):
        # redis-py's exceptions repr as their kind alone ("network:ConnectionError"): log the message too.
        log.warning("dependency unavailable: %s: %s", type(exc).__name__, exc)
        return problem(503, "Service Unavailable", "a backing service (Redis or Postgres) is unreachable; retry shortly",
                       {"Retry-After": "5"})

    for kind in TRANSIENT:
        app.register_error_handler(kind, _unavailable)
