"""gunicorn entry point: `gunicorn -c ops/gunicorn.conf.py api.wsgi:app`."""

from api import create_app
from tasks.settings import Settings

app = create_app(Settings.from_env().require_urls())
