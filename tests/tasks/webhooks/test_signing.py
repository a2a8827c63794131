"""Our Standard Webhooks signatures, checked with the official `standardwebhooks` package."""

from __future__ import annotations

import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tasks.webhooks import signing

BODY = b'{"type":"job.succeeded","data":{"id":"x"}}'


def test_signature_verifies_with_the_official_package():
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    headers = signing.headers([secret], "msg_1", int(time.time()), BODY)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(BODY, headers) == {"type": "job.succeeded", "data": {"id": "x"}}


def test_tampered_body_stale_timestamp_and_wrong_secret_fail():
    secret = signing.new_secret()
    now = int(time.time())
    headers = signing.headers([secret], "msg_1", now, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace(b"x", b"y"), headers)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, signing.headers([secret], "msg_1", now - 600, BODY))
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "msg_2"})


def test_during_a_rotation_both_secrets_verify():
    old, new = signing.new_secret(), signing.new_secret()
    headers = signing.headers([new, old], "msg_1", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
