"""Domain errors of the service layer. The faces map them once: REST in `api.http_errors`
(404, 409, 422, 429, 503), the CLI to `error: ...` and exit 2."""

from __future__ import annotations

from typing import Any

__all__ = ["Conflict", "Invalid", "NotFound", "Overloaded", "ServiceError", "Unavailable"]  # + StoreUnavailable


class ServiceError(Exception):
    """Base of the errors a use-case raises on purpose; str() is the one-line message."""


class NotFound(ServiceError, LookupError):
    """An unknown FM version, expert or trained model (REST 404)."""


class Conflict(ServiceError):
    """The request clashes with the repo's state, or its files disagree with each other (a
    trained expert and the version it pins; a duplicate checkpoint; a pinned version) (409)."""


class Invalid(ServiceError, ValueError):
    """The caller's input is wrong in a way the schema cannot see (422)."""


class Overloaded(ServiceError):
    """A bounded queue is full (the events stream holds as many entries as its consumers may
    fall behind by): nothing was dropped, the caller retries later (429). `appended`: events
    of the call appended before it filled (a retry of the whole call is safe: ids dedup)."""

    def __init__(self, message: str, *, appended: int = 0) -> None:
        super().__init__(message)
        self.appended = appended


class Unavailable(ServiceError):
    """A dependency failed, e.g. `feast apply` (503). StoreUnavailable is the online store's.
    str() is one line; `details` holds the full text (a tool's output) for the CLI."""

    def __init__(self, message: str, *, details: str = "") -> None:
        super().__init__(message)
        self.details = details or message


def __getattr__(name: str) -> Any:
    # StoreUnavailable is the online store's own error; importing it loads Feast's protobufs,
    # which a CLI command that fails its checks first must not pay for.
    if name == "StoreUnavailable":
        from store_bridge.online import StoreUnavailable

        return StoreUnavailable
    raise AttributeError(name)
