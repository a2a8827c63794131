"""/v1/files: OpenAI's Files API, as far as the Batch API needs it: upload a batch's JSONL input
(purpose `batch`), list and read files, and download a file's content (a batch's output and error files
too). The official `openai` client's `files.create` / `files.retrieve` / `files.list` / `files.content`
work unmodified; errors are OpenAI's shape, as on the completion endpoints.

An upload is checked whole before it is stored: its size (SWITCHYARD_BATCH_MAX_FILE_BYTES, 413 beyond),
its number of requests (SWITCHYARD_BATCH_MAX_LINES) and every line's shape (tasks/batches/lines.py), a
bad file answering 400 with each bad line's number and what to fix. Whether each request body is valid
for the batch's endpoint is checked when the batch is created (api/batches.py).
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import authenticate
from api.openai import OpenAIError
from api.openai import bp as openai_bp
from tasks.batches import lines
from tasks.batches import store
from tasks.batches.resource import FILE_PREFIX, file_resource, parse_id

bp = Blueprint("files", __name__, url_prefix="/v1/files")
bp.before_request(authenticate)

#: room above the file limit for the multipart framing and the form fields
_FORM_OVERHEAD = 64 * 1024
MAX_LIST = 10_000


def use_openai_errors(target: Blueprint) -> None:
    """Answer `target`'s errors in OpenAI's shape: the handlers the completion endpoints use."""
    for by_code in openai_bp.error_handler_spec[None].values():
        for kind, handler in by_code.items():
            target.register_error_handler(kind, handler)


use_openai_errors(bp)


def _services():
    return current_app.extensions["switchyard"]


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"the file is larger than {limit} bytes (SWITCHYARD_BATCH_MAX_FILE_BYTES); split it "
                       "into several batches", "file", "file_too_large")


def _upload(limit: int) -> tuple[bytes, str]:
    """(content, file name) of the multipart upload; OpenAIError naming what to fix."""
    if request.mimetype != "multipart/form-data":
        raise OpenAIError(400, "upload the file as multipart/form-data, with the fields `file` and `purpose`", "file")
    purpose = request.form.get("purpose")
    if purpose is None:
        raise OpenAIError(400, "`purpose` is required: `batch` for a Batch API input file", "purpose")
    if purpose != "batch":
        raise OpenAIError(400, f"purpose {purpose!r} is not supported; this server keeps `batch` files (the Batch "
                          "API's input) only", "purpose")
    unknown = sorted({str(n) for n in request.form} - {"purpose"} | {str(n) for n in request.files} - {"file"})
    if unknown:
        raise OpenAIError(400, f"`{unknown[0]}` is not supported by this server; send `file` and `purpose` only",
                          unknown[0], "unsupported_parameter")
    upload = request.files.get("file")
    if upload is None:
        raise OpenAIError(400, "send the file in a form field named `file`", "file")
    content = upload.read(limit + 1)
    if len(content) > limit:
        raise _too_large(limit)
    return content, upload.filename or "batch.jsonl"


@bp.post("")
def create():
    """Upload a Batch API input file: JSONL, one request a line (multipart `file`, `purpose` = batch)."""
    settings = _services().settings
    limit = settings.batch_max_file_bytes
    request.max_content_length = limit + _FORM_OVERHEAD
    try:
        content, filename = _upload(limit)
    except RequestEntityTooLarge:
        raise _too_large(limit) from None
    try:
        requests_ = lines.parse(content, settings.batch_max_lines)
    except lines.BadFile as exc:
        raise OpenAIError(400, f"the file cannot run as a batch: {exc}", "file", "invalid_batch_file") from None
    with _services().pool.connection() as conn:
        row = store.insert_file(conn, g.tenant.id, filename=filename[:255], purpose="batch", content=content,
                                lines=len(requests_))
    return jsonify(file_resource(row))


def _limit() -> int:
    raw = request.args.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST:
        raise OpenAIError(400, f"`limit` must be an integer from 1 to {MAX_LIST}, got {raw!r}", "limit")
    return int(raw)


def after_arg(prefix: str):
    """The row id `?after=` names (a public id of the previous page's last object); None if not given."""
    raw = request.args.get("after")
    if raw is None:
        return None
    row_id = parse_id(raw, prefix)
    if row_id is None:
        raise OpenAIError(400, f"`after` must be an id from a previous page, got {raw!r}", "after")
    return row_id


def page(rows: list[dict], limit: int, resource) -> Response:
    """OpenAI's cursor page: `data`, `first_id`, `last_id`, `has_more` (rows fetched with limit + 1)."""
    data = [resource(r) for r in rows[:limit]]
    return jsonify(object="list", data=data, first_id=data[0]["id"] if data else None,
                   last_id=data[-1]["id"] if data else None, has_more=len(rows) > limit)


@bp.get("")
def list_():
    """The tenant's files, newest first (`order=asc`: oldest first); `purpose`, `limit`, `after`."""
    limit, order = _limit(), request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, f"`order` must be asc or desc, got {order!r}", "order")
    with _services().pool.connection() as conn:
        rows = store.list_files(conn, g.tenant.id, purpose=request.args.get("purpose"), limit=limit + 1,
                                after=after_arg(FILE_PREFIX), ascending=order == "asc")
    return page(rows, limit, file_resource)


def load_file(public_id: str, *, content: bool = False) -> dict:
    """The caller's file, or 404 (another tenant's file looks exactly like a missing one)."""
    file_id = parse_id(public_id, FILE_PREFIX)
    row = None
    if file_id is not None:
        with _services().pool.connection() as conn:
            row = store.get_file(conn, file_id, g.tenant.id, content=content)
    if row is None:
        raise OpenAIError(404, f"no file {public_id!r}", code="not_found")
    return row


@bp.get("/<file_id>")
def get(file_id: str):
    """A file's File object."""
    return jsonify(file_resource(load_file(file_id)))


@bp.get("/<file_id>/content")
def content(file_id: str):
    """A file's content: a batch input as uploaded, or a batch's output or error file (JSONL)."""
    row = load_file(file_id, content=True)
    name = re.sub(r"[^\w.-]", "_", row["filename"])  # the client named it: nothing that could break the header
    return Response(bytes(row["content"]), mimetype="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
