"""The Celery app factory and every task, with the job system's core beneath it, one package per noun:

- `tasks.jobs`: the job store, statuses, notifications, the lifecycle (one function per transition),
  the reconciler and the generate task;
- `tasks.routing`: routing strategies, the node registry and the route task;
- `tasks.webhooks`: the webhook store, SSRF guard, signing, HTTP sender, dispatcher and delivery task.

Importing this package opens no connection and loads no model.
"""
