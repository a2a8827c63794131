"""The SSRF guard for webhook URLs, applied when a job is submitted and again before every attempt.

A URL passes when it is http(s), carries no credentials, names its host in a canonical form, and every
address the host resolves to is public (or allow-listed). The caller then connects to the address that
was checked, never resolving the name a second time, so a DNS answer that changes in between (rebinding)
cannot redirect the request to an internal address.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

log = logging.getLogger(__name__)

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# In the order they are reported; `ipaddress` knows the ranges (RFC 6890 and friends).
_FORBIDDEN = (
    ("is_unspecified", "an unspecified"),
    ("is_loopback", "a loopback"),
    ("is_link_local", "a link-local"),
    ("is_multicast", "a multicast"),
    ("is_reserved", "a reserved"),
    ("is_private", "a private"),
    ("is_site_local", "a site-local"),  # IPv6 fec0::/10: deprecated, and `is_global` in Python's eyes
)


class UnsafeURL(ValueError):
    """Raised when a webhook URL may not be called: wrong scheme, malformed, or a non-public address."""


class UnresolvableURL(UnsafeURL):
    """Raised when the URL's host name does not resolve (may be temporary at delivery time)."""


@dataclass(frozen=True)
class Target:
    """Where to send: connect to `address`, and name `host` in the Host header and TLS SNI."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


@dataclass(frozen=True)
class AllowList:
    """Exceptions to the guard: networks (any port, or one port) and host names with a port."""

    networks: tuple[tuple[IPNetwork, int | None], ...] = ()
    hosts: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowList":
        """Entries: `10.0.0.0/8` or `::1` (any port), `127.0.0.1:9000`, `[::1]:9000`, `receiver:9000`."""
        networks, hosts = [], []
        for entry in entries:
            try:
                networks.append((ipaddress.ip_network(entry, strict=False), None))
                continue
            except ValueError:
                pass
            try:
                parts = urlsplit("//" + entry)
                host, port = parts.hostname, parts.port
            except ValueError:
                host = port = None
            if not host or port is None or parts.path or "@" in parts.netloc:
                raise ValueError(f"allow-list entry {entry!r} is neither a CIDR nor host:port")
            try:
                networks.append((ipaddress.ip_network(host), port))
            except ValueError:
                hosts.append((host.lower().rstrip("."), port))
        return cls(tuple(networks), tuple(hosts))

    def permits(self, host: str, address: IPAddress, port: int) -> bool:
        if any(h == host and p == port for h, p in self.hosts):
            return True
        return any(address in net and p in (None, port) for net, p in self.networks)


def forbidden_reason(address: IPAddress) -> str | None:
    """Why a webhook may not go to this address, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6"
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and forbidden_reason(embedded):
            return f"a tunnelling IPv6 (embedding {embedded})"
    for attribute, name in _FORBIDDEN:
        if getattr(address, attribute, False):
            return name
    if not address.is_global:  # e.g. shared address space 100.64.0.0/10
        return "a non-public"
    return None


def _host(parts) -> str:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeURL("the URL has no host; give an absolute URL such as https://example.com/hooks")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        socket.inet_aton(host)  # accepts 2130706433, 0x7f000001, 017700000001, 127.1 ...
    except OSError:
        pass
    else:
        raise UnsafeURL(f"host {host!r} is a numeric address in a non-standard form; "
                        "write IPv4 addresses as four decimal numbers, or use a host name")
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        ascii_host = ""
    if not _HOST_NAME.fullmatch(ascii_host):
        raise UnsafeURL(f"host {host!r} is not a valid host name")
    return ascii_host


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("webhook URL refused: %r does not resolve (%s)", host, exc)
        raise UnresolvableURL(f"host {host!r} does not resolve to a public address; check the host name") from None
    addresses = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def check_url(url: str, allow: AllowList = AllowList()) -> Target:
    """Resolve `url` and check every address; return the target to connect to, or raise UnsafeURL."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"the URL is malformed ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL(f"scheme {scheme or '(none)'!r} is not allowed; use an http:// or https:// URL")
    if "@" in parts.netloc:
        raise UnsafeURL("credentials in the URL are not allowed; authenticate the request by its signature")
    host = _host(parts)
    port = port or DEFAULT_PORTS[scheme]
    addresses = _resolve(host, port)
    for address in addresses:
        if allow.permits(host, address, port):
            continue
        reason = forbidden_reason(address)
        if reason and host == str(address):  # the client wrote the address itself: say what it is
            raise UnsafeURL(f"{host} is {reason} address; webhooks are only sent to public addresses, "
                            "give a publicly reachable URL")
        if reason:  # what a name resolves to stays in the server's log: no map of internal addresses
            log.warning("webhook URL refused: %r resolves to %s (%s address)", host, address, reason)
            raise UnsafeURL(f"host {host!r} does not resolve to a public address; webhooks are only sent to public "
                            "addresses, give a publicly reachable URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, str(addresses[0]), path)
