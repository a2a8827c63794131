"""Worker runtime: the vLLM engine adapter, the batch runner, node heartbeats and entry points.

Nothing here loads a model at import time; `python -m workers.gpu` loads it at worker boot.
"""
