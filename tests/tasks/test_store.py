"""The job state machine on real Postgres: conditional updates fenced by the attempt number."""

from __future__ import annotations

import pytest

from tasks import store
from tasks.status import JobStatus


@pytest.fixture
def job(db, tenant):
    t, _ = tenant
    return store.insert_job(db, tenant_id=t.id, model="m", strategy="round_robin",
                            request={"prompt": "hi", "max_tokens": 4}, metadata={})


def test_happy_path_sets_each_phase_timestamp(db, job):
    assert store.mark_routed(db, job["id"], 1, "n1")
    assert [r["id"] for r in store.start_jobs(db, [(job["id"], 1)], "n1")] == [job["id"]]
    assert store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, result={"text": "x"})
    row = store.get_job(db, job["id"])
    assert row["status"] == "succeeded" and row["result"] == {"text": "x"}
    assert row["created_at"] <= row["routed_at"] <= row["started_at"] <= row["finished_at"]


def test_duplicate_deliveries_change_nothing(db, job):
    assert store.mark_routed(db, job["id"], 1, "n1")
    assert store.mark_routed(db, job["id"], 1, "n2") is None  # a second router copy
    assert store.start_jobs(db, [(job["id"], 1)], "n2") == []  # the wrong node
    assert len(store.start_jobs(db, [(job["id"], 1)], "n1")) == 1
    assert store.start_jobs(db, [(job["id"], 1)], "n1") == []  # redelivered to the same node
    assert store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, result={"text": "first"})
    assert not store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, result={"text": "second"})
    assert store.get_job(db, job["id"])["result"] == {"text": "first"}


def test_a_stale_attempt_cannot_overwrite_a_newer_one(db, job):
    store.mark_routed(db, job["id"], 1, "n1")
    store.start_jobs(db, [(job["id"], 1)], "n1")
    retried = store.requeue_job(db, job["id"], 1, {"type": "engine_dead", "message": "boom"}, max_attempts=3)
    assert retried["attempt"] == 2
    assert not store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, result={"text": "late"})  # old attempt
    store.mark_routed(db, job["id"], 2, "n2")
    store.start_jobs(db, [(job["id"], 2)], "n2")
    assert store.finish_job(db, job["id"], 2, JobStatus.SUCCEEDED, result={"text": "new"})
    row = store.get_job(db, job["id"])
    assert (row["status"], row["attempt"], row["node_id"], row["result"]) == ("succeeded", 2, "n2", {"text": "new"})


def test_requeue_fails_the_job_once_attempts_are_used_up(db, job):
    store.mark_routed(db, job["id"], 1, "n1")
    store.start_jobs(db, [(job["id"], 1)], "n1")
    assert store.requeue_job(db, job["id"], 1, {"type": "engine_dead", "message": "boom"}, max_attempts=1) is None
    row = store.get_job(db, job["id"])
    assert row["status"] == "failed" and "gave up after 1 attempts" in row["error"]["message"]


def test_cancelled_job_is_never_started_or_finished(db, tenant, job):
    t, _ = tenant
    store.mark_routed(db, job["id"], 1, "n1")
    assert store.cancel_job(db, job["id"], t.id)["status"] == "cancelled"
    assert store.start_jobs(db, [(job["id"], 1)], "n1") == []
    assert not store.finish_job(db, job["id"], 1, JobStatus.SUCCEEDED, result={"text": "x"})
    assert store.cancel_job(db, job["id"], t.id) is None  # already finished


def test_job_ids_are_random_uuid4(db, tenant):
    t, _ = tenant
    ids = {store.insert_job(db, tenant_id=t.id, model="m", strategy="round_robin", request={}, metadata={})["id"]
           for _ in range(20)}
    assert len(ids) == 20 and all(i.version == 4 for i in ids)


def test_migration_created_pgvector(db):
    with db.connection() as conn:
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert version is not None
        assert conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector AS d").fetchone()["d"] == 1.0
