"""Worker runtime: the vLLM engine adapter, the batch core and the node runtime around it, the orphan
reaper, and the entry points (GPU worker, router, webhooks worker).

Nothing here loads a model at import time; `python -m workers.gpu` loads it at worker boot.
"""
