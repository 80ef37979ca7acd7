"""Every error the API answers has the body ``{"error": {"code", "message"}}``.

User mistakes found by msam_core (:class:`~msam_core.errors.MsamError`) are 422 with msam_core's
own message (the worker fails a job with the same text); request-shape problems are 400/422 with
the field named; a Redis outage is 503. A 500 means a bug, never bad input.
"""

from __future__ import annotations

from typing import Any

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from msam_core.errors import MsamError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details or {}  # more fields of the error object (e.g. ``candidates``)


def body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def _message(e: dict) -> str:
    """One pydantic error's message, reworded where pydantic's says what failed inside the
    parser rather than what to send."""
    kind, ctx, loc = e.get("type"), e.get("ctx") or {}, e.get("loc", ())
    if kind == "json_invalid":
        at = next((x for x in loc if isinstance(x, int)), None)
        where = f" at character {at + 1}" if at is not None else ""
        return f"the body is not valid JSON ({ctx.get('error', 'decode error')}{where})"
    if kind == "missing" and tuple(loc) == ("body",):
        return "the request needs a JSON body (Content-Type: application/json); see /docs for its fields"
    if kind == "union_tag_not_found":
        return f"the field {ctx.get('discriminator', 'kind')} is missing: it names the kind of object (see /docs)"
    return str(e.get("msg", "invalid"))


def _member(part: object) -> str | None:
    """The model a location part names when pydantic tried it as one member of a union
    (``DicomwebSource``, or ``function-after[_a_study(), DicomwebSource]`` for one with a
    validator), else ``None``."""
    if not isinstance(part, str):
        return None
    if part.startswith("function-") and part.endswith("]"):
        part = part[:-1].rsplit(", ", 1)[-1]
    return part if part[:1].isupper() and part.isidentifier() else None


def _one_member(errors: list) -> list:
    """Of a union's members, the errors of the one the client meant: the one whose fields it
    used (no ``extra_forbidden`` error), when there is exactly one, without the member's name in
    the locations (pydantic's, not a field the client sent); otherwise every member's errors,
    each located by its model's plain name."""
    tried: dict[tuple, dict[str, bool]] = {}  # the union's location -> member -> the client's fields fit
    for e in errors:
        loc = tuple(e.get("loc", ()))
        for i, part in enumerate(loc):
            name = _member(part)
            if name is not None:
                fits = tried.setdefault(loc[:i], {})
                fits[name] = fits.get(name, True) and e.get("type") != "extra_forbidden"
                break
    kept = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        at = next((i for i, part in enumerate(loc) if _member(part) is not None), None)
        if at is None:
            kept.append(e)
            continue
        fits = tried[loc[:at]]
        meant = [n for n, ok in fits.items() if ok]
        if len(meant) == 1 and _member(loc[at]) != meant[0]:
            continue
        rest = () if len(meant) == 1 else (_member(loc[at]),)  # several could be meant: say which is which
        kept.append({**e, "loc": loc[:at] + rest + loc[at + 1:]})
    return kept


def describe(errors: list) -> str:
    """Pydantic errors as one readable line: ``prompts.lesions.0.positive: Field required``."""
    errors = _one_member(list(errors))
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body",) and not (
            e.get("type") == "json_invalid" and isinstance(x, int)))
        parts.append(f"{loc}: {_message(e)}" if loc else _message(e))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 415: "unsupported_media_type"}


def install(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return JSONResponse(body(code, message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        content: dict[str, Any] = body(exc.code, exc.message)
        content["error"].update(exc.details)
        return JSONResponse(content, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(MsamError)
    async def _msam(_: Request, exc: MsamError) -> JSONResponse:
        return JSONResponse(body(exc.code, str(exc)), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(body("invalid_request", describe(list(exc.errors()))), status_code=422)

    @app.exception_handler(ValidationError)
    async def _model(_: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse(body("invalid_request", describe(list(exc.errors()))), status_code=422)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        # a bug, never the caller's input; Starlette re-raises it afterwards, so it is logged
        return JSONResponse(body("internal_error", "the server failed on this request; this is a bug, "
                                 "not a problem with the request, and it has been logged"), status_code=500)

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        logger.error("redis unavailable: %s", type(exc).__name__)
        return JSONResponse(body("unavailable", "the job queue is unavailable; retry shortly"),
                            status_code=503, headers={"Retry-After": "5"})
