"""Bearer API keys → tenant. Keys are looked up by their SHA-256 digest."""

from __future__ import annotations

from flask import current_app, g, request

from api.errors import ApiError
from tasks.jobs import tenants


def authenticate() -> None:
    """Blueprint `before_request` hook: sets `g.tenant` or answers 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "Unauthorized", "send your API key as `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": 'Bearer realm="switchyard"'})
    tenant = tenants.tenant_for_key(current_app.extensions["switchyard"].pool, key.strip())
    if tenant is None:
        raise ApiError(401, "Unauthorized", "the API key is not valid (unknown or revoked)",
                       headers={"WWW-Authenticate": 'Bearer realm="switchyard", error="invalid_token"'})
    g.tenant = tenant
