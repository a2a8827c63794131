"""The Batch API's nouns: files (a batch's JSONL input, its output and error files) and batches, whose
lines run as jobs of priority `batch`."""
