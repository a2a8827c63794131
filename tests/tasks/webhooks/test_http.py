"""One HTTP attempt on its own (tasks.delivery.post): the connection goes to the checked address, the
name only travels in the Host header and TLS SNI, certificates are verified, redirects are not followed,
the timeout holds; and the back-off arithmetic."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from tasks.webhooks.sender import _retry_after, post
from tasks.webhooks.task import retry_delay
from tasks.settings import Settings
from tasks.webhooks.ssrf import Target
from tests.receiver import canary_silent


def test_connects_to_the_checked_address_and_names_the_host(receiver):
    # `pinned.example` does not resolve: the request can only succeed by not resolving it again.
    answer = post(Target("http", "pinned.example", receiver.port, "127.0.0.1", "/pinned?x=1"), b"{}", {}, 5)
    assert answer.status_code == 200 and answer.ok
    [got] = receiver.at("/pinned?x=1")
    assert got.headers["host"] == f"pinned.example:{receiver.port}"


def test_redirects_are_not_followed(receiver, canary):
    receiver.script("/moved", (301, {"Location": canary.url("/internal")}))
    answer = post(Target("http", "127.0.0.1", receiver.port, "127.0.0.1", "/moved"), b"{}", {}, 5)
    assert answer.status_code == 301 and not answer.ok and answer.error.startswith("HTTP 301")
    canary_silent(canary)


def test_the_timeout_is_enforced():
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        answer = post(Target("http", "127.0.0.1", silent.getsockname()[1], "127.0.0.1", "/"), b"{}", {}, 0.5)
    assert answer.status_code is None and "timed out" in answer.error.lower()
    assert 0.5 <= time.monotonic() - started < 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_sends_the_name_as_sni_and_verifies_the_certificate(tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=pinned.example", "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    names = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def accept_one():
            conn, _ = server.accept()
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass  # the client refuses our self-signed certificate mid-handshake

        threading.Thread(target=accept_one, daemon=True).start()
        answer = post(Target("https", "pinned.example", server.getsockname()[1], "127.0.0.1", "/"), b"{}", {}, 5)
    assert answer.status_code is None and "CERTIFICATE_VERIFY_FAILED" in answer.error
    assert names == ["pinned.example"]


def test_retry_after_accepts_seconds_and_http_dates():
    assert _retry_after("120") == 120 and _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=60), usegmt=True)
    assert 55 <= _retry_after(later) <= 60


def test_retry_delay_follows_the_schedule_with_jitter_and_honours_retry_after():
    settings = Settings(webhook_retry_schedule=(10, 40, 160), webhook_retry_jitter=0.2)
    for attempt, base in ((1, 10), (2, 40), (3, 160)):
        delays = [retry_delay(settings, attempt, None) for _ in range(200)]
        assert base * 0.8 <= min(delays) < max(delays) <= base * 1.2
    assert retry_delay(settings, 1, 100) == 100  # longer than the schedule's: honoured
    assert retry_delay(settings, 1, 10_000) == 160  # capped at the longest delay
    assert 8 <= retry_delay(settings, 1, 1) <= 12  # shorter: the schedule wins


def test_a_trickling_receiver_is_cut_off_at_the_attempts_deadline():
    """Each byte arrives well within the read timeout, so only the hard deadline can end the attempt."""
    stop = threading.Event()
    with socket.socket() as tarpit:
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen()

        def trickle():
            conn, _ = tarpit.accept()
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 1000:
                    if stop.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))

        threading.Thread(target=trickle, daemon=True).start()
        started = time.monotonic()
        answer = post(Target("http", "127.0.0.1", tarpit.getsockname()[1], "127.0.0.1", "/"), b"{}", {}, 1.0,
                      deadline=2.0)
        elapsed = time.monotonic() - started
        stop.set()
    assert answer.status_code is None and "2 s deadline" in answer.error
    assert 1.9 <= elapsed < 3.0, elapsed
