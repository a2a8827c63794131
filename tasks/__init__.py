"""Celery app factory, task signatures, routing, the job store and the job state machine.

Importing this package opens no connection and loads no model.
"""
