"""The batch core on its own: jobs in, outcomes out, on the SimulatedEngine, with no broker, Postgres or
Redis (the core drives an engine; this test is about that driving, not about generation)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tasks.errors import ErrorKind
from tasks.prompting import load_tokenizer
from workers.batch import BatchCore, request_id
from workers.simulated import SimulatedEngine

TOKEN_SECONDS = 0.002


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


@pytest.fixture
def engine(tokenizer):
    engine = SimulatedEngine(token_seconds=TOKEN_SECONDS, max_num_seqs=64, tokenizer=tokenizer,
                             fail_marker="FAIL-ONCE")
    engine.start()
    yield engine
    engine.shutdown()


def job(max_tokens: int = 8, attempt: int = 1, **request) -> dict:
    return {"id": uuid.uuid4(), "attempt": attempt,
            "request": {"prompt": "hello", "max_tokens": max_tokens, "temperature": 0, **request}}


class Recorder:
    """Collects outcomes with the time each arrived."""

    def __init__(self):
        self.outcomes, self.at, self.started = [], {}, time.monotonic()

    def __call__(self, outcome):
        self.at[outcome.job["id"]] = time.monotonic() - self.started
        self.outcomes.append(outcome)

    def by_id(self):
        return {o.job["id"]: o for o in self.outcomes}


def test_every_job_gets_one_outcome_with_its_usage(engine, tokenizer):
    jobs = [job(max_tokens=n) for n in (4, 8, 16)]
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run(jobs, seen)
    assert sorted(o.job["id"] for o in seen.outcomes) == sorted(j["id"] for j in jobs)
    for o in seen.outcomes:
        assert o.error is None
        assert o.result["usage"]["completion_tokens"] == o.job["request"]["max_tokens"]
        assert o.result["usage"]["total_tokens"] == o.result["usage"]["prompt_tokens"] + o.completion_tokens > 0


def test_a_short_job_is_reported_before_a_long_one_ends(engine, tokenizer):
    short, long = job(max_tokens=5), job(max_tokens=500)  # 0.01 s vs 1 s of simulated generation
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run([long, short], seen)
    assert [o.job["id"] for o in seen.outcomes] == [short["id"], long["id"]]
    assert seen.at[short["id"]] < 0.5 < seen.at[long["id"]]


def test_a_seed_follows_what_the_engine_supports(engine, tokenizer):
    seeded = job(seed=7, temperature=0.8)
    engine.supports_seed = False
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run([seeded, job()], seen)
    refused = seen.by_id()[seeded["id"]].error
    assert refused.kind is ErrorKind.INVALID_REQUEST and not refused.retryable and "seed" in refused.message
    assert sum(o.error is None for o in seen.outcomes) == 1  # the other job is not affected

    engine.supports_seed = True
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run([seeded], seen)
    assert seen.outcomes[0].error is None


def test_an_unrecognised_engine_failure_is_retryable_not_the_jobs_fault(engine, tokenizer):
    first, second = job(prompt="FAIL-ONCE please"), job(prompt="FAIL-ONCE please", attempt=2)
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run([first, second, job()], seen)
    outcomes = seen.by_id()
    error = outcomes[first["id"]].error
    assert error.kind is ErrorKind.ENGINE_ERROR and error.retryable, error
    assert outcomes[second["id"]].error is None  # the next attempt of such a job runs
    assert sum(o.error is None for o in seen.outcomes) == 2


def test_a_prompt_the_template_rejects_fails_only_that_job(engine, tokenizer):
    bad = job(prompt=None, messages=[{"role": "user", "content": "hi"}, {"role": 5}])
    bad["request"].pop("prompt")
    seen = Recorder()
    BatchCore(engine, tokenizer, job_timeout=30).run([bad, job()], seen)
    assert seen.by_id()[bad["id"]].error.kind is ErrorKind.INVALID_REQUEST
    assert sum(o.error is None for o in seen.outcomes) == 1


def test_a_generation_past_the_timeout_is_aborted_and_reported(engine, tokenizer):
    slow, quick = job(max_tokens=5000), job(max_tokens=4)  # 10 s of simulated generation vs 8 ms
    seen = Recorder()
    started = time.monotonic()
    BatchCore(engine, tokenizer, job_timeout=0.5).run([slow, quick], seen)
    assert time.monotonic() - started < 3
    assert seen.by_id()[slow["id"]].error.kind is ErrorKind.TIMEOUT
    assert seen.by_id()[quick["id"]].error is None


def test_abort_ends_a_running_generation(engine, tokenizer):
    long = job(max_tokens=5000)
    core = BatchCore(engine, tokenizer, job_timeout=30)
    seen = Recorder()
    runner = threading.Thread(target=core.run, args=([long], seen))
    runner.start()
    deadline = time.monotonic() + 5
    while core.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.inflight == 1
    core.abort(str(long["id"]))
    runner.join(5)
    assert not runner.is_alive() and seen.outcomes[0].result["finish_reason"] == "abort"
    assert core.inflight == 0


def test_one_jobs_failed_bookkeeping_does_not_strand_the_rest(engine, tokenizer):
    jobs = [job(max_tokens=4 + i) for i in range(4)]
    seen = []

    def record(outcome):
        seen.append(outcome.job["id"])
        if len(seen) == 1:
            raise RuntimeError("Postgres said no")

    BatchCore(engine, tokenizer, job_timeout=30).run(jobs, record)
    assert sorted(seen) == sorted(j["id"] for j in jobs)


def test_request_ids_differ_per_attempt():
    j = job()
    assert request_id(j) != request_id({**j, "attempt": 2})
