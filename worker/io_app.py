"""The I/O worker's Celery application: ``celery -A worker.io_app worker -Q msam-io --pool threads``.

Network traffic with archives, the RIS, FHIR servers and webhook receivers
(:mod:`worker.io_tasks`) runs here, on CPU, never in a GPU worker: a slow or dead archive holds
one of this worker's threads, not a GPU. It imports no model code (torch is not needed: it runs
in the API image too). Logs carry no DICOM UID (:mod:`msam_service.log_privacy`).
"""

from __future__ import annotations

import logging

from celery import signals

from msam_service import log_privacy
from msam_service.queue import make_celery
from msam_service.settings import get_settings

log_privacy.install()

settings = get_settings()
app = make_celery(settings, "msam-io")
app.conf.task_default_queue = settings.io_queue
app.conf.include = ["worker.io_tasks"]


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _redact_celery_handlers(logger: logging.Logger | None = None, **_: object) -> None:
    if logger is not None:
        log_privacy.attach(logger)
    log_privacy.attach(logging.getLogger())
