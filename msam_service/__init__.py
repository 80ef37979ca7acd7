"""What the gateway (``api/``) and the workers (``worker/``) share, and the launcher.

- :mod:`msam_service.settings`: the one place for configuration (``MSAM_*`` environment).
- :mod:`msam_service.storage`: uploads and results in a shared directory (object storage later).
- :mod:`msam_service.jobs`: job records in Redis (status, progress, timings, errors).
- :mod:`msam_service.queue`: Celery configuration shared by the sender (api) and the worker.
- :mod:`msam_service.metrics`: counters and histograms kept in Redis, exported by the api.
- :mod:`msam_service.serve`: ``msam serve`` (embedded Redis + api + one worker).

Dependencies point inward: this package uses msam_core (errors, I/O) and never api/ or worker/.
"""
