"""A batch input file: JSONL, one request a line, `{"custom_id", "method": "POST", "url", "body"}`, as
OpenAI's Batch API reads it.

parse() reads the whole file and reports every bad line it finds (up to MAX_ERRORS), each by its line
number as an editor shows it (1-based, blank lines counted), so a client fixes a file in one round trip.
It checks the file's shape only; whether each body is a valid request for the batch's endpoint is the
API's to say (api/batches.py runs the endpoint's own validation on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: the endpoints a batch may run, as a line's `url` names them
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
FIELDS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID = 512
MAX_ERRORS = 100


@dataclass(frozen=True)
class Line:
    number: int
    custom_id: str
    url: str
    body: dict


@dataclass(frozen=True)
class LineError:
    """One problem, in the shape of OpenAI's batch `errors.data` entries."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_json(self) -> dict:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


class BadFile(Exception):
    """Raised when a batch file cannot run as it is; `errors` says what to fix, line by line."""

    def __init__(self, errors: list[LineError], more: int = 0):
        self.errors, self.more = errors, more
        shown = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in errors[:10])
        left = len(errors) - 10 + more
        super().__init__(shown + (f"; and {left} more" if left > 0 else ""))


def parse(content: bytes, max_lines: int) -> list[Line]:
    """The file's requests, in order; BadFile naming every bad line (and too many lines, or none)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[:exc.start].count(b"\n") + 1
        raise BadFile([LineError(line, "invalid_encoding", "the file is not UTF-8 text (a byte that is not UTF-8 "
                                 "is on this line); save it as UTF-8 JSONL")]) from None
    numbered = [(n, raw) for n, raw in enumerate(text.split("\n"), 1) if raw.strip()]
    if not numbered:
        raise BadFile([LineError(None, "empty_file", "the file holds no requests; write one JSON object per line")])
    if len(numbered) > max_lines:
        raise BadFile([LineError(None, "too_many_requests", f"the file holds {len(numbered)} requests; a batch may "
                                 f"hold at most {max_lines}: split it into several batches")])
    out, errors, seen = [], [], {}
    for number, raw in numbered:
        line = _line(number, raw, seen)
        if isinstance(line, LineError):
            errors.append(line)
        else:
            out.append(line)
    if errors:
        raise BadFile(errors[:MAX_ERRORS], more=max(0, len(errors) - MAX_ERRORS))
    return out


def _line(number: int, raw: str, seen: dict[str, int]) -> Line | LineError:
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return LineError(number, "invalid_json_line", f"not valid JSON ({exc}); each line must be one JSON object "
                         '{"custom_id", "method", "url", "body"}')
    if not isinstance(item, dict):
        return LineError(number, "invalid_json_line", 'must be a JSON object {"custom_id", "method", "url", "body"}')
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        return LineError(number, "invalid_request", f"unknown field `{unknown[0]}`; a line holds only custom_id, "
                         "method, url and body", unknown[0])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        return LineError(number, "missing_custom_id", "`custom_id` must be a non-empty string naming the request",
                         "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID or "\x00" in custom_id:
        return LineError(number, "invalid_custom_id", f"`custom_id` must be at most {MAX_CUSTOM_ID} characters, "
                         "without NUL", "custom_id")
    if custom_id in seen:
        return LineError(number, "duplicate_custom_id", f"custom_id {custom_id!r} is already used on line "
                         f"{seen[custom_id]}; each request needs its own", "custom_id")
    seen[custom_id] = number
    if item.get("method") != "POST":
        return LineError(number, "invalid_method", f"`method` must be \"POST\", got {item.get('method')!r}", "method")
    url = item.get("url")
    if url not in ENDPOINTS:
        return LineError(number, "invalid_url", f"`url` {url!r} is not served in a batch; use one of "
                         f"{', '.join(ENDPOINTS)}", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_request", "`body` must be a JSON object: the request as the endpoint "
                         "takes it", "body")
    return Line(number, custom_id, url, body)
