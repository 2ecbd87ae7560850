"""HTTP presentation of errors, written once: invalid requests (422 naming each field),
FastAPI's own HTTP errors, and the service's domain errors (404, 409, 422, 429, 503)."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.observability import Metrics, log
from api.services.errors import (
    Conflict,
    Invalid,
    NotFound,
    Overloaded,
    StoreUnavailable,
    Unavailable,
)

MAX_ERRORS_SHOWN = 5  # a 422 names this many problems, then counts the rest
STATUS = {NotFound: 404, Conflict: 409, Invalid: 422, Overloaded: 429, Unavailable: 503}
RETRY_AFTER_S = 1  # what a 429 tells a client to wait before it sends again


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: object) -> str:
    """What a JSON value is, in words: the value itself is never quoted back (it may be huge,
    and NaN or Infinity cannot even be written in a JSON answer)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a value of another type"


_SOURCES = {"body", "query", "path", "header", "cookie"}


def _where(loc: tuple) -> str:
    """A pydantic error location as a field path: ("body", "item_ids", 3) -> "item_ids[3]"."""
    parts = list(loc)
    source = parts.pop(0) if parts and parts[0] in _SOURCES else None
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _short(str(part))
    if source in (None, "body"):
        return out or "body"
    return f"{source} parameter {out}"


def _problem(err: dict) -> str:
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid"))
    if kind == "json_invalid":
        pos = err["loc"][-1] if err.get("loc") else "?"
        reason = (err.get("ctx") or {}).get("error", "")
        return f"body: not valid JSON (at character {pos}: {reason})"
    where = _where(tuple(err.get("loc", ())))
    if kind == "missing":
        return f"{where}: required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be a JSON object"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") and "input" in err:
        msg = f"{msg}, got {_kind(err['input'])}"
    return f"{where}: {_short(msg, 200)}"


def validation_detail(errors: list[dict]) -> str:
    """One line naming each invalid field (at most MAX_ERRORS_SHOWN, then a count), never
    echoing the input."""
    problems = [_problem(e) for e in errors] or ["invalid request"]
    shown = "; ".join(problems[:MAX_ERRORS_SHOWN])
    if len(problems) > MAX_ERRORS_SHOWN:
        shown += f" (and {len(problems) - MAX_ERRORS_SHOWN} more)"
    return shown


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Map every error a route may raise to `{"detail": "..."}` with its status code."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(list(exc.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI could not even parse the body (not UTF-8, an integer of thousands of
            # digits): invalid input like any other, so 422 with the parser's reason.
            reason = _short(str(exc.__cause__).splitlines()[0] if str(exc.__cause__) else "", 120)
            return JSONResponse({"detail": f"body: not valid JSON ({reason})"}, status_code=422)
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        code = next(c for kind, c in STATUS.items() if isinstance(exc, kind))
        headers = {"Retry-After": str(RETRY_AFTER_S)} if code == 429 else None
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    for kind in STATUS:
        app.add_exception_handler(kind, _domain)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.store_errors.labels("read").inc()
        log.warning("store unavailable", extra={"fields": {"error": str(exc)}})
        return JSONResponse({"detail": f"online store unavailable: {exc}"}, status_code=503)
