"""Container health check for a worker: exit 0 when a worker on this host beat recently.

``python -m worker.healthcheck`` (compose ``healthcheck``, Kubernetes ``livenessProbe``); the
main process refreshes its record (:func:`msam_service.queue.worker_key`) every few seconds
(:mod:`worker.heartbeat`).
"""

from __future__ import annotations

import socket
import sys

from msam_service import redis_conn
from msam_service.queue import worker_key
from msam_service.settings import get_settings


def main() -> int:
    settings = get_settings()
    if not settings.redis_url:
        print("MSAM_REDIS_URL is not set", file=sys.stderr)
        return 1
    try:
        r = redis_conn.client(settings.redis_url)
        alive = any(True for _ in r.scan_iter(match=worker_key(f"{socket.gethostname()}:*")))
    except Exception as exc:  # any failure means unhealthy
        print(f"redis unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1
    if not alive:
        print("no heartbeat from the worker on this host", file=sys.stderr)
    return 0 if alive else 1


if __name__ == "__main__":
    sys.exit(main())
