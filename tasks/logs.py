"""Logging for every process: one line per event, JSON by default (SWITCHYARD_LOG_FORMAT=json) or plain
text (`text`, what `make up` uses so the quickstart's logs read easily).

A JSON line carries the time, level, logger and message, and the fields a call passes in `extra`: on
every line about a job its `job_id`, `attempt` and `node` (job_fields), and the `tenant_id` where a
line is about a tenant. Nothing logs an API key or a prompt.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(log_format: str = "json", level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one writing `log_format` lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def job_fields(job_id, attempt: int | None = None, node: str | None = None, tenant=None) -> dict:
    """`extra` for a line about one job (its tenant's id where the caller has it)."""
    fields = (("job_id", str(job_id)), ("attempt", attempt), ("node", node), ("tenant_id", tenant and str(tenant)))
    return {k: v for k, v in fields if v is not None}
