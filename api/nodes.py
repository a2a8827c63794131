"""/v1/nodes: the worker fleet as the routers see it, and draining a node (admin keys only)."""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify

from api.auth import authenticate
from api.errors import ApiError
from tasks.jobs import tenants
from tasks.routing import registry

bp = Blueprint("nodes", __name__, url_prefix="/v1/nodes")
bp.before_request(authenticate)


#: what a tenant without an admin key sees of a node: what it serves and can do, not its load or host
_PUBLIC_FIELDS = ("id", "models", "supports_seed")


def _node_resource(node: dict, *, full: bool = True) -> dict:
    shown = node if full else {k: node.get(k) for k in _PUBLIC_FIELDS}
    return {"object": "node", **shown, "routable": registry.routable(node)}


@bp.get("")
def list_():
    """Every live node; in full (load, latencies, cooldowns, drain state) for admin keys only."""
    redis = current_app.extensions["switchyard"].redis
    full = g.tenant.is_admin
    return jsonify(object="list", data=[_node_resource(n, full=full) for n in registry.live_nodes(redis)])


def _drain(node_id: str, draining: bool):
    if not g.tenant.is_admin:
        raise ApiError(403, "Forbidden", "draining nodes needs an admin API key (`python -m ops.admin create-tenant "
                       "NAME --admin`)")
    redis = current_app.extensions["switchyard"].redis

    def find():
        return next((n for n in registry.live_nodes(redis) if n["id"] == node_id), None)

    if find() is None:
        raise ApiError(404, "Not Found", f"no live node {node_id!r}; GET /v1/nodes lists them")
    registry.set_drain(redis, node_id, draining)
    with current_app.extensions["switchyard"].pool.connection() as conn:
        tenants.audit(conn, f"key:{g.tenant.key_prefix}", "node.drained" if draining else "node.undrained", None,
                      node_id, {})
    node = find()
    if node is None:
        raise ApiError(404, "Not Found", f"node {node_id!r} left meanwhile")
    return jsonify(_node_resource(node))


@bp.post("/<node_id>/drain")
def drain(node_id: str):
    """No new work goes to the node; what it holds finishes there."""
    return _drain(node_id, True)


@bp.delete("/<node_id>/drain")
def undrain(node_id: str):
    """Put a drained node back in rotation."""
    return _drain(node_id, False)
