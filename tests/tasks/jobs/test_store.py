"""The job state machine on real Postgres: conditional updates fenced by the attempt number, the attempt
log, dead letters and idempotency keys."""

from __future__ import annotations

import hashlib
import threading

import pytest

from tasks.jobs import dead_letters, store, stranded, tenants
from tasks.jobs.status import JobStatus

BOOM = {"type": "engine_dead", "message": "boom"}


def new_job(db, tenant_id, max_attempts=3, idempotency=None):
    return store.insert_job(db, tenant_id=tenant_id, model="m", strategy="round_robin",
                            request={"prompt": "hi", "max_tokens": 4, "max_attempts": max_attempts}, metadata={},
                            max_attempts=max_attempts, idempotency=idempotency)


@pytest.fixture
def job(db, tenant):
    row, created = new_job(db, tenant[0].id)
    assert created
    return row


def run(db, job_id, attempt, node):
    assert store.mark_routed(db, job_id, attempt, node)
    assert len(store.start_jobs(db, [(job_id, attempt)], node)) == 1


def finish(db, job_id, attempt, node, text="x"):
    return store.finish_job(db, job_id, attempt, JobStatus.SUCCEEDED, node_id=node, result={"text": text})


def attempts_log(db, job_id):
    with db.connection() as conn:
        return [(r["attempt"], r["node_id"], r["outcome"]) for r in conn.execute(
            "SELECT attempt, node_id, outcome FROM job_attempts WHERE job_id = %s ORDER BY id", (job_id,))]


def test_happy_path_sets_each_phase_timestamp(db, job):
    run(db, job["id"], 1, "n1")
    assert finish(db, job["id"], 1, "n1")
    row = store.get_job(db, job["id"])
    assert row["status"] == "succeeded" and row["result"] == {"text": "x"}
    assert row["created_at"] <= row["routed_at"] <= row["started_at"] <= row["finished_at"]
    assert attempts_log(db, job["id"]) == [(1, "n1", "succeeded")]


def test_duplicate_deliveries_change_nothing(db, job):
    assert store.mark_routed(db, job["id"], 1, "n1")
    assert store.mark_routed(db, job["id"], 1, "n2") is None  # a second router copy
    assert store.start_jobs(db, [(job["id"], 1)], "n2") == []  # the wrong node
    assert len(store.start_jobs(db, [(job["id"], 1)], "n1")) == 1
    assert store.start_jobs(db, [(job["id"], 1)], "n1") == []  # redelivered to the same node
    assert finish(db, job["id"], 1, "n1", "first")
    assert not finish(db, job["id"], 1, "n1", "second")
    assert store.get_job(db, job["id"])["result"] == {"text": "first"}
    # Exactly one accepted result; the duplicate is logged as discarded.
    assert attempts_log(db, job["id"]) == [(1, "n1", "succeeded"), (1, "n1", "discarded")]


def test_a_stale_attempt_cannot_overwrite_a_newer_one(db, job):
    run(db, job["id"], 1, "n1")
    retried = store.retry_job(db, job["id"], 1, BOOM, delay=0)
    assert (retried["status"], retried["attempt"]) == ("queued", 2)
    assert not finish(db, job["id"], 1, "n1", "late")  # old attempt
    run(db, job["id"], 2, "n2")
    assert finish(db, job["id"], 2, "n2", "new")
    row = store.get_job(db, job["id"])
    assert (row["status"], row["attempt"], row["node_id"], row["result"]) == ("succeeded", 2, "n2", {"text": "new"})
    assert attempts_log(db, job["id"]) == [(1, "n1", "retried"), (1, "n1", "discarded"), (2, "n2", "succeeded")]


def test_retry_delay_postpones_the_due_time(db, job):
    run(db, job["id"], 1, "n1")
    store.retry_job(db, job["id"], 1, BOOM, delay=30)
    assert str(job["id"]) not in {r["id"] for r in stranded.stalled_queued(db, older_than=0)}  # due in 30 s


def test_used_up_attempts_make_the_job_dead_with_a_dead_letter(db, tenant):
    t, _ = tenant
    job, _ = new_job(db, t.id, max_attempts=2)
    for attempt in (1, 2):
        run(db, job["id"], attempt, f"n{attempt}")
        row = store.retry_job(db, job["id"], attempt, BOOM, delay=0)
    assert row["status"] == "dead"
    dead = store.get_job(db, job["id"])
    assert dead["status"] == "dead" and "gave up after 2 attempts" in dead["error"]["message"]
    letters = [d for d in dead_letters.list_dead_letters(db, t.id) if d["job_id"] == job["id"]]
    assert len(letters) == 1
    assert (letters[0]["reason"], letters[0]["attempts"], letters[0]["last_error"]) == ("engine_dead", 2, BOOM)
    # Replay: a new attempt with a fresh budget of 2; the letter is closed.
    replayed = dead_letters.replay_dead_letter(db, letters[0]["id"], t.id)
    assert replayed["attempt"] == 3
    assert store.get_job(db, job["id"])["max_attempts"] == 4
    assert dead_letters.replay_dead_letter(db, letters[0]["id"], t.id) is None  # only once
    assert not [d for d in dead_letters.list_dead_letters(db, t.id) if d["job_id"] == job["id"]]


def test_dead_letters_are_tenant_scoped(db, tenant):
    other, _ = tenants.create_tenant(db, "someone-else-" + tenant[0].name)
    job, _ = new_job(db, other.id, max_attempts=1)
    run(db, job["id"], 1, "n1")
    store.retry_job(db, job["id"], 1, BOOM, delay=0)
    letter = [d for d in dead_letters.list_dead_letters(db, other.id) if d["job_id"] == job["id"]][0]
    assert not [d for d in dead_letters.list_dead_letters(db, tenant[0].id) if d["job_id"] == job["id"]]
    assert [d for d in dead_letters.list_dead_letters(db, None) if d["job_id"] == job["id"]]  # admin sees all
    assert dead_letters.replay_dead_letter(db, letter["id"], tenant[0].id) is None


def test_cancelled_job_is_never_started_or_finished(db, tenant, job):
    t, _ = tenant
    store.mark_routed(db, job["id"], 1, "n1")
    assert store.cancel_job(db, job["id"], t.id, {"type": "cancelled", "message": "by the test"})["status"] == "cancelled"
    assert store.start_jobs(db, [(job["id"], 1)], "n1") == []
    assert not finish(db, job["id"], 1, "n1")
    assert store.cancel_job(db, job["id"], t.id, {"type": "cancelled", "message": "by the test"}) is None  # already finished


def test_orphans_and_stalled_jobs_are_found(db, job):
    run(db, job["id"], 1, "gone-node")
    assert job["id"] in {j["id"] for j in stranded.jobs_on_nodes_not_in(db, ["other-node"])}
    assert job["id"] not in {j["id"] for j in stranded.jobs_on_nodes_not_in(db, ["gone-node"])}
    store.retry_job(db, job["id"], 1, {"type": "worker_lost", "message": "x"}, delay=0)
    assert str(job["id"]) in {r["id"] for r in stranded.stalled_queued(db, older_than=0)}
    claimed = {j["id"]: j for j in stranded.claim_queued(db, [str(job["id"])], older_than=0)}
    assert claimed[job["id"]]["attempt"] == 2
    # Claiming bumps queued_at: the same job is not claimed again in the same period.
    assert str(job["id"]) not in {r["id"] for r in stranded.stalled_queued(db, older_than=5)}
    assert not stranded.claim_queued(db, [str(job["id"])], older_than=5)


def test_idempotency_key_returns_the_original_job_or_conflicts(db, tenant):
    t, _ = tenant
    digest = hashlib.sha256(b"body").digest()
    first, created = new_job(db, t.id, idempotency=("key-1", digest, 60))
    again, created_again = new_job(db, t.id, idempotency=("key-1", digest, 60))
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(store.IdempotencyConflict):
        new_job(db, t.id, idempotency=("key-1", hashlib.sha256(b"other").digest(), 60))
    other, _ = tenants.create_tenant(db, "idem-" + t.name)
    assert new_job(db, other.id, idempotency=("key-1", digest, 60))[1]  # keys are per tenant


def test_an_expired_idempotency_key_can_be_reused(db, tenant):
    t, _ = tenant
    digest = hashlib.sha256(b"body").digest()
    first, _ = new_job(db, t.id, idempotency=("key-exp", digest, 60))
    with db.connection() as conn:
        conn.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 s' WHERE key = 'key-exp'")
    second, created = new_job(db, t.id, idempotency=("key-exp", digest, 60))
    assert created and second["id"] != first["id"]


def test_concurrent_inserts_with_one_key_create_one_job(db, tenant):
    t, _ = tenant
    digest = hashlib.sha256(b"body").digest()
    results, barrier = [], threading.Barrier(8)

    def go():
        barrier.wait()
        results.append(new_job(db, t.id, idempotency=("key-race", digest, 60)))

    threads = [threading.Thread(target=go) for _ in range(8)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert len({r[0]["id"] for r in results}) == 1 and sum(r[1] for r in results) == 1


def test_job_ids_are_random_uuid4(db, tenant):
    t, _ = tenant
    ids = {new_job(db, t.id)[0]["id"] for _ in range(20)}
    assert len(ids) == 20 and all(i.version == 4 for i in ids)


def test_migration_created_pgvector(db):
    with db.connection() as conn:
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert version is not None
        assert conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector AS d").fetchone()["d"] == 1.0
