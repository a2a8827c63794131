"""Log lines: one JSON object per line, with the job's id, attempt and node on lines about a job; or
plain text for the quickstart."""

from __future__ import annotations

import io
import json
import logging

from tasks.logs import configure, job_fields


def _capture(log_format: str) -> io.StringIO:
    configure(log_format)
    out = io.StringIO()
    logging.getLogger().handlers[0].setStream(out)
    return out


def test_json_lines_carry_the_jobs_fields():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        out = _capture("json")
        logging.getLogger("tasks.jobs.lifecycle").warning("job %s: attempt %d in %.1f s", "j-1", 2, 0.5,
                                                          extra=job_fields("j-1", 2, "gpu-0", "t-9"))
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        assert record["message"] == "job j-1: attempt 2 in 0.5 s" and record["level"] == "WARNING"
        assert (record["job_id"], record["attempt"], record["node"], record["tenant_id"]) == ("j-1", 2, "gpu-0", "t-9")
        assert record["logger"] == "tasks.jobs.lifecycle" and record["time"]

        out = _capture("text")
        logging.getLogger("x").info("plain %s", "words")
        assert out.getvalue().rstrip().endswith("INFO x: plain words")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
