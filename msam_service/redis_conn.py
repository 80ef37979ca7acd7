"""Redis URLs for redis-py and for Celery.

Accepted: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS) and
``unix:///path/to/redis.sock[?db=N]`` (what ``msam serve`` uses for its embedded Redis).
Celery spells a unix socket ``redis+socket:///path``; :func:`celery_url` translates.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import redis


def client(url: str) -> redis.Redis:
    """A redis-py client (connection pool) for ``url``; bytes responses, short timeouts."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                health_check_interval=30)


def celery_url(url: str) -> str:
    """``url`` as Celery's broker / result backend expect it."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return f"redis+socket://{parts.path}?virtual_host={db}" if db != "0" else f"redis+socket://{parts.path}"
    return url


def unix_url(socket_path: str, db: int = 0) -> str:
    return f"unix://{socket_path}?db={db}"
