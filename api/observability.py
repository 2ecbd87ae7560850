"""Prometheus metrics, request ids and structured (JSON) logs.

Every app owns its CollectorRegistry, so several apps in one process (tests) never collide.
The access log line holds method, route template, status, latency and the request id: never
query strings, headers (tokens) or bodies.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

log = logging.getLogger("foundex.api")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "foundex_http_request_duration_seconds",
            "Request latency by route template, method and status",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.store_errors = Counter(
            "foundex_store_errors_total",
            "Online store calls that failed (down, unreachable, timed out)",
            ["op"],
            registry=self.registry,
        )
        self.embeddings = Counter(
            "foundex_embeddings_total",
            "Embedding rows served, by where they came from",
            ["source"],  # stored | computed | missing
            registry=self.registry,
        )
        self.hit_ratio = Gauge(
            "foundex_store_hit_ratio",
            "Share of requested embedding rows found in Redis since start",
            registry=self.registry,
        )
        self._hits = 0
        self._requested = 0

    def rows(self, stored: int, computed: int, missing: int) -> None:
        self.embeddings.labels("stored").inc(stored)
        self.embeddings.labels("computed").inc(computed)
        self.embeddings.labels("missing").inc(missing)
        self._hits += stored
        self._requested += stored + computed + missing
        if self._requested:
            self.hit_ratio.set(self._hits / self._requested)


class ObservabilityMiddleware:
    """Request id (echoed or generated), latency histogram per route, one JSON log line."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _VALID_ID.match(rid):
            rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.latency.labels(template, scope["method"], str(status)).observe(elapsed)
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "ms": round(elapsed * 1000, 3),
                    }
                },
            )
            request_id_var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(json_logs: bool) -> None:
    """One handler on the "foundex.api" logger (idempotent); JSON lines unless disabled."""
    logger = logging.getLogger("foundex.api")
    if getattr(logger, "_foundex_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger._foundex_configured = True  # type: ignore[attr-defined]
