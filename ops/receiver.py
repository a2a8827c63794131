"""A small webhook receiver for the quickstart: `python -m ops.receiver --port 8899 --secret-file F --out F`.

It verifies each request with the official `standardwebhooks` package (answering 400 when the signature
does not verify, so Switchyard retries), drops repeats of a `webhook-id` it has already seen, and appends
one JSON line per new event to `--out`. The secret file is read on every request, so it may be written
after the receiver starts, or rotated.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def make_handler(secret_file: Path, out: Path):
    seen: set[str] = set()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                event = Webhook(secret_file.read_text().strip()).verify(body, headers)
            except (OSError, WebhookVerificationError) as exc:
                print(f"refused {headers.get('webhook-id')}: {exc}", flush=True)
                return self._answer(400)
            with lock:
                duplicate = headers["webhook-id"] in seen
                seen.add(headers["webhook-id"])
                if not duplicate:
                    record = {"received_at": time.time(), "webhook_id": headers["webhook-id"], "path": self.path,
                              "type": event["type"], "job_id": event["data"]["id"],
                              "status": event["data"]["status"], "verified": True}
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            print(f"{'duplicate' if duplicate else 'received'} {event['type']} for job {event['data']['id']} "
                  f"(webhook-id {headers['webhook-id']}, signature verified)", flush=True)
            self._answer(204)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8899)
    parser.add_argument("--secret-file", type=Path, required=True, help="holds the tenant's whsec_ secret")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per new event")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.secret_file, args.out))
    print(f"webhook receiver on http://{args.host}:{args.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
