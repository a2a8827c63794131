"""/v1/collections/{id}/documents: add a document (JSON text or a file upload), list, get, delete.

Adding stores the document's bytes and publishes its ingest task (tasks/ingest/task.py); the ingest
worker then parses, chunks and embeds it, and the document shows its progress. A request refused with a
4xx stores nothing; a publish the broker refuses removes the stored document again (503).
"""

from __future__ import annotations

import json
import uuid

from flask import Blueprint, current_app, g, jsonify, request, url_for
from pydantic import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from api.auth import authenticate
from api.collections import json_body
from api.errors import ApiError, invalid
from api.schemas import DocumentRequest
from retrieval import store
from retrieval.errors import NotFound
from retrieval.parsing import content_type_for
from tasks.errors import TRANSIENT
from tasks.ingest.task import publish

bp = Blueprint("documents", __name__, url_prefix="/v1/collections/<uuid:collection_id>/documents")
bp.before_request(authenticate)

#: room above the file limit for the multipart framing and the form fields
_FORM_OVERHEAD = 64 * 1024


def _services():
    return current_app.extensions["switchyard"]


def document_resource(row: dict) -> dict:
    return {"id": str(row["id"]), "object": "document", "collection_id": str(row["collection_id"]),
            "title": row["title"], "source_filename": row["source_filename"], "content_type": row["content_type"],
            "metadata": row["metadata"], "status": row["status"], "error": row["error"],
            "chunks_embedded": row["chunks_embedded"], "chunks_total": row["chunks_total"],
            "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat()}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "Document too large", f"the document is larger than {limit} bytes "
                    "(SWITCHYARD_MAX_UPLOAD_BYTES); split it, or send a smaller file")


def _empty() -> ApiError:
    return ApiError(422, "Empty document", "the document is empty; send a file or text with some content",
                    errors=[{"field": "file", "message": "empty"}])


def _from_json(limit: int) -> tuple[bytes, dict]:
    try:
        body = DocumentRequest.model_validate(json_body())
    except ValidationError as exc:
        raise invalid(exc, "Invalid document") from None
    if body.text is None:
        raise ApiError(422, "Invalid document", "text: send the document's `text` (or upload a file as "
                       "multipart/form-data)", errors=[{"field": "text", "message": "required"}])
    content = body.text.encode("utf-8")
    if len(content) > limit:
        raise _too_large(limit)
    return content, {"title": body.title or "untitled", "content_type": body.content_type, "metadata": body.metadata}


def _from_upload(limit: int) -> tuple[bytes, dict]:
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(422, "Invalid document", "send the document in a form field named `file`",
                       errors=[{"field": "file", "message": "required"}])
    unknown = set(request.form) - {"title", "metadata"}
    if unknown or len(request.files) > 1:
        names = sorted(unknown | (set(request.files) - {"file"}))
        raise ApiError(422, "Invalid document", f"unknown form fields {names}; send `file`, `title`, `metadata`",
                       errors=[{"field": n, "message": "unknown field; remove it"} for n in names])
    content_type = content_type_for(upload.filename, upload.mimetype)  # UnsupportedContentType: 415
    content = upload.read(limit + 1)
    if len(content) > limit:
        raise _too_large(limit)
    if not content.strip():
        raise _empty()
    fields = {"title": request.form.get("title") or upload.filename or "untitled"}
    if "metadata" in request.form:
        try:
            fields["metadata"] = json.loads(request.form["metadata"])
        except ValueError:
            raise ApiError(422, "Invalid document", "metadata: must be a JSON object",
                           errors=[{"field": "metadata", "message": "not JSON"}]) from None
    try:
        body = DocumentRequest.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc, "Invalid document") from None
    return content, {"title": body.title, "content_type": content_type, "metadata": body.metadata,
                     "source_filename": upload.filename}


def _read_document() -> tuple[bytes, dict]:
    """(content, fields) from a JSON body or a multipart upload; 4xx problems for anything else."""
    limit = _services().settings.max_upload_bytes
    request.max_content_length = limit + _FORM_OVERHEAD
    try:
        if request.mimetype == "multipart/form-data":
            return _from_upload(limit)
        if request.is_json:
            return _from_json(limit)
    except RequestEntityTooLarge:
        raise _too_large(limit) from None
    raise ApiError(415, "Unsupported Media Type", "send the document as JSON (`title`, `text`, `content_type`, "
                   "`metadata`) or as a multipart/form-data upload with a `file` field (.txt, .md, .html, .pdf)")


@bp.post("")
def add(collection_id: uuid.UUID):
    services = _services()
    content, fields = _read_document()
    with services.pool.connection() as conn:
        row, created = store.add_document(conn, g.tenant.id, collection_id, content, **fields)
        if created:
            try:
                publish(services.celery, row)
            except TRANSIENT as exc:
                store.delete_document(conn, g.tenant.id, row["id"])
                raise ApiError(503, "Service Unavailable", "the ingest queue is unreachable; nothing was stored, "
                               "retry shortly", headers={"Retry-After": "5"}) from exc
    response = jsonify(document_resource(row))
    response.status_code = 202 if created else 200
    response.headers["Location"] = url_for("documents.get", collection_id=collection_id, document_id=row["id"])
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("")
def list_(collection_id: uuid.UUID):
    with _services().pool.connection() as conn:
        store.get_collections(conn, g.tenant.id, [collection_id])  # NotFound for another tenant's
        rows = store.list_documents(conn, g.tenant.id, collection_id)
    return jsonify(object="list", data=[document_resource(r) for r in rows])


def _load(conn, collection_id: uuid.UUID, document_id: uuid.UUID) -> dict:
    row = store.get_document(conn, g.tenant.id, document_id)
    if row["collection_id"] != collection_id:
        raise NotFound(f"no document {document_id} in collection {collection_id}")
    return row


@bp.get("/<uuid:document_id>")
def get(collection_id: uuid.UUID, document_id: uuid.UUID):
    with _services().pool.connection() as conn:
        return jsonify(document_resource(_load(conn, collection_id, document_id)))


@bp.delete("/<uuid:document_id>")
def delete(collection_id: uuid.UUID, document_id: uuid.UUID):
    with _services().pool.connection() as conn:
        _load(conn, collection_id, document_id)
        store.delete_document(conn, g.tenant.id, document_id)
    return "", 204
