"""The Celery app Flower loads (``celery -A tuwen.pipeline.flower_app flower``, which ``tuwen flower`` runs):
tuwen's own app, built from the ``TUWEN_*`` environment ``tuwen flower`` hands it, so that Flower reaches a
Sentinel deployment (``redis+sentinel://``: kombu's sentinel URL and ``master_name``) or a TLS broker
(``rediss://`` with its certificates) exactly as the workers do. A module-level app is what ``celery -A``
reads; this module is an entry point and nothing imports it."""

from __future__ import annotations

from tuwen.pipeline.app import make_celery
from tuwen.pipeline.settings import Settings

app = make_celery(Settings())
