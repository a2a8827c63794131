"""A scripted HTTP receiver for webhook tests (and a canary that must hear nothing), and the SSRF matrix
of internal URLs every guard must refuse."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server that records every request and answers as scripted per path (default 200)."""

    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._record(body)

            def do_GET(self):  # noqa: N802
                self._record(b"")

            def _record(self, body: bytes):
                item = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.changed:
                    receiver.requests.append(item)
                    script = receiver.scripts.get(self.path)
                    status, headers = script.pop(0) if script else (200, {})
                    receiver.changed.notify_all()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog (5) drops SYNs under load: 1 s retransmits

        self.server = Server((self.host, self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def script(self, path: str, *answers: tuple[int, dict]) -> None:
        with self.changed:
            self.scripts[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        with self.changed:
            return [r for r in self.requests if r.path == path]

    def wait(self, predicate, timeout: float = 20) -> None:
        """Block until `predicate(requests)` holds (woken by each request), or fail."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self.requests), timeout):
                raise AssertionError(f"receiver: condition not met within {timeout} s "
                                     f"({len(self.requests)} requests)")


def _local_address() -> str | None:
    """This machine's own non-loopback address (where an internal service would also listen)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def internal_urls(port: int) -> list[str]:
    """The SSRF matrix: every URL must be refused. Those that name `port` reach the canary if followed."""
    urls = [
        f"http://2130706433:{port}/", f"http://0x7f000001:{port}/", f"http://017700000001:{port}/",
        f"http://127.1:{port}/", f"http://0177.0.0.1:{port}/", f"http://127.0.0.1:{port}/",
        f"http://127.0.0.1.:{port}/", f"http://localhost:{port}/", f"http://LOCALHOST:{port}/",
        f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/", f"http://[::ffff:7f00:1]:{port}/",
        f"http://0.0.0.0:{port}/", f"http://0:{port}/", f"http://[::]:{port}/", f"http://[2002:7f00:1::]:{port}/",
        f"https://127.0.0.1:{port}/", f"ftp://127.0.0.1:{port}/", f"gopher://127.0.0.1:{port}/_x",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/", "http://[fd00:ec2::254]/",
        "http://10.0.0.1/", "http://172.16.0.1/", "http://192.168.0.1/", "http://100.64.0.1/",
        "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://255.255.255.255/",
        "http://[fc00::1]/", "http://198.18.0.1/",
    ]
    own = _local_address()
    if own:
        urls.append(f"http://{own}:{port}/")
    return urls


def canary_silent(canary: Receiver) -> None:
    assert canary.requests == [], [(r.path, r.headers.get("host")) for r in canary.requests]
