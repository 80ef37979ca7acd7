"""Typed errors: every non-2xx answer of the service becomes one of these, with the service's
own ``code`` and ``message``."""

from __future__ import annotations


class MsamError(Exception):
    """An error answer of the service (``status``: the HTTP status)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class NotFound(MsamError):
    """404: the volume, session, lesion or job does not exist or has expired."""


class InvalidRequest(MsamError):
    """400 / 413 / 415 / 422: the request is wrong; the message says how to fix it."""


class Unauthorized(MsamError):
    """401 / 403: no or an unknown API key."""


class Conflict(MsamError):
    """409: not now (nothing to undo, the last interaction still runs, a result not ready)."""


class Busy(MsamError):
    """429 / 503: the service is loaded or degraded; try again later."""


class Unreachable(Exception):
    """No answer at all: nothing listens at the URL, the connection broke or timed out."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the service at {url} ({reason}); is it running? (--url or MSAM_URL "
                         "gives another address)")
        self.url, self.reason = url, reason


class JobFailed(Exception):
    """A job (or commit) ended ``failed`` or ``canceled``."""

    def __init__(self, job: dict) -> None:
        error = job.get("error") or {}
        super().__init__(f"job {job.get('job_id')} {job.get('status')}: {error.get('code')}: {error.get('message')}")
        self.job = job


def from_response(status: int, body: object) -> MsamError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    code, message = str(error.get("code", "http_error")), str(error.get("message", body))
    kind = {404: NotFound, 401: Unauthorized, 403: Unauthorized, 409: Conflict, 429: Busy, 503: Busy}.get(status)
    if kind is None:
        kind = InvalidRequest if 400 <= status < 500 else MsamError
    return kind(status, code, message)
