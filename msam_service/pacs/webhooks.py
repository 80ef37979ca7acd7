"""Webhooks: a signed POST to the requester's ``callback_url`` when a job ends.

- **Allowlist**: a callback URL must start with one of ``MSAM_WEBHOOK_ALLOWLIST``'s prefixes,
  compared as parsed URLs (same scheme, host and port, path below the prefix's path); URLs with
  credentials, fragments or dot segments are refused. Checked by the API (4xx) and again by the
  sender.
- **Signature**: ``X-MSAM-Timestamp: <unix seconds>`` and ``X-MSAM-Signature: sha256=<hex>``,
  the HMAC-SHA256 under ``MSAM_WEBHOOK_SECRET`` of ``<timestamp>.<body bytes>``. A receiver
  recomputes it (:func:`verify`), compares in constant time and refuses old timestamps (replay).
  ``X-MSAM-Delivery`` is the same for every attempt of one notification (deduplicate on it).
- **Retries**: connection errors, timeouts, 408, 429 and 5xx are retried
  ``MSAM_WEBHOOK_RETRIES`` times with exponential backoff from ``MSAM_WEBHOOK_BACKOFF_S``;
  other 4xx answers are final. Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any, Mapping
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MSAM-Signature"
TIMESTAMP_HEADER = "X-MSAM-Timestamp"
DELIVERY_HEADER = "X-MSAM-Delivery"
EVENT_HEADER = "X-MSAM-Event"


class CallbackNotAllowed(ValueError):
    """The callback URL is not on the allowlist (or webhooks are not configured)."""


def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackNotAllowed("callback_url must be an http(s) URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise CallbackNotAllowed("callback_url must not carry credentials")
    if parts.fragment:
        raise CallbackNotAllowed("callback_url must not have a fragment")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise CallbackNotAllowed("callback_url has an invalid port") from exc
    path = parts.path or "/"
    lowered = path.lower()
    if any(seg in (".", "..") for seg in path.split("/")) or "%2e" in lowered or "%2f" in lowered or "\\" in path:
        raise CallbackNotAllowed("callback_url must not contain dot segments or encoded separators")
    return scheme, (parts.hostname or "").lower(), port, path


def check_callback(url: str, allowlist: list[str], secret: str) -> str:
    """``url`` if webhooks are configured and it is allowed; else :class:`CallbackNotAllowed`."""
    if not allowlist or not secret:
        raise CallbackNotAllowed("webhooks are not configured on this server "
                                 "(MSAM_WEBHOOK_ALLOWLIST and MSAM_WEBHOOK_SECRET)")
    if len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url):
        raise CallbackNotAllowed("callback_url is not a valid URL")
    scheme, host, port, path = _origin(url)
    for prefix in allowlist:
        p_scheme, p_host, p_port, p_path = _origin(prefix)
        if (scheme, host, port) != (p_scheme, p_host, p_port):
            continue
        if path == p_path or path.startswith(p_path if p_path.endswith("/") else p_path + "/"):
            return url
    raise CallbackNotAllowed("callback_url is not on this server's webhook allowlist (MSAM_WEBHOOK_ALLOWLIST)")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: recompute the signature and check the timestamp's age."""
    lower = {k.lower(): v for k, v in headers.items()}
    ts = lower.get(TIMESTAMP_HEADER.lower(), "")
    sig = lower.get(SIGNATURE_HEADER.lower(), "")
    if not ts.isdigit() or not sig:
        return False
    if abs((now if now is not None else time.time()) - int(ts)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), sig)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def signed_headers(secret: str, body: bytes, delivery_id: str, event: str, now: float | None = None) -> dict[str, str]:
    ts = str(int(now if now is not None else time.time()))
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(secret, ts, body),
            DELIVERY_HEADER: delivery_id, EVENT_HEADER: event, "User-Agent": "msam-webhook/1"}


def post_once(url: str, body: bytes, secret: str, delivery_id: str, event: str,
              timeout: float = 10.0) -> tuple[bool, bool, str]:
    """One attempt; returns ``(delivered, worth_retrying, reason)``. Signed afresh each time
    (the timestamp is the attempt's)."""
    headers = signed_headers(secret, body, delivery_id, event)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as c:
            r = c.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return False, True, type(exc).__name__
    if 200 <= r.status_code < 300:
        return True, False, f"HTTP {r.status_code}"
    retry = r.status_code in (408, 425, 429) or r.status_code >= 500
    return False, retry, f"HTTP {r.status_code}"


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before retry ``attempt`` (1-based): base, 2*base, 4*base, ... capped."""
    return float(min(cap_s, base_s * 2 ** (attempt - 1)))
