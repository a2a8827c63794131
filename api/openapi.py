"""The API's OpenAPI 3.1 document, generated from the app itself: `GET /openapi.json`, and a plain docs
page at `GET /docs` (no scripts, nothing fetched from elsewhere).

Paths and methods come from Flask's URL map, so every route is listed and none is invented; request
bodies and query parameters from the pydantic models the views validate with (api/schemas.py), so the
document cannot drift from what the API accepts. Every error is the problem+json body of api/errors.py
(OpenAI's error shape on the OpenAI-compatible routes).
"""

from __future__ import annotations

import html
import re
from functools import lru_cache

from flask import Blueprint, Flask, current_app, jsonify

from api.batches import BatchRequest
from api.schemas import CollectionRequest, DocumentRequest, JobRequest, SearchParams

bp = Blueprint("openapi", __name__)

#: request bodies, by endpoint (JSON unless noted)
_BODIES = {"jobs.submit": JobRequest, "collections.create": CollectionRequest, "documents.add": DocumentRequest,
           "batches.create": BatchRequest}
#: multipart/form-data bodies
_FORMS = {"files.create": {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
    "purpose": {"type": "string", "enum": ["batch"]}}}}
_QUERIES = {"collections.search": SearchParams}
_OK = {"jobs.submit": "202", "collections.create": "201", "documents.add": "202", "collections.delete": "204",
       "documents.delete": "204"}
_PUBLIC = {"health.healthz", "health.readyz", "openapi.document", "openapi.docs", "metrics.scrape"}
_OPENAI = {"openai.chat_completions", "openai.completions", "openai.models", "files.create", "files.list_", "files.get",
           "files.content", "batches.create", "batches.list_", "batches.get", "batches.cancel"}
_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")

_PROBLEM = {"type": "object", "required": ["type", "title", "status", "detail"],
            "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                           "detail": {"type": "string"}, "errors": {"type": "array", "items": {"type": "object"}}}}
_OPENAI_ERROR = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "object", "properties": {
                     "message": {"type": "string"}, "type": {"type": "string"},
                     "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _schema(model) -> dict:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def build(app: Flask) -> dict:
    components: dict = {"Problem": _PROBLEM, "OpenAIError": _OPENAI_ERROR}
    paths: dict = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        path = _PARAM.sub(lambda m: "{" + m.group(2) + "}", rule.rule)
        params = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", **({"format": "uuid"} if conv == "uuid" else {})}}
                  for conv, name in _PARAM.findall(rule.rule)]
        view = app.view_functions[rule.endpoint]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            error = {"$ref": "#/components/schemas/" + ("OpenAIError" if rule.endpoint in _OPENAI else "Problem")}
            error_media = "application/json" if rule.endpoint in _OPENAI else "application/problem+json"
            op: dict = {"operationId": rule.endpoint, "tags": [rule.endpoint.split(".")[0]],
                        "summary": (view.__doc__ or rule.endpoint).strip().splitlines()[0],
                        "parameters": list(params),
                        "responses": {_OK.get(rule.endpoint, "200"): {"description": "success"},
                                      "4XX": {"description": "the request was refused; the body says what to fix",
                                              "content": {error_media: {"schema": error}}},
                                      "503": {"description": "a backing service is unreachable; retry after "
                                                             "Retry-After", "content": {error_media: {"schema": error}}}}}
            if rule.endpoint not in _PUBLIC:
                op["security"] = [{"bearer": []}]
            if rule.endpoint in _BODIES:
                model = _BODIES[rule.endpoint]
                schema = _schema(model)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            if rule.endpoint in _FORMS:
                op["requestBody"] = {"required": True,
                                     "content": {"multipart/form-data": {"schema": _FORMS[rule.endpoint]}}}
            if rule.endpoint in _QUERIES:
                schema = _schema(_QUERIES[rule.endpoint])
                required = set(schema.get("required", []))
                for name, prop in schema["properties"].items():
                    op["parameters"].append({"name": name, "in": "query", "required": name in required,
                                             "schema": {k: v for k, v in prop.items() if k != "title"}})
            paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "Switchyard", "version": "1",
                     "description": "LLM inference as jobs: submit, long-poll or receive a signed webhook; "
                                    "retrieval-augmented jobs; OpenAI-compatible completions."},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                          "description": "your API key"}}}}


@lru_cache(maxsize=1)
def _document(app_id: int) -> dict:
    return build(current_app)


@bp.get("/openapi.json")
def document():
    """This API's OpenAPI 3.1 document."""
    return jsonify(_document(id(current_app._get_current_object())))


@bp.get("/docs")
def docs():
    """A page listing every endpoint, from the OpenAPI document."""
    doc = _document(id(current_app._get_current_object()))
    rows = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            model = body.get("$ref", "").rsplit("/", 1)[-1]
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op['summary'])}</td><td>{html.escape(model)}</td></tr>")
    page = ("<!doctype html><meta charset=utf-8><title>Switchyard API</title>"
            "<style>body{font:15px sans-serif;margin:2em}td{padding:2px 12px;border-bottom:1px solid #ddd}</style>"
            "<h1>Switchyard API</h1><p>The machine-readable document: <a href=/openapi.json>/openapi.json</a> "
            "(OpenAPI 3.1). Send your key as <code>Authorization: Bearer &lt;key&gt;</code>.</p>"
            "<table><tr><th>method</th><th>path</th><th>what</th><th>body</th></tr>" + "".join(rows) + "</table>")
    return page, 200, {"Content-Type": "text/html; charset=utf-8"}
