"""The Celery app built from the environment, for the `celery` CLI (Flower, inspect):
`celery -A tasks.app flower`. An entry module: importing it reads the environment."""

from tasks.celery_app import create_celery
from tasks.settings import Settings

app = create_celery(Settings.from_env().require_urls())
