"""The SSRF guard on its own: what is refused, what the allow-list permits, what the settings accept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.settings import Settings
from tasks.webhooks.ssrf import AllowList, UnresolvableURL, UnsafeURL, check_url
from tests.receiver import internal_urls

ALLOW = AllowList.parse(["127.0.0.1:9000"])


@pytest.mark.parametrize("url", internal_urls(9999))
def test_internal_urls_are_refused(url):
    with pytest.raises(UnsafeURL):
        check_url(url, ALLOW)


@pytest.mark.parametrize("url", ["http://2130706433:9000/", "http://127.1:9000/", "http://0x7f000001:9000/",
                                 "http://127.0.0.2:9000/",
                                 "http://127.0.0.1:9001/", "http://user:pw@127.0.0.1:9000/"])
def test_the_allow_list_is_exact(url):
    """An allow-listed 127.0.0.1:9000 permits that address and port only, written canonically."""
    with pytest.raises(UnsafeURL):
        check_url(url, ALLOW)


def test_numeric_forms_are_refused_even_for_public_addresses():
    with pytest.raises(UnsafeURL, match="non-standard form"):
        check_url("http://134744072/")  # 8.8.8.8


def test_public_and_allow_listed_urls_pass_and_pin_the_checked_address():
    target = check_url("https://8.8.8.8:8443/hooks?a=1")
    assert (target.scheme, target.host, target.port, target.address, target.path) == \
        ("https", "8.8.8.8", 8443, "8.8.8.8", "/hooks?a=1")
    assert check_url("http://127.0.0.1:9000/x", ALLOW).address == "127.0.0.1"
    assert check_url("http://127.0.0.1:5/", AllowList.parse(["127.0.0.0/8"])).port == 5


def test_host_name_entries_permit_that_name_on_that_port():
    target = check_url("http://localhost:9000/", AllowList.parse(["localhost:9000"]))
    assert target.host == "localhost" and target.address in ("127.0.0.1", "::1")
    with pytest.raises(UnsafeURL):
        check_url("http://localhost:9001/", AllowList.parse(["localhost:9000"]))


def test_unresolvable_hosts_are_told_apart():
    with pytest.raises(UnresolvableURL, match="does not resolve"):
        check_url("http://no-such-host.invalid/")


def test_messages_say_what_to_fix():
    with pytest.raises(UnsafeURL, match="is a private address; .* publicly reachable URL"):
        check_url("http://10.1.2.3/")
    with pytest.raises(UnsafeURL, match="use an http:// or https:// URL"):
        check_url("ftp://example.com/")


def test_settings_parse_and_check_the_allow_list_and_schedule(monkeypatch):
    monkeypatch.delenv("SWITCHYARD_WEBHOOK_ALLOW", raising=False)
    monkeypatch.delenv("SWITCHYARD_WEBHOOK_RETRY_SCHEDULE", raising=False)
    assert Settings().webhook_allow == ()  # production default: deny
    assert sum(Settings().webhook_retry_schedule) >= 24 * 3600
    assert Settings().webhook_timeout == 10
    monkeypatch.setenv("SWITCHYARD_WEBHOOK_ALLOW", "127.0.0.1:9000, 10.0.0.0/8")
    monkeypatch.setenv("SWITCHYARD_WEBHOOK_RETRY_SCHEDULE", "1,2.5,4")
    settings = Settings.from_env()
    assert settings.webhook_allow == ("127.0.0.1:9000", "10.0.0.0/8")
    assert settings.webhook_retry_schedule == (1, 2.5, 4)
    with pytest.raises(ValidationError, match="neither a CIDR nor host:port"):
        Settings(webhook_allow=("not an entry",))
    with pytest.raises(ValidationError, match="positive"):
        Settings(webhook_retry_schedule=(1, 0))


def test_a_name_that_resolves_inside_is_refused_without_naming_the_address():
    with pytest.raises(UnsafeURL) as refused:
        check_url("http://localhost:8080/hook")
    assert "does not resolve to a public address" in str(refused.value)
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)


def test_site_local_ipv6_is_refused():
    with pytest.raises(UnsafeURL, match="site-local"):
        check_url("http://[fec0::1]/")
