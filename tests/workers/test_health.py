"""workers.health: the GPU worker's exec probe reads the node's heartbeat in a real Redis (Valkey)."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib

from ops.services import free_port
from tasks.routing import registry
from workers import health


@pytest.fixture
def valkey(backing):
    client = redis_lib.Redis.from_url(backing[1].url)
    yield client
    client.close()


@pytest.fixture
def node_id() -> str:
    return f"probe-{uuid.uuid4().hex[:8]}"


def _beat(redis, node_id: str, **fields) -> None:
    registry.heartbeat(redis, {"id": node_id, "models": ["m"], "engine_state": "ready", "draining": False,
                               **fields}, ttl=30)


def test_a_live_ready_node_is_alive_and_ready(valkey, node_id):
    _beat(valkey, node_id)
    assert health.check(valkey, node_id, ready=False)[0]
    assert health.check(valkey, node_id, ready=True) == (True, f"node {node_id}: heartbeat live, "
                                                               "engine ready")


@pytest.mark.parametrize("fields, why", [({"engine_state": "dead"}, "engine dead"),
                                         ({"draining": True}, "draining")])
def test_a_node_whose_engine_is_down_or_that_drains_is_alive_but_not_ready(valkey, node_id, fields, why):
    _beat(valkey, node_id, **fields)
    assert health.check(valkey, node_id, ready=False)[0]
    ready, reason = health.check(valkey, node_id, ready=True)
    assert not ready and why in reason


def test_an_operator_drain_makes_the_node_unready(valkey, node_id):
    _beat(valkey, node_id)
    registry.set_drain(valkey, node_id, True)
    assert not health.check(valkey, node_id, ready=True)[0]


def test_without_a_heartbeat_the_node_is_neither_alive_nor_ready(valkey, node_id):
    _beat(valkey, "some-other-node")
    for ready in (False, True):
        assert health.check(valkey, node_id, ready=ready) == (False, f"node {node_id} has no live heartbeat")


def test_an_unreachable_redis_fails_readiness_only(node_id):
    down = redis_lib.Redis(port=free_port(), socket_connect_timeout=1)
    assert health.check(down, node_id, ready=False)[0]
    assert not health.check(down, node_id, ready=True)[0]


def test_main_checks_the_node_named_in_the_environment(backing, valkey, node_id, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", backing[1].url)
    monkeypatch.setenv("DATABASE_URL", backing[0].url)
    monkeypatch.setenv("SWITCHYARD_NODE_ID", node_id)
    assert health.main([]) == 1
    _beat(valkey, node_id, engine_state="restarting")
    assert health.main([]) == 0
    assert health.main(["--ready"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"node {node_id}: engine restarting"


def test_main_refuses_to_guess_the_node_id(backing, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", backing[1].url)
    monkeypatch.setenv("DATABASE_URL", backing[0].url)
    monkeypatch.delenv("SWITCHYARD_NODE_ID", raising=False)
    assert health.main([]) == 1
    assert "SWITCHYARD_NODE_ID is not set" in capsys.readouterr().out
