"""The generate task: a celery-batches task on a node's own queue.

The task is thin: it turns the buffered messages into (job id, attempt) pairs and hands them to the
node runtime the GPU worker installed at boot (workers.node.Node). The node never raises for one job's
failure; each job's outcome goes through the lifecycle, so the batch's messages are acked when it
returns.
"""

from __future__ import annotations

from celery import shared_task
from celery_batches import Batches

from tasks.names import GENERATE_TASK


class SettingsBatches(Batches):
    """Batches whose size and flush interval come from the app's settings."""

    abstract = True

    @property
    def flush_every(self) -> int:
        return self.app.settings.batch_size

    @property
    def flush_interval(self) -> float:
        return self.app.settings.batch_flush_interval

    def Strategy(self, task, app, consumer):  # noqa: N802 - Celery's name
        """Re-arm the flush timer on every consumer (re)start.

        celery-batches 0.11 arms its interval timer once, on the first message, on the consumer's event
        loop of that moment. After a broker reconnect Celery builds a new consumer and calls Strategy
        again, but the stale timer handle stops the timer from being re-armed, so partial batches are
        never flushed and their jobs sit unacked (clokep/celery-batches#107, fixed upstream in #108,
        not yet released). Forgetting the handle here is that fix."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        return super().Strategy(task, app, consumer)


@shared_task(
    name=GENERATE_TASK, base=SettingsBatches, bind=True, acks_late=True,
    reject_on_worker_lost=True, ignore_result=True,
)
def generate(self, requests) -> int:
    node = self.app.node
    if node is None:
        raise RuntimeError("this worker has no engine: start GPU workers with `python -m workers.gpu`")
    node([(r.args[0], int(r.args[1])) for r in requests])
    return len(requests)
