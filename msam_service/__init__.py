"""What the gateway (``api/``) and the workers (``worker/``) share, and the launcher.

- :mod:`msam_service.settings`: the one place for configuration (``MSAM_*`` environment).
- :mod:`msam_service.storage`: uploads and results in a shared directory (object storage later).
- :mod:`msam_service.jobs`: job records in Redis (status, progress, timings, errors).
- :mod:`msam_service.queue`: Celery configuration shared by the sender (api) and the worker.
- :mod:`msam_service.metrics`: counters and histograms kept in Redis, exported by the api.
- :mod:`msam_service.serve`: ``msam serve`` (embedded Redis + api + one worker).

- :mod:`msam_service.log_privacy`: no DICOM UID or echoed patient value in any log line.

Dependencies point inward: this package uses msam_core (errors, I/O) and never api/ or worker/.

Importing this package turns on :func:`msam_service.log_privacy.install` for the process: the
API, the workers, the DICOM listener and ``msam serve`` all import it before they log anything,
so their logs (library loggers included) never carry a UID, whatever starts them (``msam
serve``, the container images' uvicorn / celery commands, a test harness).
"""

from msam_service import log_privacy as _log_privacy

_log_privacy.install()
