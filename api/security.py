"""Who may call what, and how much they may send.

- Bearer tokens from settings, compared in constant time (`secrets.compare_digest`). Admin
  endpoints need FOUNDEX_ADMIN_TOKEN (and are refused while it is unset); read endpoints need
  FOUNDEX_READ_TOKEN when it is set (the admin token is accepted there too).
- A body-size limit as a small ASGI middleware: a declared Content-Length over the limit is
  refused before the body is read, and a streamed (chunked) body is counted as it arrives.

Tokens and bodies never reach a log line.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

_bearer = HTTPBearer(
    auto_error=False, description="Bearer token (FOUNDEX_READ_TOKEN / FOUNDEX_ADMIN_TOKEN)"
)

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(given: str, expected: SecretStr | None) -> bool:
    if expected is None:
        return False
    return secrets.compare_digest(given.encode(), expected.get_secret_value().encode())


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": 'Bearer realm="foundex"'})


async def require_read(request: Request, creds: Credentials) -> None:
    settings = request.app.state.context.settings
    if settings.read_token is None:
        return
    if creds is None:
        raise _unauthorized("missing bearer token")
    if not (_matches(creds.credentials, settings.read_token)
            or _matches(creds.credentials, settings.admin_token)):
        raise _unauthorized("invalid bearer token")


async def require_admin(request: Request, creds: Credentials) -> None:
    settings = request.app.state.context.settings
    if settings.admin_token is None:
        raise HTTPException(403, "admin API disabled: set FOUNDEX_ADMIN_TOKEN to enable it")
    if creds is None:
        raise _unauthorized("missing bearer token")
    if not _matches(creds.credentials, settings.admin_token):
        raise _unauthorized("invalid bearer token")


class _TooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so FastAPI's body parsing passes it through."""


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413 (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._refuse_declared(scope)
        if refused is not None:
            await _send_error(send, *refused)
            return
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, self._message())
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, self._message())

    def _refuse_declared(self, scope) -> tuple[int, str] | None:
        """(status, detail) when the declared Content-Length is invalid or too large."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return 400, "invalid Content-Length header"
                if declared > self.max_bytes:
                    return 413, self._message()
        return None

    def _message(self) -> str:
        return f"request body too large: at most {self.max_bytes} bytes"


async def _send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
