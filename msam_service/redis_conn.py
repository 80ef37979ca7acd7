"""Redis URLs for redis-py and for Celery.

Accepted: ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS) and
``unix:///path/to/redis.sock[?db=N]`` (what ``msam serve`` uses for its embedded Redis).
Celery spells a unix socket ``redis+socket:///path``; :func:`celery_url` translates.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def client(url: str) -> redis.Redis:
    """A redis-py client (connection pool) for ``url``; bytes responses, short timeouts."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30,
                                health_check_interval=30)


def request_client(url: str, timeout_s: float) -> redis.Redis:
    """A client for code that answers HTTP requests: a frozen or unreachable Redis raises a
    :class:`redis.RedisError` within about ``timeout_s`` (the gateway answers 503) rather than
    holding the request for :func:`client`'s 30 s read timeout and redis-py's default retries.
    A dropped connection (a restarted Redis) is retried once at once; a timeout is not retried,
    since a frozen server would only double the wait."""
    once = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                health_check_interval=30, retry=once)


def celery_url(url: str) -> str:
    """``url`` as Celery's broker / result backend expect it."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        db = parse_qs(parts.query).get("db", ["0"])[0]
        return f"redis+socket://{parts.path}?virtual_host={db}" if db != "0" else f"redis+socket://{parts.path}"
    return url


def unix_url(socket_path: str, db: int = 0) -> str:
    return f"unix://{socket_path}?db={db}"
