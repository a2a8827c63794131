"""Document ingestion on the `ingest` queue: the task (`task.py`) around retrieval.ingestion."""
