"""/v1/collections: a tenant's retrieval collections (create, list, get, delete) and their search.

Documents are in api/documents.py. Another tenant's collection answers 404 exactly like a missing one:
every store call names the tenant (retrieval/store.py), and NotFound is rendered by api/errors.py.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from flask import Blueprint, current_app, g, jsonify, request, url_for
from pydantic import ValidationError

from api.auth import authenticate
from api.errors import ApiError, invalid
from api.schemas import CollectionRequest, SearchParams
from retrieval import search as retrieval_search
from retrieval import store
from tasks import metrics

bp = Blueprint("collections", __name__, url_prefix="/v1/collections")
bp.before_request(authenticate)


def _services():
    return current_app.extensions["switchyard"]


def collection_resource(collection: store.Collection) -> dict:
    return {"id": str(collection.id), "object": "collection", "name": collection.name,
            "embedding_model": collection.embedding_model, "embedding_dim": collection.embedding_dim,
            "hnsw": {"m": collection.hnsw_m, "ef_construction": collection.hnsw_ef_construction},
            "metadata": collection.metadata}


def json_body() -> dict:
    """The request's JSON object, or a 400/415 problem."""
    if not request.is_json:
        raise ApiError(415, "Unsupported Media Type", "send JSON with `Content-Type: application/json`")
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "Malformed JSON", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed JSON", "the request body must be a JSON object")
    return body


def load_collection(collection_id: uuid.UUID) -> store.Collection:
    """The caller's collection, or NotFound (404)."""
    with _services().pool.connection() as conn:
        return store.get_collections(conn, g.tenant.id, [collection_id])[0]


@bp.post("")
def create():
    services = _services()
    settings = services.settings
    try:
        body = CollectionRequest.model_validate(json_body())
    except ValidationError as exc:
        raise invalid(exc, "Invalid collection") from None
    embedder = services.embedder  # the collection records the model (and dimension) it is searched with
    with services.pool.connection() as conn:
        collection = store.create_collection(
            conn, g.tenant.id, body.name, embedding_model=embedder.model_name, embedding_dim=embedder.dimension,
            hnsw_m=settings.hnsw_m, hnsw_ef_construction=settings.hnsw_ef_construction, metadata=body.metadata)
    response = jsonify(collection_resource(collection))
    response.status_code = 201
    response.headers["Location"] = url_for("collections.get", collection_id=collection.id)
    return response


@bp.get("")
def list_():
    with _services().pool.connection() as conn:
        collections = store.list_collections(conn, g.tenant.id)
    return jsonify(object="list", data=[collection_resource(c) for c in collections])


@bp.get("/<uuid:collection_id>")
def get(collection_id: uuid.UUID):
    return jsonify(collection_resource(load_collection(collection_id)))


@bp.delete("/<uuid:collection_id>")
def delete(collection_id: uuid.UUID):
    with _services().pool.connection() as conn:
        store.delete_collection(conn, g.tenant.id, collection_id)
    return "", 204


def hit_resource(hit: retrieval_search.Hit) -> dict:
    out = dataclasses.asdict(hit)
    return {**out, "document_id": str(hit.document_id), "collection_id": str(hit.collection_id)}


@bp.get("/<uuid:collection_id>/search")
def search(collection_id: uuid.UUID):
    services = _services()
    settings = services.settings
    args = request.args.to_dict()
    args.setdefault("k", settings.rag_top_k)
    try:
        params = SearchParams.model_validate(args)
    except ValidationError as exc:
        raise invalid(exc, "Invalid search") from None
    # Keyword search never embeds the query, so it does not load the model.
    embedder = services.embedder if params.mode != "keyword" else None
    with services.pool.connection() as conn, metrics.timed_retrieval(params.mode, "api"):
        hits = retrieval_search.search(conn, embedder, g.tenant.id, [collection_id], params.q, params.k, params.mode,
                                       params.filter, ef_search=settings.hnsw_ef_search,
                                       max_scan_tuples=settings.hnsw_max_scan_tuples)
    return jsonify(object="list", query=params.q, mode=params.mode, k=params.k, data=[hit_resource(h) for h in hits])
