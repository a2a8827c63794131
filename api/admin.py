"""/v1/admin: what an operator does with an `admin`-scoped key, the same as `python -m ops.admin`:
tenants' limits and keys. Every change is written to the audit log with the acting key's prefix."""

from __future__ import annotations

import math

from flask import Blueprint, current_app, g, jsonify, request

from api.auth import authenticate
from api.errors import ApiError
from tasks.jobs import tenants

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")
bp.before_request(authenticate)  # needs the `admin` scope (api.auth.required_scope)


def _pool():
    return current_app.extensions["switchyard"].pool


def _actor() -> str:
    return f"key:{g.tenant.key_prefix}"


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "Malformed JSON", "send a JSON object with `Content-Type: application/json`")
    return body


def _key_resource(row: dict) -> dict:
    return {"object": "api_key", "id": str(row["id"]), "prefix": row["prefix"], "name": row["name"],
            "scopes": row["scopes"], "created_at": row["created_at"].isoformat(),
            "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
            "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None}


def _lookup(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except LookupError as exc:
        raise ApiError(404, "Not Found", str(exc)) from None
    except ValueError as exc:
        raise ApiError(422, "Invalid request", str(exc)) from None


@bp.put("/tenants/<name>/limits")
def set_limits(name: str):
    """Set (a positive number) or clear (null) some of a tenant's limits; answers with them all."""
    body = _body()
    for limit, value in body.items():
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and math.isfinite(value) and value > 0
                               and (limit in tenants.FRACTIONAL_LIMITS or float(value).is_integer()))
        if not ok:
            raise ApiError(422, "Invalid limit", f"`{limit}` must be a positive number (whole, but for "
                           f"{' and '.join(tenants.FRACTIONAL_LIMITS)}) "
                           "or null to clear it", errors=[{"field": limit, "message": "a positive number or null"}])
    limits = _lookup(tenants.set_limits, _pool(), name, body, actor=_actor())
    return jsonify(object="limits", tenant=name, limits=limits)


@bp.get("/tenants/<name>/keys")
def list_keys(name: str):
    return jsonify(object="list", data=[_key_resource(r) for r in _lookup(tenants.list_keys, _pool(), name)])


@bp.post("/tenants/<name>/keys")
def create_key(name: str):
    """A new key: `{"scopes": [...], "name": "...", "expires_in": seconds}` (all optional). The key is
    in the answer once and never again."""
    body = _body()
    expires_in = body.get("expires_in")
    if expires_in is not None and not (isinstance(expires_in, (int, float)) and math.isfinite(expires_in)
                                       and expires_in > 0):
        raise ApiError(422, "Invalid request", "`expires_in` must be a positive number of seconds")
    row, key = _lookup(tenants.create_key, _pool(), name, scopes=body.get("scopes") or tenants.DEFAULT_SCOPES,
                       name=body.get("name"), expires_in=expires_in, actor=_actor())
    return jsonify({**_key_resource(row), "key": key}), 201


@bp.delete("/keys/<key_ref>")
def revoke_key(key_ref: str):
    return jsonify(_key_resource(_lookup(tenants.revoke_key, _pool(), key_ref, actor=_actor())))


@bp.post("/keys/<key_ref>/rotate")
def rotate_key(key_ref: str):
    """A new key with the same scopes; the old one keeps working `overlap` seconds (query, default 3600)."""
    try:
        overlap = float(request.args.get("overlap", "3600"))
    except ValueError:
        overlap = -1.0
    if not (math.isfinite(overlap) and 0 <= overlap <= 30 * 86400):
        raise ApiError(400, "Invalid overlap", "`overlap` must be seconds between 0 and 2592000 (30 days)")
    row, key = _lookup(tenants.rotate_key, _pool(), key_ref, overlap=overlap, actor=_actor())
    return jsonify({**_key_resource(row), "key": key}), 201
