"""The quickstart's webhook receiver (ops/receiver.py): verifies with `standardwebhooks`, deduplicates."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from ops.receiver import make_handler
from tasks.webhooks import signing
from tasks.webhooks.sender import post
from tasks.webhooks.ssrf import Target


@pytest.fixture
def quickstart_receiver(tmp_path):
    secret = signing.new_secret()
    (tmp_path / "secret").write_text(secret)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(tmp_path / "secret", tmp_path / "seen.jsonl"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield secret, Target("http", "127.0.0.1", server.server_address[1], "127.0.0.1", "/hooks"), tmp_path
    server.shutdown()
    server.server_close()


def test_verified_events_are_recorded_once_and_bad_signatures_refused(quickstart_receiver):
    secret, target, folder = quickstart_receiver
    body = json.dumps({"type": "job.succeeded", "timestamp": "t", "data": {"id": "j1", "status": "succeeded"}}).encode()
    signed = signing.headers([secret], "msg_1", int(time.time()), body)
    assert post(target, body, signed, 5).status_code == 204
    assert post(target, body, signed, 5).status_code == 204  # a repeat: answered, not recorded again
    assert post(target, body, signing.headers([signing.new_secret()], "msg_2", int(time.time()), body),
                5).status_code == 400
    [line] = (folder / "seen.jsonl").read_text().splitlines()
    assert json.loads(line) | {"received_at": 0} == {"received_at": 0, "webhook_id": "msg_1", "path": "/hooks",
                                                      "type": "job.succeeded", "job_id": "j1",
                                                      "status": "succeeded", "verified": True}
